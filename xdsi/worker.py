"""One worker process for the node's CPU-bound DICOM work on large studies.

Reading DICOM headers (pydicom) and building a manifest (highdicom) are pure
Python: about half a millisecond to a millisecond per instance. In the
node's own process the work on a 2000-instance study holds the GIL for
seconds, and every other thread of the node waits behind it: those that
copy, hash and fsync the study's instances meanwhile, and those that serve
other peers. Work on a study of at least :data:`MIN_INSTANCES` instances
therefore goes to one worker process, started on first need and shared by
the whole Python process, while the calling process does what it can meanwhile
(half of a header scan, the keeping of the instances). Smaller studies stay
in the calling thread, where the worker's start and round trip would cost
more than they save.

A worker with no work for :data:`IDLE_SECONDS` is stopped, so that a node
publishing a large study now and then does not hold the worker's memory
(some 200 MB: pydicom, highdicom and their data dictionaries) between them.

A worker that cannot be started, dies, or has not answered within its
allowance (:func:`allowance`) is not an error: it is killed, the work is
done in the calling process, and a new worker is started next time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

logger = logging.getLogger(__name__)

# Work on at least this many instances goes to the worker process.
MIN_INSTANCES = 500

# How long the worker may take over work on n instances: a minute, plus 20
# times the millisecond an instance costs. A worker that takes longer
# (stopped, or stuck) is killed and the work done in the calling process.
BASE_ALLOWANCE = 60.0
ALLOWANCE_PER_INSTANCE = 0.02

# A worker with nothing to do for this long is stopped; the next large
# study starts another (about a second).
IDLE_SECONDS = 120.0

# How often the worker looks whether the process that started it is alive.
PARENT_CHECK_SECONDS = 1.0

P = ParamSpec("P")
T = TypeVar("T")


class Pool:
    """Worker processes, ``size`` at most, started on first need and
    stopped once idle for IDLE_SECONDS; ``name`` says them in the log.

    A fresh interpreter (spawn) each, rather than a fork of this
    multi-threaded process; each takes no SIGINT, prints nothing and exits
    with the process that started it (:func:`_set_up`).
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self.executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._busy = 0
        self._idle_timer: threading.Timer | None = None
        # The work given to the processes and not done yet, in the order
        # given, which is the order they take it up in (see begun).
        self._pending: dict[Future, None] = {}

    def submit(
        self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Start ``function(*args, **kwargs)`` in a worker process.

        ``function`` must be a module-level function, and its arguments and
        result picklable. A pool that cannot start gives a future that
        raises BrokenProcessPool.
        """
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._busy += 1
        try:
            executor = self._started()
            with self._lock:
                future = executor.submit(function, *args, **kwargs)
                self._pending[future] = None
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            future = Future()
            future.set_exception(BrokenProcessPool(str(exc)))
        future.add_done_callback(self._done)
        return future

    def begun(self, future: Future[T]) -> bool:
        """Whether a process has taken up ``future`` (given by :meth:`submit`).

        ProcessPoolExecutor marks work running once it is queued for its
        processes, one more than there are of them, while all may still be
        busy with earlier work: the processes take work up in the order
        given, so ``future`` is begun once fewer than ``size`` of the work
        given before it are left undone.
        """
        if not future.running():
            return False
        with self._lock:
            ahead = 0
            for earlier in self._pending:
                if earlier is future:
                    return ahead < self.size
                ahead += 1
        # Not among this pool's processes' work (those were discarded).
        return True

    def discard(self) -> bool:
        """Kill and drop a failed pool; the next call starts another. False
        when there was none (dropped already)."""
        with self._lock:
            broken, self.executor = self.executor, None
            self._pending = {}
        if broken is None:
            return False
        # ProcessPoolExecutor can only wait for its processes; a stopped or
        # stuck one is killed through its process table.
        for process in list(getattr(broken, "_processes", {}).values()):
            process.kill()
        # Python before 3.11.5 (CPython gh-94777) leaves the queue's feeder
        # thread blocked for good writing work into a pipe no process reads
        # any more, and the interpreter's exit waits on it: xdsi serve or a
        # command never ends. Closing the pipe's reading end, as later
        # Pythons do when the pool breaks, makes that write fail and the
        # thread end. Not on those later Pythons: their pool closes it
        # itself, and a second close could hit the descriptor number a new
        # pool has taken since.
        reader = getattr(getattr(broken, "_call_queue", None), "_reader", None)
        if reader is not None and sys.version_info < (3, 11, 5):
            try:
                reader.close()
            except OSError:
                pass
        try:
            broken.shutdown(wait=False, cancel_futures=True)
        except OSError:
            # A pool that broke by itself may have closed the pipe that
            # wakes its manager thread already.
            pass
        return True

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self.executor is None:
                self.executor = ProcessPoolExecutor(
                    max_workers=self.size,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_set_up,
                )
            return self.executor

    def _done(self, future: Future[T]) -> None:
        """Count finished work; once none is left, stop the pool later."""
        with self._lock:
            self._pending.pop(future, None)
            self._busy -= 1
            if self._busy or self.executor is None:
                return
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = threading.Timer(IDLE_SECONDS, self._retire)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _retire(self) -> None:
        """Stop a pool that has had nothing to do for IDLE_SECONDS."""
        with self._lock:
            if self._busy or self.executor is None:
                return
            idle, self.executor, self._idle_timer = self.executor, None, None
            self._pending = {}
        logger.debug("%s: idle for %.0f s, stopped", self.name, IDLE_SECONDS)
        idle.shutdown(wait=False)

    def close(self) -> None:
        """Stop the pool's idle timer and its processes, waiting for them."""
        with self._lock:
            timer, self._idle_timer = self._idle_timer, None
            executor, self.executor = self.executor, None
            self._pending = {}
        if timer is not None:
            timer.cancel()
        if executor is not None:
            executor.shutdown()


# The worker of scans and manifests: one process.
DEFAULT = Pool(1, "the worker process")


def submit(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Start ``function(*args, **kwargs)`` in the worker process
    (:data:`DEFAULT`). Collect the result with :func:`result`."""
    return DEFAULT.submit(function, *args, **kwargs)


def allowance(instances: int) -> float:
    """Seconds the worker may take over work on ``instances`` instances."""
    return BASE_ALLOWANCE + ALLOWANCE_PER_INSTANCE * instances


def result(
    future: Future[T],
    instances: int,
    function: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """The result of work on ``instances`` instances started with
    :func:`submit`.

    Raises what ``function`` raised. When the worker could not start, died,
    or has not answered within :func:`allowance`, ``function(*args,
    **kwargs)`` is run here instead (a late worker is killed first).
    """
    try:
        return future.result(timeout=allowance(instances))
    except BrokenProcessPool as exc:
        reason = str(exc) or "it died"
    except TimeoutError:
        reason = f"no answer within {allowance(instances):.0f} s"
    logger.warning(
        "the worker process failed (%s); %s runs in this process",
        reason,
        function.__qualname__,
    )
    DEFAULT.discard()
    return function(*args, **kwargs)


def run(
    instances: int, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``function(*args, **kwargs)``, work on ``instances`` instances,
    in the worker process and wait."""
    future = submit(function, *args, **kwargs)
    return result(future, instances, function, *args, **kwargs)


def _set_up() -> None:
    """Start a worker that takes no SIGINT, so that Ctrl-C stops the node
    without a traceback from the worker, and prints nothing: the calling
    process reports what matters (pydicom's complaints, which may quote a
    patient's values, included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    logging.getLogger().addHandler(logging.NullHandler())
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), daemon=True
    ).start()


def _exit_with_parent(parent: int) -> None:
    """Exit once the calling process is gone (killed outright, say), which
    leaves the worker to init: nothing would ever send it work or stop it."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)
