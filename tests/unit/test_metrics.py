"""Prometheus metrics: the exposition text (pure), the listen address, and one HTTP exchange.

HTTP exchanges run over in-memory streams under the autojump clock, so timeouts are asserted
exactly without waiting; the real TCP endpoint is tested in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from mcrelay.ipc import messages as m
from mcrelay.ipc.replies import RuleInfo, Rules, Stats, WorkerInfo, Workers
from mcrelay.system.metrics import (
    CONTENT_TYPE,
    Limits,
    MetricsListenError,
    escape_label_value,
    parse_listen,
    serve_connection,
    supervisor_snapshot,
)
from mcrelay.system.metrics import render_metrics as render_typed

WORKERS: list[dict[str, Any]] = [
    {
        "id": "control",
        "kind": "control",
        "pid": 100,
        "state": "running",
        "restarts": 0,
        "rules": None,
        "backoff_remaining_s": None,
        "recent_failures": 0,
    },
    {
        "id": "data-0",
        "kind": "data",
        "pid": None,
        "state": "backoff",
        "restarts": 3,
        "rules": None,
        "backoff_remaining_s": 1.5,
        "recent_failures": 3,
    },
]
RULES: list[dict[str, Any]] = [
    {
        "id": "cam2",
        "input": {"interface": "in0", "group": "239.1.1.2", "port": 5000, "source": None},
        "outputs": [{"group": "239.10.1.2", "port": 5000, "interface": "out0", "ttl": 16}],
        "state": "paused",
    }
]
STATS: dict[str, Any] = {
    "rules": [
        {
            "id": "cam2",
            "packets_in": 10,
            "bytes_in": 13160,
            "pps_in": 1.0,
            "bps_in": 10528.0,
            "outputs": [
                {
                    "output": "239.10.1.2:5000:out0",
                    "packets": 9,
                    "bytes": 11844,
                    "errors": 1,
                    "pps": 1.0,
                    "bps": 9475.2,
                }
            ],
        }
    ],
    "drops": {"no_rule": 4, "outgoing": 2},
    "kernel_drops": 7,
    "interval_s": 1.0,
}


def workers_of(workers: list[dict[str, Any]]) -> list[WorkerInfo]:
    """Fixtures in the shape ``--json`` prints, as the reply types the daemon answers with."""
    return msgspec.convert(workers, list[WorkerInfo])


def stats_of(stats: dict[str, Any]) -> Stats:
    return msgspec.convert(stats, Stats)


def rules_of(rules: list[dict[str, Any]]) -> list[RuleInfo]:
    return msgspec.convert(rules, list[RuleInfo])


def render_metrics(
    workers: list[dict[str, Any]], stats: dict[str, Any], rules: list[dict[str, Any]]
) -> str:
    return render_typed(workers_of(workers), stats_of(stats), rules_of(rules))


# One line of the text format: a comment, or name{labels} value.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{{_LABEL}(?:,{_LABEL})*\}})? "
    r"(?:-?[0-9.]+(?:e[+-]?[0-9]+)?|NaN|[+-]Inf)"
)
_COMMENT = re.compile(r"# (?P<kind>HELP|TYPE) (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<rest>.*)")


def lines() -> list[str]:
    return render_metrics(WORKERS, STATS, RULES).splitlines()


def test_counters_per_rule_and_output() -> None:
    text = lines()
    assert 'mcrelay_rule_packets_in_total{rule="cam2"} 10' in text
    assert 'mcrelay_rule_bytes_in_total{rule="cam2"} 13160' in text
    out = 'rule="cam2",output="239.10.1.2:5000:out0"'
    assert f"mcrelay_output_packets_total{{{out}}} 9" in text
    assert f"mcrelay_output_bytes_total{{{out}}} 11844" in text
    assert f"mcrelay_output_errors_total{{{out}}} 1" in text
    assert "mcrelay_kernel_drops_total 7" in text
    assert "mcrelay_rules 1" in text


def test_drops_cover_documented_reasons_and_reported_ones() -> None:
    drops = [line for line in lines() if line.startswith("mcrelay_drops_total{")]
    assert 'mcrelay_drops_total{reason="no_rule"} 4' in drops
    assert 'mcrelay_drops_total{reason="fragment"} 0' in drops  # known, not seen yet
    assert 'mcrelay_drops_total{reason="vlan"} 0' in drops
    assert 'mcrelay_drops_total{reason="outgoing"} 2' in drops  # reported, not documented
    assert len(drops) == 9


def test_worker_and_rule_states_are_one_hot() -> None:
    text = lines()
    states = [line for line in text if line.startswith('mcrelay_worker_state{worker="data-0"')]
    assert [line.rsplit(" ", 1)[1] for line in states] == ["0", "0", "1", "0", "0", "0"]
    assert 'mcrelay_worker_state{worker="data-0",state="backoff"} 1' in text
    assert 'mcrelay_worker_state{worker="control",state="running"} 1' in text
    assert 'mcrelay_worker_restarts_total{worker="data-0",kind="data"} 3' in text
    assert [line for line in text if line.startswith("mcrelay_rule_state")] == [
        'mcrelay_rule_state{rule="cam2",state="active"} 0',
        'mcrelay_rule_state{rule="cam2",state="paused"} 1',
        'mcrelay_rule_state{rule="cam2",state="unresolved"} 0',
        'mcrelay_rule_state{rule="cam2",state="refused"} 0',
        'mcrelay_rule_state{rule="cam2",state="failed"} 0',
    ]


def test_an_unknown_state_is_exported_not_lost() -> None:
    workers = [{**WORKERS[0], "state": "hibernating"}]
    text = render_metrics(workers, STATS, RULES).splitlines()
    assert 'mcrelay_worker_state{worker="control",state="hibernating"} 1' in text
    assert 'mcrelay_worker_state{worker="control",state="running"} 0' in text


@pytest.mark.parametrize(
    ("workers", "stats", "rules"),
    [
        (WORKERS, STATS, RULES),
        ([], {"rules": [], "drops": {}, "kernel_drops": 0, "interval_s": 0.0}, []),
    ],
)
def test_every_line_is_valid_and_families_are_contiguous(
    workers: list[dict[str, Any]], stats: dict[str, Any], rules: list[dict[str, Any]]
) -> None:
    text = render_metrics(workers, stats, rules)
    assert text.endswith("\n")
    families: list[str] = []
    types: dict[str, str] = {}
    for line in text.splitlines():
        comment = _COMMENT.fullmatch(line)
        if comment:
            if comment["kind"] == "HELP":
                assert comment["name"] not in families, f"{comment['name']} twice"
                families.append(comment["name"])
            else:
                assert comment["name"] == families[-1]
                types[comment["name"]] = comment["rest"]
            continue
        sample = _SAMPLE.fullmatch(line)
        assert sample, line
        assert sample["name"] == families[-1], f"{line} outside its family"
    for name, kind in types.items():
        assert kind in ("counter", "gauge")
        assert name.endswith("_total") == (kind == "counter")
    assert len(families) == 11


def test_label_values_are_escaped() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    rules = [{**RULES[0], "id": 'x"y'}]
    assert 'mcrelay_rule_state{rule="x\\"y",state="paused"} 1' in render_metrics([], STATS, rules)


async def test_supervisor_snapshot_asks_the_three_questions() -> None:
    asked: list[str] = []
    answers = {
        "ListWorkers": Workers(workers_of(WORKERS)),
        "GetStats": stats_of(STATS),
        "ListRules": Rules(rules_of(RULES)),
    }

    async def execute(request: m.ClientRequest) -> m.Reply:
        asked.append(type(request).__name__)
        return m.Reply(ok=True, result=answers[type(request).__name__])

    assert await supervisor_snapshot(execute) == render_metrics(WORKERS, STATS, RULES)
    assert sorted(asked) == sorted(answers)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9464", "use ADDR:PORT"),
        (":9464", "use ADDR:PORT"),
        ("localhost:9464", "'localhost' is not an IP address"),
        ("127.0.0.1", "use ADDR:PORT"),
        ("127.0.0.1:", "port must be 0-65535"),
        ("127.0.0.1:65536", "port must be 0-65535"),
        ("127.0.0.1:-1", "port must be 0-65535"),
        ("127.0.0.1:9x", "port must be 0-65535"),
        ("::1:9464", "[brackets]"),
        ("[127.0.0.1]:9464", "use ADDR:PORT"),
        ("300.1.1.1:9464", "is not an IP address"),
    ],
)
def test_parse_listen_refuses(value: str, message: str) -> None:
    with pytest.raises(MetricsListenError, match=re.escape(message)):
        parse_listen(value)


# --- one HTTP exchange over memory streams ----------------------------------------------------


async def fixed() -> str:
    return "mcrelay_rules 0\n"


async def exchange(
    request: bytes,
    snapshot: Any = fixed,
    limits: Limits = Limits(),
    *,
    close: bool = True,
) -> bytes:
    """Send ``request``, then read the reply until the server ends it."""
    client, server = trio.testing.memory_stream_pair()
    reply = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, snapshot, limits)
        if request:
            await client.send_all(request)
        if close:
            await client.send_eof()
        while chunk := await client.receive_some():
            reply += chunk
    return reply


def split(reply: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status, headers, body


async def test_get_metrics() -> None:
    status, headers, body = split(
        await exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    )
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert headers["Content-Length"] == str(len(body))
    assert headers["Connection"] == "close"
    assert body == b"mcrelay_rules 0\n"


async def test_query_string_and_bare_newlines_are_accepted() -> None:
    status, _, body = split(await exchange(b"GET /metrics?x=1 HTTP/1.0\n\n"))
    assert status == "HTTP/1.0 200 OK"
    assert body == b"mcrelay_rules 0\n"


async def test_head_has_no_body() -> None:
    status, headers, body = split(await exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Length"] == "16"
    assert body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metrics/ HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "405 Method Not Allowed"),
        (b"GET /metrics\r\n\r\n", "400 Bad Request"),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics SPDY/3\r\n\r\n", "400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "400 Bad Request"),
        (b"GET /metr\xc3\xa9 HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n", "400 Bad Request"),  # closed before the blank line
        (b"", "400 Bad Request"),
    ],
)
async def test_anything_else_is_refused(request_bytes: bytes, status: str) -> None:
    got, headers, body = split(await exchange(request_bytes))
    assert got == f"HTTP/1.0 {status}"
    assert body == f"{status}\n".encode()
    assert headers["Connection"] == "close"
    if status.startswith("405"):
        assert headers["Allow"] == "GET, HEAD"


async def test_absolute_form_target() -> None:
    status, _, _ = split(await exchange(b"GET http://h:9464/metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.0 200 OK"


async def test_oversized_head_is_refused_without_reading_it_all() -> None:
    limits = Limits(max_head=1024)
    head = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 5000 + b"\r\n\r\n"
    status, _, _ = split(await exchange(head, limits=limits))
    assert status == "HTTP/1.0 431 Request Header Fields Too Large"
    # Endless headers: refused once the limit is passed, never buffered past it.
    status, _, _ = split(
        await exchange(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 1000, limits=limits)
    )
    assert status == "HTTP/1.0 431 Request Header Fields Too Large"


async def test_head_just_under_the_limit_is_served() -> None:
    limits = Limits(max_head=1024)
    line = b"GET /metrics HTTP/1.1\r\nX: "
    head = line + b"a" * (1024 - len(line)) + b"\r\n\r\n"
    status, _, _ = split(await exchange(head, limits=limits))
    assert status == "HTTP/1.0 200 OK"


async def test_slow_client_times_out(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    reply = await exchange(b"GET /metrics HTTP/1.1\r\n", limits=Limits(read_timeout=5), close=False)
    assert split(reply)[0] == "HTTP/1.0 408 Request Timeout"
    # 5 s to give up on the head, then up to 1 s (linger) for the client to close: it never does.
    assert trio.current_time() - start == pytest.approx(6.0)


async def test_snapshot_failure_is_500_and_too_slow_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken() -> str:
        raise RuntimeError("boom")

    async def stuck() -> str:
        await trio.sleep_forever()
        raise AssertionError

    request = b"GET /metrics HTTP/1.1\r\n\r\n"
    assert split(await exchange(request, broken))[0] == "HTTP/1.0 500 Internal Server Error"
    start = trio.current_time()
    reply = await exchange(request, stuck, Limits(snapshot_timeout=2))
    assert split(reply)[0] == "HTTP/1.0 500 Internal Server Error"
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_a_client_that_never_reads_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def huge() -> str:
        return "x" * 10_000_000

    client, server = trio.testing.lockstep_stream_pair()  # no buffer: every byte waits for us
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, huge, Limits(write_timeout=3, linger=1))
        await client.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
    # Given up after the write timeout, without lingering for a client that does not read.
    assert trio.current_time() - start == pytest.approx(3.0)
