"""Every CLI command and every validation error, as a user types them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.daemon import Daemon, cli, daemon, wait_for

IN = ["--input-interface", "in0", "--input-port", "5000"]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("cli"), "--num-workers", "1") as d:
        d.wait_running()
        yield d


@pytest.fixture(autouse=True)
def empty_table(relay: Daemon, tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    relay.ok("config", "load", str(empty))


def test_ping(relay: Daemon) -> None:
    assert relay.ok("ping") == "pong\n"


def test_add_rules_remove(relay: Daemon) -> None:
    rid = relay.ok("add", *IN, "--input-group", "239.1.1.1", "--output", "239.2.2.2:5000:out0")
    rid = rid.strip()
    assert rid.startswith("r-")
    # Same input, same id: the id is a stable hash of the input.
    again = relay.cli("add", *IN, "--input-group", "239.1.1.1", "--output", "239.2.2.3:5000:out0")
    assert again.returncode == 1 and "already exists" in again.stderr
    relay.ok(
        "add",
        *IN,
        "--input-group",
        "239.1.1.2",
        "--input-source",
        "10.0.0.5",
        "--output",
        "239.2.2.2:5001:out0:4",
        "--output",
        "10.9.9.9:7000:out1",
        "--id",
        "cam",
    )
    rules = json.loads(relay.ok("rules", "--json"))
    assert [r["id"] for r in rules] == ["cam", rid]
    cam = rules[0]
    assert cam["input"] == {
        "interface": "in0",
        "group": "239.1.1.2",
        "port": 5000,
        "source": "10.0.0.5",
        "vlan": None,
    }
    assert cam["outputs"][0] == {"group": "239.2.2.2", "port": 5001, "interface": "out0", "ttl": 4}
    table = relay.ok("rules")
    assert "cam" in table and "239.1.1.2:5000 on in0 from 10.0.0.5" in table
    assert relay.ok("remove", "cam") == "removed cam\n"
    gone = relay.cli("remove", "cam")
    assert gone.returncode == 1 and "no rule with id 'cam'" in gone.stderr
    assert relay.workers()["data-0"]["rules"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-group", "239.1.1", "--output", "239.2.2.2:5000:o"], "not an IPv4 address"),
        (["--input-group", "224.0.0.5", "--output", "239.2.2.2:5000:o"], "link-local"),
        (["--input-group", "239.1.1.1", "--output", "239.2.2.2:70000:o"], "outside 1-65535"),
        (["--input-group", "239.1.1.1", "--output", "239.2.2.2:5000"], "ADDR:PORT:INTERFACE"),
        (["--input-group", "239.1.1.1", "--output", "239.1.1.1:5000:in0"], "loop"),
        (["--input-group", "239.1.1.1", "--output", "239.2.2.2:5000:o", "--id", "a b"], "rule id"),
    ],
)
def test_add_validation(relay: Daemon, args: list[str], message: str) -> None:
    result = relay.cli("add", *IN, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(relay.ok("rules", "--json")) == []


def test_add_port_and_missing_output(relay: Daemon) -> None:
    bad_port = relay.cli(
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.1",
        "--input-port",
        "0",
        "--output",
        "239.2.2.2:5000:o",
    )
    assert bad_port.returncode == 2 and "outside 1-65535" in bad_port.stderr
    no_output = relay.cli("add", *IN, "--input-group", "239.1.1.1")
    assert no_output.returncode == 2 and "--output" in no_output.stderr


def test_workers_table_and_json(relay: Daemon) -> None:
    workers = json.loads(relay.ok("workers", "--json"))
    assert {w["id"] for w in workers} == {"control", "data-0"}
    for w in workers:
        assert set(w) >= {"id", "kind", "pid", "state", "restarts", "rules", "backoff_remaining_s"}
        assert w["state"] == "running"
    assert next(w for w in workers if w["kind"] == "control")["rules"] is None
    assert relay.ok("workers").splitlines()[0].split() == [
        "ID",
        "KIND",
        "PID",
        "STATE",
        "RESTARTS",
        "RULES",
        "BACKOFF",
        "FAILED",
    ]


def test_stats(relay: Daemon) -> None:
    relay.ok("add", *IN, "--input-group", "239.1.1.1", "--output", "239.2.2.2:5000:out0")
    stats = json.loads(relay.ok("stats", "--json"))
    assert stats["rules"][0]["packets_in"] == 0
    assert stats["rules"][0]["outputs"][0]["output"] == "239.2.2.2:5000:out0"
    assert "drops:" in relay.ok("stats")


def test_log_level(relay: Daemon) -> None:
    assert relay.ok("log-level") == "info\n"
    assert relay.ok("log-level", "debug") == "debug\n"
    assert relay.ok("log-level") == "debug\n"
    bad = relay.cli("log-level", "loud")
    assert bad.returncode == 2 and "unknown log level" in bad.stderr
    relay.ok("log-level", "info")


def test_restart_worker(relay: Daemon) -> None:
    old = relay.workers()["data-0"]["pid"]
    assert relay.ok("restart-worker", "data-0") == "restarting data-0\n"
    relay.wait_replaced("data-0", old)
    bad = relay.cli("restart-worker", "data-9")
    assert bad.returncode == 1 and "no worker 'data-9'" in bad.stderr


def test_config_save_show_check_load(relay: Daemon, tmp_path: Path) -> None:
    relay.ok(
        "add", *IN, "--input-group", "239.1.1.1", "--output", "239.2.2.2:5000:out0:3", "--id", "a"
    )
    saved = tmp_path / "rules.toml"
    assert "1 rule(s) saved" in relay.ok("config", "save", str(saved))
    assert relay.ok("config", "show") == saved.read_text()
    assert "1 rule(s), valid" in cli("config", "check", str(saved)).stdout
    relay.ok("remove", "a")
    assert "1 added or changed, 0 removed" in relay.ok("config", "load", str(saved))
    assert [r["id"] for r in json.loads(relay.ok("rules", "--json"))] == ["a"]


def test_config_errors_change_nothing(relay: Daemon, tmp_path: Path) -> None:
    relay.ok("add", *IN, "--input-group", "239.1.1.1", "--output", "239.2.2.2:5000:out0")
    before = relay.ok("rules", "--json")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rule]]\ninput-interface = "in0"\ninput-group = "239.1.1.9"\n'
        'input-port = 99999\noutputs = ["239.2.2.2:5000:o"]\n'
    )
    for result in (cli("config", "check", str(bad)), relay.cli("config", "load", str(bad))):
        assert result.returncode == 2
        assert "rule 1 (line 1)" in result.stderr and "outside 1-65535" in result.stderr
    missing = relay.cli("config", "load", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert relay.ok("rules", "--json") == before


def test_supervisor_config_option(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(
        '[[rule]]\nid = "boot"\ninput-interface = "in0"\ninput-group = "239.1.1.1"\n'
        'input-port = 5000\noutputs = ["239.2.2.2:5000:out0"]\n'
    )
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert d.wait_running()["data-0"]["rules"] == 1
    conf.write_text("not toml [")
    result = cli(
        "supervisor",
        "--control-socket",
        str(tmp_path / "x.sock"),
        "--config",
        str(conf),
        "--state-dir",
        str(tmp_path / "x-state"),
    )
    assert result.returncode == 2 and str(conf) in result.stderr


def test_daemon_not_running(tmp_path: Path) -> None:
    for args in (["ping"], ["workers", "--json"], ["rules"], ["stats"], ["remove", "x"]):
        result = cli(*args, "--socket", str(tmp_path / "none.sock"))
        assert result.returncode == 1
        assert (
            result.stderr.strip()
            == f"mcrelay: mcrelay is not running (no daemon on {tmp_path / 'none.sock'})"
        )


def test_socket_from_environment(relay: Daemon) -> None:
    import os

    result = cli("ping", env={**os.environ, "MCRELAY_SOCKET": str(relay.socket)})
    assert result.stdout == "pong\n"


def test_supervisor_bad_options(tmp_path: Path) -> None:
    result = cli(
        "supervisor",
        "--control-socket",
        str(tmp_path / "s"),
        "--log-level",
        "loud",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert result.returncode == 2 and "--log-level" in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    import signal

    rule = '[[rule]]\nid = "{id}"\ninput-interface = "in0"\ninput-group = "239.1.1.{n}"\n'
    rule += 'input-port = 5000\noutputs = ["239.2.2.2:5000:out0"]\n'
    conf = tmp_path / "rules.toml"
    conf.write_text(rule.format(id="a", n=1))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        d.wait_running()
        conf.write_text(rule.format(id="b", n=2) + "\n" + rule.format(id="c", n=3))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: [r["id"] for r in json.loads(d.ok("rules", "--json"))] == ["b", "c"])
        conf.write_text("broken [")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nothing changed" in d.log.read_text())
        assert [r["id"] for r in json.loads(d.ok("rules", "--json"))] == ["b", "c"]
        assert d.workers()["data-0"]["restarts"] == 0


def test_restart_control_worker_answers_first(relay: Daemon) -> None:
    old = relay.workers()["control"]["pid"]
    assert relay.ok("restart-worker", "control") == "restarting control\n"
    relay.wait_replaced("control", old)


def test_config_check_refuses_duplicate_inputs(tmp_path: Path) -> None:
    conf = tmp_path / "dup.toml"
    one = '[[rule]]\nid = "{id}"\ninput-interface = "in0"\ninput-group = "239.1.1.1"\n'
    one += 'input-port = 5000\noutputs = ["239.2.2.2:5000:out0"]\n'
    conf.write_text(one.format(id="a") + "\n" + one.format(id="b"))
    result = cli("config", "check", str(conf))
    assert result.returncode == 2
    assert "rule 2 (line 8): same input as rule 'a'" in result.stderr


def test_version() -> None:
    assert cli("--version").stdout.startswith("mcrelay ")


def test_same_group_on_two_interfaces_is_two_rules(relay: Daemon) -> None:
    out = ["--input-group", "239.1.1.1", "--input-port", "5000", "--output", "239.2.2.2:5000:o"]
    a = relay.ok("add", "--input-interface", "in0", *out).strip()
    b = relay.ok("add", "--input-interface", "in1", *out).strip()
    assert a != b
    assert len(json.loads(relay.ok("rules", "--json"))) == 2
