"""``xdsi serve`` in a subprocess on loopback ports, with its peak RSS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from tests.conftest import ROOT, terminal_signals
from xdsi.config import Settings, to_toml


def node_settings(storage: Path, **repository: object) -> Settings:
    settings = (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    return replace(settings, repository=replace(settings.repository, **repository))


@dataclass
class NodeProcess:
    """A running ``xdsi serve`` and the endpoints it printed."""

    process: subprocess.Popen[str]
    endpoints: dict[str, str]

    @classmethod
    def start(
        cls, settings: Settings, config: Path, log: Path | None = None
    ) -> NodeProcess:
        """Start ``xdsi serve``; its log (stderr) goes to ``log`` if given."""
        config.write_text(to_toml(settings))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log or os.devnull, "w") as stderr, terminal_signals():
            process = subprocess.Popen(
                [sys.executable, "-m", "xdsi", "--config", str(config), "serve"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                cwd=ROOT,
            )
        assert process.stdout is not None
        endpoints: dict[str, str] = {}
        for line in process.stdout:
            name, _, value = line.rstrip("\n").rpartition("  ")
            endpoints[name.strip()] = value.strip()
            if line.startswith("storage"):
                break
        if "storage" not in endpoints:
            process.kill()
            process.wait()
            raise RuntimeError(f"xdsi serve did not start: {endpoints}")
        return cls(process, endpoints)

    def effective(self, settings: Settings) -> Settings:
        """``settings`` with the ports this process bound."""
        host, port = self.endpoints["feed (MLLP)"].rsplit(":", 1)
        ports = {
            actor: int(self.endpoints[actor].split(":")[2].split("/")[0])
            for actor in ("registry", "repository", "imaging_source")
        }
        return settings.with_ports(feed=int(port), **ports)

    def peak_rss(self) -> int:
        """VmHWM of the process, in bytes (proc(5))."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
