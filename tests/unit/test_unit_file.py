"""packaging/systemd/mcrelay.service: the settings that matter, and ``systemd-analyze verify``.

The unit is parsed the way systemd reads it (sections, repeated keys, comments, continuation
lines). ``systemd-analyze verify`` runs when installed (Debian: the ``systemd`` package; it needs
no running systemd), on a copy whose ExecStart points at this checkout's ``mcrelay``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from mcrelay.cli import app
from mcrelay.supervisor.persistence import DEFAULT_STATE_DIR
from mcrelay.supervisor.settings import DEFAULT_CONTROL_SOCKET

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "mcrelay.service"
INSTALLED_BINARY = "/usr/local/bin/mcrelay"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Section → key → every value given, in order (systemd's syntax, minus drop-ins)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def test_parser_handles_systemd_syntax() -> None:
    unit = parse_unit("# c\n[A]\n; c\nX=1\nX=2\nY=a\\\n  b\n\n[B]\nZ=\n")
    assert unit == {"A": {"X": ["1", "2"], "Y": ["a b"]}, "B": {"Z": [""]}}


def test_notify_and_lifecycle(service: dict[str, list[str]]) -> None:
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "10s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "KillMode": "mixed",
        "TimeoutStopSec": "10s",
        "UMask": "0007",
    }
    assert {key: one(service, key) for key in expected} == expected


def test_exec_start_matches_directories_and_client_defaults(service: dict[str, list[str]]) -> None:
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[:2] == [INSTALLED_BINARY, "supervisor"]
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options == {
        "--control-socket": "/run/mcrelay/control.sock",
        "--config": "/etc/mcrelay/rules.toml",
        "--state-dir": "/var/lib/mcrelay",
    }
    # Clients find the socket without --socket; the state is where the default puts it.
    assert Path(options["--control-socket"]) == DEFAULT_CONTROL_SOCKET
    assert Path(options["--state-dir"]) == DEFAULT_STATE_DIR
    # Each path lies in a directory systemd creates (and, for /run and /var/lib, keeps writable
    # under ProtectSystem=strict).
    assert one(service, "RuntimeDirectory") == "mcrelay"
    assert one(service, "StateDirectory") == "mcrelay"
    assert one(service, "ConfigurationDirectory") == "mcrelay"
    assert Path(options["--control-socket"]).parent == Path("/run/mcrelay")
    assert Path(options["--state-dir"]) == Path("/var/lib/mcrelay")
    assert Path(options["--config"]).parent == Path("/etc/mcrelay")


def test_exec_start_options_exist() -> None:
    """The CLI accepts every option ExecStart uses (parsed only, nothing runs)."""
    argv = shlex.split(parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]["ExecStart"][0])
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    command = group.commands["supervisor"]
    ctx = command.make_context("supervisor", argv[2:])
    assert ctx.params["state_dir"] == DEFAULT_STATE_DIR


def test_capabilities(service: dict[str, list[str]]) -> None:
    caps = one(service, "CapabilityBoundingSet").split()
    assert set(caps) == {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    assert one(service, "AmbientCapabilities") == ""  # runs as root: the bounding set suffices
    assert "User" not in service
    comments = "\n".join(
        line for line in UNIT.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    )
    for cap in caps:
        assert re.search(rf"^#\s+(CAP_\w+\s+)*{cap}\b", comments, re.M), f"{cap} not justified"


def test_hardening(service: dict[str, list[str]]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: one(service, key) for key in expected} == expected
    families = set(one(service, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_PACKET", "AF_NETLINK"}


def test_nothing_that_breaks_the_relay(service: dict[str, list[str]]) -> None:
    # No network of its own, no IP filter on its sockets, no user namespace.
    for key in ("PrivateNetwork", "IPAddressDeny", "IPAddressAllow", "PrivateUsers", "ProcSubset"):
        assert key not in service
    filters = " ".join(service.get("SystemCallFilter", []))
    for group in ("@privileged", "@resources", "@network-io", "@process", "@setuid"):
        assert group not in filters  # a deny list must not hit setuid, affinity, sockets


def test_install_section() -> None:
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    assert unit["Install"] == {"WantedBy": ["multi-user.target"]}
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Unit"]["Wants"] == ["network-online.target"]


# --- systemd-analyze verify -----------------------------------------------------------------


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    return subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _complaints(result: subprocess.CompletedProcess[str], unit_name: str) -> list[str]:
    # Unknown or unparsable settings are only warnings (exit status 0): look for them too.
    return [line for line in result.stderr.splitlines() if unit_name in line]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    binary = Path(sys.executable).with_name("mcrelay")
    if not binary.exists():
        pytest.skip(f"no mcrelay entry point next to {sys.executable}")
    if not Path("/bin/kill").exists():
        pytest.skip("/bin/kill (ExecReload=) is missing here (Debian: apt-get install procps)")
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    copy = tmp_path / "mcrelay.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={binary} "))
    result = _verify(copy)
    assert result.returncode == 0, result.stderr
    assert _complaints(result, copy.name) == []

    # The check is not vacuous: a misspelt setting is reported.
    broken = tmp_path / "broken" / "mcrelay.service"
    broken.parent.mkdir()
    broken.write_text(copy.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    assert any("WatchdogSecs" in line for line in _complaints(_verify(broken), broken.name))
