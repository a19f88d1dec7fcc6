"""Large and awkward rule tables never crash-loop a worker (a real daemon, real limits).

Rules here name interfaces that do not exist: a data worker holds and acknowledges them all the
same (their outputs share one dead socket), which is what a large sync costs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_metrics import free_port, http_get
from tests.lab.daemon import Daemon, daemon, wait_for

RULES, OUTPUTS = 10_000, 8


def _table(path: Path, rules: int, outputs: int) -> Path:
    lines = []
    for r in range(rules):
        a, b = divmod(r, 250)
        outs = ", ".join(f'"239.{100 + o}.{a}.{b + 1}:6000:ghost{o}"' for o in range(outputs))
        lines += [
            "[[rule]]",
            f'id = "big-{r:05d}"',
            'input-interface = "ghostin"',
            f'input-group = "239.1.{a}.{b + 1}"',
            "input-port = 5000",
            f"outputs = [{outs}]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _json(d: Daemon, *args: str) -> Any:
    return json.loads(d.ok(*args, "--json"))


def _lifecycle_log(d: Daemon) -> str:
    """The log without the one line per rule and output a table on absent interfaces costs."""
    noise = ("does not exist", "cannot join")
    kept = [line for line in d.log.read_text().splitlines() if not any(n in line for n in noise)]
    return "\n".join(kept)[-3000:]


def _same_processes(d: Daemon, before: dict[str, dict[str, Any]]) -> None:
    for wid, w in d.workers().items():
        assert w["state"] == "running", (wid, w, _lifecycle_log(d))
        assert w["pid"] == before[wid]["pid"], (wid, "restarted", _lifecycle_log(d))


def test_ten_thousand_rules_of_eight_outputs_install_list_count_scrape_and_resync(
    tmp_path: Path,
) -> None:
    """The table's sync, its listing, its counters and its scrape are each several frames'
    worth (about 11, 16 and 24 MB): all go through, no worker is restarted, and a replaced
    worker is resynced with every rule."""
    table = _table(tmp_path / "big.toml", RULES, OUTPUTS)
    port = free_port()
    with daemon(tmp_path, "--num-workers", "1", "--metrics-listen", f"127.0.0.1:{port}") as d:
        before = d.wait_running()
        assert f"{RULES} rule(s)" in d.ok("config", "load", str(table))
        data = wait_for(lambda: (w := d.workers()["data-0"])["rules"] == RULES and w, 15)
        assert data["failed_rules"] == 0
        listed_text, stats_text = d.ok("rules", "--json"), d.ok("stats", "--json")
        listed, stats = json.loads(listed_text), json.loads(stats_text)
        assert len(listed) == RULES
        assert sum(len(r["outputs"]) for r in listed) == RULES * OUTPUTS
        assert len(stats["rules"]) == RULES
        status, _, body = http_get(port)
        assert status.endswith("200 OK"), status
        assert f"\nmcrelay_rules {RULES}\n" in body
        assert body.count("\nmcrelay_output_packets_total{") == RULES * OUTPUTS
        _same_processes(d, before)
        sizes = [len(listed_text), len(stats_text), len(body)]
        print("rules --json {:.1f} MB, stats --json {:.1f} MB, /metrics {:.1f} MB".format(
            *(size / 1e6 for size in sizes)))  # fmt: skip

        d.ok("restart-worker", "data-0")
        new = d.wait_replaced("data-0", data["pid"], timeout=15)
        resynced = wait_for(
            lambda: (
                (w := d.workers()["data-0"])["rules"] == RULES and w["state"] == "running" and w
            ),
            15,
        )
        assert resynced["digest"] == data["digest"]
        assert new["restarts"] == data["restarts"] + 1
        assert "hung" not in d.log.read_text()


def test_a_rule_that_cannot_be_installed_is_failed_and_the_others_relay(tmp_path: Path) -> None:
    """An exception installing one rule marks that rule failed, with the reason, in `rules`,
    `workers` and the metrics; the worker keeps every other rule and is never restarted."""
    fault = tmp_path / "faults"
    fault.write_text("data:install-fail\n")
    port = free_port()
    with daemon(
        tmp_path,
        "--num-workers", "1", "--metrics-listen", f"127.0.0.1:{port}",
        env={"MCRELAY_FAULT_FILE": str(fault)},
    ) as d:  # fmt: skip
        before = d.wait_running()
        for rule_id, group in (("ok-1", "239.1.1.1"), ("fail-1", "239.1.1.2")):
            d.ok(
                "add", "--id", rule_id, "--input-interface", "ghostin", "--input-group", group,
                "--input-port", "5000", "--output", "239.2.2.2:5001:ghostout",
            )  # fmt: skip
        states = wait_for(
            lambda: (
                (s := {r["id"]: r for r in _json(d, "rules")})["fail-1"]["state"] == "failed" and s
            )
        )
        assert "injected installation failure" in states["fail-1"]["reason"], states
        assert states["ok-1"]["state"] != "failed", states
        assert "fail-1 is failed: data-0: RuntimeError: injected installation failure" in d.ok(
            "rules"
        )
        data = d.workers()["data-0"]
        assert (data["rules"], data["failed_rules"]) == (2, 1), data
        _, _, body = http_get(port)
        assert 'mcrelay_rule_state{rule="fail-1",state="failed"} 1' in body
        # Removing it clears the failure; the worker was never replaced.
        d.ok("remove", "fail-1")
        wait_for(lambda: d.workers()["data-0"]["failed_rules"] == 0)
        _same_processes(d, before)
        assert d.log.read_text().count("rule fail-1 cannot be installed") == 1


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_a_change_over_the_open_file_limit_is_refused_in_one_sentence(tmp_path: Path) -> None:
    """Outputs on an interface that exists cost a socket per TTL: 255 of them, past the hard
    open-file limit (which the supervisor cannot raise), are refused, and nothing changes."""
    with daemon(
        tmp_path,
        "--num-workers", "1", "--allow-loopback",
        prefix=("prlimit", "--nofile=256:256", "--"),
    ) as d:  # fmt: skip
        before = d.wait_running()
        d.ok(
            "add", "--id", "small", "--input-interface", "ghostin", "--input-group", "239.1.1.1",
            "--input-port", "5000", "--output", "127.0.0.1:6000:lo:1",
        )  # fmt: skip
        table = tmp_path / "ttls.toml"
        table.write_text(
            "".join(
                f'[[rule]]\ninput-interface = "ghostin"\ninput-group = "239.1.2.{r + 1}"\n'
                "input-port = 5000\noutputs = ["
                + ", ".join(
                    f'"127.0.0.1:{6000 + t}:lo:{(r * 64 + t) % 255 + 1}"' for t in range(64)
                )
                + "]\n"
                for r in range(4)
            )
        )
        refused = d.cli("config", "load", str(table))
        assert refused.returncode != 0
        message = refused.stderr.strip()
        assert "open-file limit of 256" in message and "nothing changed" in message, message
        assert len(message.splitlines()) == 1, message
        assert "Traceback" not in refused.stderr
        assert [r["id"] for r in _json(d, "rules")] == ["small"]
        assert d.workers()["data-0"]["rules"] == 1
        _same_processes(d, before)
