"""Tests of xdsi.config: defaults, the TOML file, and to_toml round trips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from xdsi.config import (
    CONNECTATHON_ASSIGNING_AUTHORITY,
    ConfigError,
    ConsumerSettings,
    Settings,
    load_settings,
    to_toml,
)


@pytest.fixture(autouse=True)
def no_config_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDSI_CONFIG", raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdsi.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file() -> None:
    """The demo node runs with no configuration file."""
    settings = load_settings()

    assert settings == Settings()
    assert settings.node.host == "127.0.0.1"
    assert settings.node.assigning_authority == CONNECTATHON_ASSIGNING_AUTHORITY
    assert settings.registry_url == "http://127.0.0.1:9081/xds/registry"
    assert settings.repository_url == "http://127.0.0.1:9082/xds/repository"
    assert settings.consumer_registry_url == settings.registry_url
    assert settings.database_url.startswith("sqlite:///")


def test_with_tls_every_url_is_https(tmp_path: Path) -> None:
    """ITI TF-2 3.19: with TLS on, every HTTP service is served over TLS,
    DICOMweb's Retrieve URL (put in each KOS) included."""
    settings = load_settings(
        _write(
            tmp_path,
            "[tls]\nenabled = true\n"
            'certificate = "c.pem"\nprivate_key = "k.pem"\ntrusted = ["ca.pem"]\n',
        )
    )
    assert settings.dicomweb_url == "https://127.0.0.1:9083/dicomweb"
    for actor in ("registry", "repository", "imaging_source"):
        assert settings.url(actor).startswith("https://")
    assert Settings().dicomweb_url == "http://127.0.0.1:9083/dicomweb"


def test_file_overrides_what_it_names(tmp_path: Path) -> None:
    """A file changes only the settings it names."""
    path = _write(
        tmp_path,
        """
[node]
storage_dir = "/var/lib/xdsi"

[repository]
port = 9182
registry_url = "http://127.0.0.1:9999/registry"

[imaging_source]
class_code = ["IMG", "1.2.3", "Images"]

[consumer.repositories]
"1.2.3.4" = "http://127.0.0.1:9300/rad69"
""",
    )

    settings = load_settings(path)

    assert settings.node.storage_dir == "/var/lib/xdsi"
    assert settings.node.name == Settings().node.name
    assert settings.repository.port == 9182
    assert settings.repository.path == Settings().repository.path
    assert settings.registry_url == "http://127.0.0.1:9999/registry"
    assert settings.imaging_source.class_code == ("IMG", "1.2.3", "Images")
    assert settings.consumer.repositories == {"1.2.3.4": "http://127.0.0.1:9300/rad69"}
    assert settings.registry == Settings().registry


def test_imaging_source_updates_go_to_its_repository_registry(
    tmp_path: Path,
) -> None:
    """ITI TF-2 3.57: ITI-57 goes to the registry of the repository published
    to, unless [imaging_source] registry_url names another."""
    path = _write(
        tmp_path,
        """
[repository]
registry_url = "http://127.0.0.1:9999/registry"
""",
    )
    settings = load_settings(path)
    assert settings.imaging_source_registry_url == "http://127.0.0.1:9999/registry"

    path = _write(
        tmp_path,
        """
[imaging_source]
registry_url = "http://127.0.0.1:9998/registry"
""",
    )
    settings = load_settings(path)
    assert settings.imaging_source_registry_url == "http://127.0.0.1:9998/registry"
    assert Settings().imaging_source_registry_url == Settings().registry_url


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDSI_CONFIG is read when no path is given."""
    monkeypatch.setenv("XDSI_CONFIG", str(_write(tmp_path, "[registry]\nport = 1\n")))

    assert load_settings().registry.port == 1


@pytest.mark.parametrize(
    "text",
    ["[nodes]\nname = 'x'\n", "[repository.extra]\nport = 1\n", "node = 'x'\n"],
    ids=["unknown section", "unknown key as table", "section not a table"],
)
def test_unknown_section_is_config_error(tmp_path: Path, text: str) -> None:
    """A misspelt section is refused rather than ignored."""
    with pytest.raises(ConfigError):
        load_settings(_write(tmp_path, text))


def test_unknown_key_is_config_error(tmp_path: Path) -> None:
    """A misspelt setting is refused rather than ignored."""
    path = _write(tmp_path, "[registry]\nprot = 9081\n")

    with pytest.raises(ConfigError, match=r"unknown setting \[registry\] prot"):
        load_settings(path)


WRONG_TYPES = {
    "string port": "[registry]\nport = '9081'\n",
    "boolean port": "[registry]\nport = true\n",
    "fractional port": "[registry]\nport = 9081.5\n",
    "number as name": "[node]\nname = 5\n",
    "number as switch": "[registry]\nenabled = 1\n",
    "string as switch": "[registry]\nenabled = 'yes'\n",
    "code of two parts": "[imaging_source]\nclass_code = ['IMG', '1.2.3']\n",
    "code as string": "[imaging_source]\nclass_code = 'IMG'\n",
    "repositories as string": "[consumer]\nrepositories = 'x'\n",
    "repository url as number": "[consumer.repositories]\n'1.2.3' = 5\n",
    "string timeout": "[consumer]\ntimeout = 'slow'\n",
    "no worker": "[node]\nworkers = 0\n",
    "string workers": "[node]\nworkers = '2'\n",
}


@pytest.mark.parametrize("text", WRONG_TYPES.values(), ids=WRONG_TYPES)
def test_wrong_type_is_config_error(tmp_path: Path, text: str) -> None:
    """A value of the wrong type is refused when the file is read."""
    with pytest.raises(ConfigError):
        load_settings(_write(tmp_path, text))


def test_integer_timeout_is_accepted(tmp_path: Path) -> None:
    """A whole number is a valid float setting."""
    path = _write(tmp_path, "[consumer]\ntimeout = 30\n")

    assert load_settings(path).consumer.timeout == 30


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    """An unreadable file is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="absent.toml"):
        load_settings(tmp_path / "absent.toml")


def test_invalid_toml_is_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(_write(tmp_path, "[registry\nport = 1\n"))


def _round_trip(settings: Settings, tmp_path: Path) -> Settings:
    return load_settings(_write(tmp_path, to_toml(settings)))


def _effective(settings: Settings) -> Settings:
    """``settings`` with its storage folder as the absolute path it is."""
    return replace(
        settings, node=replace(settings.node, storage_dir=str(settings.storage))
    )


def test_to_toml_of_defaults_loads_back_equal(tmp_path: Path) -> None:
    """to_toml writes what load_settings reads; the storage folder as the
    absolute path it is, wherever the file is read from."""
    assert _round_trip(Settings(), tmp_path) == _effective(Settings())


def test_to_toml_of_changed_settings_loads_back_equal(tmp_path: Path) -> None:
    """to_toml keeps tables, code triples, quotes and backslashes."""
    base = Settings()
    settings = replace(
        base,
        node=replace(
            base.node,
            storage_dir="C:\\xdsi\\data",
            enterprise_site_id='Site "A"',
            name="Hôpital",
        ),
        registry=replace(base.registry, enabled=False, max_results=10),
        imaging_source=replace(
            base.imaging_source, class_code=("IMG", "1.2.3", "Images, all")
        ),
        consumer=ConsumerSettings(
            registry_url="http://127.0.0.1:9000/registry",
            timeout=2.5,
            repositories={
                "1.2.3.4": "http://127.0.0.1:9300/rad69",
                "2.25.1": "http://127.0.0.1:9301/iti43",
            },
        ),
    )

    assert _round_trip(settings, tmp_path) == _effective(settings)


def test_to_toml_lists_effective_endpoints_as_comments() -> None:
    """The rendered file says where each actor listens."""
    text = to_toml(Settings().with_ports(registry=7001))

    assert "# registry: http://127.0.0.1:7001/xds/registry" in text
    assert "# patient identity feed (MLLP): 127.0.0.1:2575" in text


def test_with_ports_changes_only_the_named_ports() -> None:
    """with_ports returns a copy; feed is the registry's MLLP port."""
    base = Settings()

    changed = base.with_ports(registry=0, repository=7002, imaging_source=7003, feed=0)

    assert changed.registry.port == 0
    assert changed.registry.feed_port == 0
    assert changed.repository.port == 7002
    assert changed.imaging_source.port == 7003
    assert changed.url("repository") == "http://127.0.0.1:7002/xds/repository"
    assert changed.node == base.node
    assert changed.consumer == base.consumer
    assert base.registry.port == 9081
    assert base.with_ports() == base


def test_with_storage_changes_the_storage_folder(tmp_path: Path) -> None:
    """with_storage moves the storage folder and the default database."""
    settings = Settings().with_storage(tmp_path)

    assert settings.storage == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'xdsi.sqlite'}"


def test_relative_paths_of_a_file_are_read_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage folder and TLS files a configuration names relatively are
    under the file's own folder, whatever folder a command runs in; so a
    node and the client commands given its file find the same storage."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "xdsi.toml"
    path.write_text(
        '[node]\nstorage_dir = "data"\n'
        '[tls]\ncertificate = "pki/node.pem"\nprivate_key = "/abs/key.pem"\n'
        'trusted = ["pki/ca.pem"]\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = load_settings(path)

    assert settings.storage == folder / "data"
    assert settings.tls.certificate == str(folder / "pki" / "node.pem")
    assert settings.tls.private_key == "/abs/key.pem"
    assert settings.tls.trusted == (str(folder / "pki" / "ca.pem"),)


def test_audit_targets_are_read_from_the_audit_section(tmp_path: Path) -> None:
    """ITI TF-2 3.20.6: TLS and UDP syslog targets, several at once."""
    path = _write(
        tmp_path,
        '[audit]\ntargets = ["tls://127.0.0.1:6514", "udp://127.0.0.1:5514"]\n'
        "facility = 13\n",
    )

    settings = load_settings(path)

    assert settings.audit.targets == ("tls://127.0.0.1:6514", "udp://127.0.0.1:5514")
    assert settings.audit.facility == 13
    assert load_settings(_write(tmp_path, to_toml(settings))) == _effective(settings)


@pytest.mark.parametrize(
    "text",
    ['targets = ["tcp://127.0.0.1:514"]', 'targets = ["tls://h"]', "facility = 16"],
)
def test_bad_audit_setting_is_config_error(tmp_path: Path, text: str) -> None:
    """ITI TF-2 3.20.6: only TLS or UDP targets, facility 10 or 13."""
    with pytest.raises(ConfigError, match=r"\[audit\]"):
        load_settings(_write(tmp_path, f"[audit]\n{text}\n"))


def test_the_readme_example_configuration_loads(tmp_path: Path) -> None:
    """The site example in README.md names only settings that exist."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (example, *_) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    settings = load_settings(_write(tmp_path, example))
    assert settings.imaging_source.repository_unique_id == (
        "1.3.6.1.4.1.21367.13.80.110"
    )


def test_to_toml_names_every_imaging_endpoint() -> None:
    """``config show`` lists DICOMweb, STOW-RS, WADO-URI and, when on, the
    C-STORE SCP beside the SOAP endpoints."""
    shown = to_toml(Settings())
    assert "# stow-rs: http://127.0.0.1:9083/dicomweb/studies" in shown
    assert "# wado-uri: http://127.0.0.1:9083/wado" in shown
    assert "c-store scp" not in shown
    scp = Settings()
    scp = replace(scp, imaging_source=replace(scp.imaging_source, store_scp=True))
    assert "# c-store scp: XDSI@127.0.0.1:11112" in to_toml(scp)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("registry_timeout = 0", "registry_timeout must be 0.1 to"),
        ("registry_timeout = 1e-300", "registry_timeout must be 0.1 to"),
        ("registry_timeout = nan", "registry_timeout must be 0.1 to"),
        ("registry_timeout = inf", "registry_timeout must be 0.1 to"),
        ("pending_sweep_age = 0", "pending_sweep_age must be 1 to"),
        ("pending_sweep_age = 100000000000000000", "pending_sweep_age must be 1 to"),
        (
            "registry_timeout = 300\npending_sweep_age = 300",
            "pending_sweep_age must exceed registry_timeout",
        ),
    ],
)
def test_repository_timeouts_are_checked(tmp_path, values: str, message: str) -> None:
    """A sweep younger than the ITI-42 timeout would remove documents whose
    registration is still under way; a timeout that is no finite number
    fails every submission."""
    path = tmp_path / "xdsi.toml"
    path.write_text(f"[repository]\n{values}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


@pytest.mark.parametrize(
    "text",
    [
        "[registry]\nport = 99999\n",
        "[registry]\nfeed_port = -1\n",
        "[imaging_source]\ndicom_port = 65536\n",
        "[audit]\narr_udp_port = 70000\n",
    ],
    ids=["above", "negative", "dicom", "arr"],
)
def test_a_port_outside_0_to_65535_is_config_error(tmp_path: Path, text: str) -> None:
    """RFC 793 3.1: a port is 16 bits; 99999 is no port, not 99999 - 65536."""
    with pytest.raises(ConfigError, match="a port is 0 to 65535"):
        load_settings(_write(tmp_path, text))


def test_two_listeners_on_one_port_is_config_error_naming_both(
    tmp_path: Path,
) -> None:
    """Two actors of one node cannot listen on one port: the file is
    refused, naming both settings, before anything is started."""
    text = "[registry]\nport = 27182\n[repository]\nport = 27182\n"

    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, text))

    assert str(refused.value).startswith(
        "[registry] port and [repository] port are both 27182"
    )


def test_ports_of_actors_not_served_or_chosen_by_the_system_may_repeat(
    tmp_path: Path,
) -> None:
    """A disabled actor, the C-STORE SCP when off, and port 0 (the system
    chooses) claim no port."""
    text = (
        "[registry]\nport = 0\nfeed_port = 0\n"
        "[repository]\nenabled = false\nport = 9083\n"
        "[imaging_source]\nport = 9083\ndicom_port = 9083\n"
    )

    settings = load_settings(_write(tmp_path, text))

    assert settings.listening_ports() == [
        ("[registry] port", 0),
        ("[registry] feed_port", 0),
        ("[imaging_source] port", 9083),
    ]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[imaging_source]\nae_title = "A_VERY_LONG_AE_TITLE"\n', "ae_title"),
        ('[imaging_source]\nae_title = "   "\n', "ae_title"),
        ('[imaging_source]\nae_title = "BACK\\\\SLASH"\n', "ae_title"),
        ("[imaging_source]\npublish_after = -1\n", "publish_after"),
        ("[consumer]\nmax_answer_size = 1000\n", "max_answer_size must be at least"),
    ],
    ids=[
        "ae-too-long",
        "ae-blank",
        "ae-backslash",
        "publish-after-negative",
        "answer-size-too-small",
    ],
)
def test_a_value_the_node_could_not_start_with_is_refused_on_reading(
    tmp_path: Path, text: str, said: str
) -> None:
    """DICOM PS3.5 6.2: an AE title is 1 to 16 characters with no backslash;
    a quiet time is 0 seconds or more; a Consumer takes answers of 1 MiB at
    least. Refused when the file is read (and the file named), not with a
    traceback when the C-STORE SCP starts or the first fetch runs."""
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError, match=said) as refused:
        load_settings(path)

    assert str(path) in str(refused.value)


# ITI TF-3 4.2.3.1.5, DICOM PS3.5 9.1: what is no ISO OID.
NOT_OIDS = {
    "words": "not an oid",
    "one arc": "1",
    "empty arc": "1..2",
    "leading zero": "1.02.3",
    "first arc 3": "3.1",
    "trailing dot": "1.2.",
    "longer than 64": "1." + "2" * 63,
    "empty": "",
}


@pytest.mark.parametrize("value", NOT_OIDS.values(), ids=NOT_OIDS.keys())
@pytest.mark.parametrize(
    ("key", "written"),
    [
        ("assigning_authority", '"{}"'),
        ("other_assigning_authorities", '["1.2.3", "{}"]'),
    ],
    ids=["assigning_authority", "other_assigning_authorities"],
)
def test_an_assigning_authority_that_is_no_oid_is_config_error(
    tmp_path: Path, key: str, written: str, value: str
) -> None:
    """ITI TF-3 4.2.3.1.5: an assigning authority is an ISO OID; a node
    qualifying patient ids with another could register no patientId (ITI
    TF-3 4.2.3.2.16), so the file is refused, naming the setting."""
    path = _write(tmp_path, f"[node]\n{key} = {written.format(value)}\n")

    with pytest.raises(ConfigError, match=f"\\[node\\] {key} .* is not an ISO OID"):
        load_settings(path)


def test_assigning_authorities_that_are_oids_are_taken(tmp_path: Path) -> None:
    """ITI TF-3 4.2.3.1.5: the Connectathon domains and a 2.25 UUID OID."""
    path = _write(
        tmp_path,
        '[node]\nassigning_authority = "1.3.6.1.4.1.21367.13.20.1000"\n'
        'other_assigning_authorities = ["1.2.260", "2.25.1234567890123"]\n',
    )

    node = load_settings(path).node

    assert node.other_assigning_authorities == ("1.2.260", "2.25.1234567890123")


def test_a_misspelt_setting_is_refused_with_the_likely_one(tmp_path: Path) -> None:
    """A key the section does not have names the closest one it has."""
    path = _write(tmp_path, "[imaging_source]\npublish_afer = 5\n")

    with pytest.raises(ConfigError) as refused:
        load_settings(path)

    assert "publish_afer; did you mean publish_after?" in str(refused.value)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("address", ["registry.example", "h:0", "h:70000", ":2575"])
def test_a_feed_address_not_host_and_port_is_config_error(
    tmp_path: Path, address: str
) -> None:
    with pytest.raises(ConfigError, match=r"\[source\] feed_address"):
        load_settings(_write(tmp_path, f'[source]\nfeed_address = "{address}"\n'))


def test_a_feed_address_names_the_registrys_listener(tmp_path: Path) -> None:
    settings = load_settings(
        _write(tmp_path, '[source]\nfeed_address = "127.0.0.1:22575"\n')
    )
    assert settings.source.feed_target() == ("127.0.0.1", 22575)
    assert Settings().source.feed_target() is None


def test_to_toml_says_which_actors_are_not_served_and_where_they_go() -> None:
    """A site using another site's registry (``[registry] enabled = false``)
    is shown no registry or ITI-8 listener of its own, but the ones its
    transactions go to."""
    base = Settings()
    site_b = replace(
        base,
        registry=replace(base.registry, enabled=False),
        repository=replace(
            base.repository, registry_url="http://site-a:9081/xds/registry"
        ),
        consumer=replace(base.consumer, registry_url="http://site-a:9081/xds/registry"),
        source=replace(base.source, feed_address="site-a:2575"),
    )

    shown = to_toml(site_b)

    assert "# registry: http://127.0.0.1:9081/xds/registry" not in shown
    assert (
        "# registry: not served here; ITI-42 to http://site-a:9081/xds/registry, "
        "ITI-18 to http://site-a:9081/xds/registry"
    ) in shown
    assert (
        "# patient identity feed (MLLP): not served here; xdsi feed sends to "
        "site-a:2575"
    ) in shown
    assert "# repository: http://127.0.0.1:9082/xds/repository" in shown

    no_source = replace(
        base, imaging_source=replace(base.imaging_source, enabled=False)
    )
    shown = to_toml(no_source)
    assert "# imaging_source: not served here" in shown
    assert "wado-uri" not in shown


def test_advertised_host_names_the_node_in_urls_and_audit_records(
    tmp_path: Path,
) -> None:
    """A node listening on every interface names, in the URLs it gives out
    (a manifest's Retrieve URL, its endpoints) and its audit records, the
    host peers reach it by; it still binds ``host``."""
    settings = load_settings(
        _write(tmp_path, '[node]\nhost = "0.0.0.0"\nadvertised_host = "pacs.example"\n')
    )

    assert settings.node.host == "0.0.0.0"
    assert settings.node.advertised == "pacs.example"
    assert settings.url("repository") == "http://pacs.example:9082/xds/repository"
    assert settings.dicomweb_url == "http://pacs.example:9083/dicomweb"
    assert all("0.0.0.0" not in url for _, url in settings.imaging_endpoints())
    assert settings.consumer_registry_url == "http://pacs.example:9081/xds/registry"


def test_an_ipv6_host_is_bracketed_in_urls(tmp_path: Path) -> None:
    """RFC 3986 3.2.2: an IPv6 literal in a URL is in brackets; an audit
    record names it bare."""
    settings = load_settings(_write(tmp_path, '[node]\nadvertised_host = "fd00::5"\n'))

    assert settings.url("registry") == "http://[fd00::5]:9081/xds/registry"
    assert settings.dicomweb_url == "http://[fd00::5]:9083/dicomweb"
    assert settings.node.advertised == "fd00::5"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('host = "0.0.0.0"', "set \\[node\\] advertised_host"),
        ('host = "::"', "set \\[node\\] advertised_host"),
        ('host = "0.0.0.0"\nadvertised_host = "0.0.0.0"', "not a host name"),
        ('advertised_host = "pacs example/x"', "not a host name"),
    ],
    ids=["ipv4 wildcard", "ipv6 wildcard", "wildcard advertised", "not a host"],
)
def test_a_host_no_peer_can_reach_is_config_error(
    tmp_path: Path, text: str, message: str
) -> None:
    """A URL naming 0.0.0.0 leads no peer back to this node: a wildcard
    listener needs the host peers use."""
    with pytest.raises(ConfigError, match=message):
        load_settings(_write(tmp_path, f"[node]\n{text}\n"))


def test_a_max_request_size_below_the_least_is_config_error(tmp_path: Path) -> None:
    """A bound smaller than a SOAP message with a small document would refuse
    every submission: the file is refused instead."""
    with pytest.raises(ConfigError, match="max_request_size must be at least"):
        load_settings(_write(tmp_path, "[node]\nmax_request_size = 1000\n"))


# What a Consumer cannot use: each would fail every fetch of its peer or
# study, after the others, instead of the file being refused on reading.
CONSUMER_VALUES_NOT_USABLE = {
    "registry url of ftp": (
        '[consumer]\nregistry_url = "ftp://site-a/xds/registry"\n',
        r"\[consumer\] registry_url .* is no http:// or https:// URL",
    ),
    "registry url without scheme": (
        '[consumer]\nregistry_url = "site-a:9081/xds/registry"\n',
        r"\[consumer\] registry_url .* is no http:// or https:// URL",
    ),
    "repository url of ftp": (
        '[consumer.repositories]\n"1.2.3" = "ftp://site-a/xdsi"\n',
        r"\[consumer.repositories\] 1.2.3 = .* is no http:// or https:// URL",
    ),
    "repository url naming no host": (
        '[consumer.repositories]\n"1.2.3" = "http:///xdsi"\n',
        r"\[consumer.repositories\] 1.2.3 = .* is no http:// or https:// URL",
    ),
    "repository id no oid": (
        '[consumer.repositories]\n"site-a" = "http://site-a/xdsi"\n',
        r"\[consumer.repositories\] 'site-a' is no repositoryUniqueId",
    ),
    "transfer syntax no uid": (
        '[consumer]\ntransfer_syntaxes = ["explicit little endian"]\n',
        r"\[consumer\] transfer_syntaxes .* is no Transfer Syntax UID",
    ),
}


@pytest.mark.parametrize(
    ("text", "said"),
    CONSUMER_VALUES_NOT_USABLE.values(),
    ids=CONSUMER_VALUES_NOT_USABLE.keys(),
)
def test_a_consumer_value_no_fetch_could_use_is_config_error(
    tmp_path: Path, text: str, said: str
) -> None:
    """ITI TF-2 3.18.4, 3.43.4 and RAD TF-3 4.69.4 go over HTTP to the URLs
    configured; a repositoryUniqueId is an OID (ITI TF-3 4.2.3.2.18) and a
    RAD-69 request lists Transfer Syntax UIDs (RAD TF-3 4.69.4.1.2). The
    file is refused, naming the setting, before any fetch."""
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError, match=said) as refused:
        load_settings(path)

    assert str(path) in str(refused.value)


def test_consumer_urls_and_syntaxes_that_can_be_used_are_taken(
    tmp_path: Path,
) -> None:
    """http and https URLs, an IPv6 literal among them, and Transfer Syntax
    UIDs are taken as written."""
    path = _write(
        tmp_path,
        '[consumer]\nregistry_url = "https://site-a:9081/xds/registry"\n'
        'transfer_syntaxes = ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"]\n'
        '[consumer.repositories]\n"1.2.3" = "http://[::1]:9083/xdsi/imaging-source"\n',
    )

    consumer = load_settings(path).consumer

    assert consumer.registry_url == "https://site-a:9081/xds/registry"
    assert consumer.repositories == {"1.2.3": "http://[::1]:9083/xdsi/imaging-source"}
    assert consumer.transfer_syntaxes == (
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.1",
    )
