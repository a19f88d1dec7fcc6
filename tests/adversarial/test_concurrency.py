"""Many clients at once against a live daemon, and the control worker's connection limits.

Latencies are printed (``-s`` shows them), not asserted beyond a generous sanity bound: the
machine is small and may be busy.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel

from mcrelay.client import request
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc.replies import public
from mcrelay.rules import Output, Rule, RuleInput
from mcrelay.worker.control import MAX_CLIENTS
from tests.adversarial import (
    BASELINE_RULES,
    Baseline,
    Raw,
    assert_healthy,
    call,
    control_fd_count,
    live_daemon,
    take_baseline,
)
from tests.lab.daemon import Daemon, daemon, pid_alive, wait_for

Live = tuple[Daemon, Baseline]
CLIENTS = 200
#: Generous: a request waits at most 15 s for the supervisor (REQUEST_TIMEOUT).
SANITY_BOUND_S = 8.0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_daemon(tmp_path_factory.mktemp("concurrency")) as pair:
        yield pair


def _rule(k: int) -> Rule:
    # Distinct inputs (unicast destinations: no group membership to join on a missing interface).
    return Rule(
        id=f"cc-{k:03d}",
        input=RuleInput(interface="in0", group=f"10.77.{k // 250}.{k % 250 + 1}", port=7000),
        outputs=(Output(group="239.78.0.1", port=7000 + k, interface="out0"),),
    )


def _wire(value: Any) -> Any:
    """As it comes back from the daemon (lists, not tuples)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


def _rule_fields(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules as listed, without what the daemon adds about them (such as their state)."""
    return [{key: r[key] for key in ("id", "input", "outputs")} for r in listed]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def test_200_concurrent_clients(live: Live) -> None:
    """Every client: ping, workers, add its own rule, rules, stats, (a third remove it), workers.
    All answered correctly; the final table is exactly what the adds and removes imply."""
    d, base = live
    path = d.socket
    latency: dict[str, list[float]] = {}
    go = trio.Event()

    async def timed(kind: str, req: m.ClientRequest) -> Any:
        t0 = trio.current_time()
        result = await request(path, req)
        latency.setdefault(kind, []).append(trio.current_time() - t0)
        return public(result)  # compared in the shape --json prints

    def own_rule_listed(rules: list[dict[str, Any]], rule: Rule) -> bool:
        return _wire(rule) in _rule_fields(rules)

    async def one_client(k: int) -> None:
        rule = _rule(k)
        await go.wait()
        assert await timed("ping", m.Ping()) == {"pong": True, "protocol": m.PROTOCOL_VERSION}
        workers = await timed("workers", m.ListWorkers())
        assert [(w["id"], w["state"]) for w in workers] == [
            ("control", "running"),
            ("data-0", "running"),
        ]
        assert await timed("add", m.AddRule(rule=rule)) == {"id": rule.id}
        assert own_rule_listed(await timed("rules", m.ListRules()), rule)
        stats = await timed("stats", m.GetStats())
        assert {"rules", "drops", "kernel_drops"} <= set(stats)
        if k % 3 == 0:
            assert await timed("remove", m.RemoveRule(id=rule.id)) == {"id": rule.id}
            assert not own_rule_listed(await timed("rules", m.ListRules()), rule)
        await timed("workers", m.ListWorkers())

    t0 = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for k in range(CLIENTS):
                nursery.start_soon(one_client, k)
            await trio.lowlevel.checkpoint()
            go.set()
    elapsed = trio.current_time() - t0

    expected = sorted(
        [add.rule for add in BASELINE_RULES] + [_rule(k) for k in range(CLIENTS) if k % 3],
        key=lambda r: r.id,
    )
    assert _rule_fields(public(await request(path, m.ListRules()))) == _wire(expected)

    report = {kind: _percentiles(samples) for kind, samples in sorted(latency.items())}
    print(json.dumps({"clients": CLIENTS, "elapsed_s": round(elapsed, 2), "latency": report}))
    for kind, samples in latency.items():
        assert max(samples) < SANITY_BOUND_S, (kind, report[kind])

    # Put the table back as the module found it (one change), and check nothing was restarted.
    await request(path, m.ReplaceRules(rules=tuple(add.rule for add in BASELINE_RULES)))
    await trio.to_thread.run_sync(assert_healthy, d, base)


def _ping_ok(path: Path) -> bool:
    try:
        return bool(call(path, m.Ping(), timeout=5)["pong"])
    except McrelayError:
        return False


def test_clients_beyond_max_clients_are_closed_not_hung(live: Live) -> None:
    d, base = live
    assert_healthy(d, base, fds=True)  # no client left over from before holds a slot
    control_pid = base.workers["control"][0]
    held: list[Raw] = []
    extra: list[Raw] = []
    try:
        for _ in range(MAX_CLIENTS):
            held.append(Raw(d.socket))  # connected, silent: each holds a slot for up to 30 s
        # Accepts are in arrival order, so these come after all the held ones.
        for _ in range(8):
            extra.append(Raw(d.socket))
        for conn in extra:
            outcome = conn.read_to_eof(timeout=5)
            assert outcome.closed and outcome.raw == b"", "a client beyond the limit was kept"
        assert control_fd_count(control_pid) >= MAX_CLIENTS
        with pytest.raises(McrelayError, match="closed the connection"):
            call(d.socket, m.Ping(), timeout=5)
        held.pop().close()  # one leaves: its slot is free again
        wait_for(lambda: _ping_ok(d.socket), timeout=5)
        assert not any(conn.peer_closed() for conn in held)  # the others are still served
    finally:
        for conn in held + extra:
            conn.close()
    assert_healthy(d, base, fds=True)


def test_descriptor_exhaustion_does_not_crash_the_control_worker(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE below MAX_CLIENTS, accept() fails with EMFILE: that used to end the
    control worker. Now it waits; queued clients are served once descriptors are free again."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    low_limit = ("prlimit", "--nofile=64:64", "--")
    held: list[Raw] = []
    with daemon(tmp_path, "--num-workers", "1", prefix=low_limit) as d:
        base = take_baseline(d)
        control_pid = base.workers["control"][0]
        try:
            for _ in range(80):
                held.append(Raw(d.socket))  # the last ones wait in the listen backlog
            wait_for(lambda: b"cannot accept clients" in d.log.read_bytes(), timeout=5)
            assert pid_alive(control_pid)
        finally:
            for conn in held:
                conn.close()
        wait_for(lambda: _ping_ok(d.socket), timeout=5)
        assert_healthy(d, base, fds=True)
