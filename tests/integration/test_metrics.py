"""The metrics endpoint over real TCP on 127.0.0.1, and `mcrelay top` as a user runs it.

The endpoint tests run `serve_metrics` in-process; the daemon tests start a real supervisor with
``--metrics-listen 127.0.0.1:PORT`` (a port found free by binding port 0 first) and read
/metrics with a raw socket. Every process a test starts is ended by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from mcrelay.system.metrics import Limits, MetricsListenError, open_metrics_listeners, serve_metrics
from tests.lab.daemon import Daemon, daemon, wait_for

MCRELAY = [sys.executable, "-m", "mcrelay"]
RULE = ["--input-interface", "in0", "--input-group", "239.1.1.1", "--input-port", "5000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/metrics") -> tuple[str, dict[str, str], str]:
    """One request with a raw socket; the server closes after its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body.decode()


async def trio_get(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    return reply


# --- the endpoint in-process ------------------------------------------------------------------


async def test_serves_over_tcp_and_reports_its_port() -> None:
    async def snapshot() -> str:
        return "mcrelay_rules 3\n"

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ((host, port),) = await nursery.start(serve_metrics, "127.0.0.1:0", snapshot)
            assert host == "127.0.0.1" and port > 0
            reply = await trio_get(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
            assert reply.endswith(b"\r\n\r\nmcrelay_rules 3\n")
            reply = await trio_get(port, b"GET /other HTTP/1.0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 404 Not Found\r\n")
            nursery.cancel_scope.cancel()


async def test_clients_beyond_the_limit_wait_unaccepted() -> None:
    async def snapshot() -> str:
        return "ok\n"

    limits = Limits(max_clients=2, read_timeout=30)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            serve = partial(serve_metrics, limits=limits)
            ((_, port),) = await nursery.start(serve, "127.0.0.1:0", snapshot)
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            third = await trio.open_tcp_stream("127.0.0.1", port)  # sits in the backlog
            await third.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            with trio.move_on_after(0.3) as waited:
                await third.receive_some()
            assert waited.cancelled_caught, "served although both slots were taken"
            await idle[0].aclose()  # frees a slot: the third is accepted and served
            reply = await third.receive_some()
            assert reply.startswith(b"HTTP/1.0 200 OK")
            for stream in (idle[1], third):
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = f"cannot listen for metrics on 127.0.0.1:{port}: Address already in use"
        with pytest.raises(MetricsListenError, match=message):
            await open_metrics_listeners(f"127.0.0.1:{port}")


# --- a real daemon ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("metrics")
    with daemon(tmp, "--num-workers", "1", "--metrics-listen", f"127.0.0.1:{port}") as d:
        d.wait_running()
        d.ok("add", *RULE, "--output", "239.2.2.2:5000:out0", "--id", "cam")
        yield d, port


def test_daemon_metrics(relay: tuple[Daemon, int]) -> None:
    _, port = relay
    status, headers, body = http_get(port)
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = body.splitlines()
    assert "mcrelay_rules 1" in lines
    assert 'mcrelay_rule_state{rule="cam",state="unresolved"} 1' in lines  # no interface in0
    assert 'mcrelay_rule_packets_in_total{rule="cam"} 0' in lines
    assert 'mcrelay_output_errors_total{rule="cam",output="239.2.2.2:5000:out0"} 0' in lines
    assert 'mcrelay_worker_state{worker="data-0",state="running"} 1' in lines
    assert 'mcrelay_worker_restarts_total{worker="control",kind="control"} 0' in lines
    assert "# TYPE mcrelay_drops_total counter" in lines
    assert http_get(port, "/")[0] == "HTTP/1.0 404 Not Found"


def test_top_once(relay: tuple[Daemon, int]) -> None:
    d, _ = relay
    frame = [" ".join(line.split()) for line in d.ok("top", "--once").splitlines()]
    assert "workers 2/2 running rules 1 (1 unresolved) in 0.0 pps 0 bit/s" in frame
    assert any(line.startswith("data-0 data ") and " running 0 " in line for line in frame)
    assert "cam unresolved 0.0 0 bit/s 239.2.2.2:5000:out0 0.0 0 bit/s 0" in frame


@contextlib.contextmanager
def top(tmp: Path, socket_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    out = tmp / "top.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [*MCRELAY, "top", "--socket", str(socket_path), "--interval", "0.2"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "120"},
        )
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_top_refreshes_until_ctrl_c(relay: tuple[Daemon, int], tmp_path: Path) -> None:
    d, _ = relay
    with top(tmp_path, d.socket) as (proc, out):
        wait_for(lambda: out.read_text().count("mcrelay top ") >= 2, timeout=8)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    text = out.read_text()
    assert "cam" in text and "Traceback" not in text


def test_top_waits_for_a_daemon_that_is_down(tmp_path: Path) -> None:
    with top(tmp_path, tmp_path / "none.sock") as (proc, out):
        wait_for(lambda: out.read_text().count("daemon unreachable") >= 2, timeout=8)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    assert "no daemon on" in out.read_text()


SCRAPERS, SCRAPES_EACH, BIG_TABLE = 16, 4, 3000


async def _scrape_crowd(port: int) -> list[bytes]:
    replies: list[bytes] = []

    async def scraper() -> None:
        for _ in range(SCRAPES_EACH):
            replies.append(await trio_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(SCRAPERS):
                nursery.start_soon(scraper)
    return replies


def test_a_crowd_of_scrapes_of_a_large_table_leaves_workers_running(tmp_path: Path) -> None:
    """16 clients scraping a 3,000-rule table at once: every reply is the full exposition (200)
    or an immediate 503, and no worker is taken for hung (same pids, no restarts)."""
    rule = '[[rule]]\ninput-interface = "in0"\ninput-group = "239.1.{a}.{b}"\ninput-port = 5000\n'
    rule += 'outputs = ["239.2.2.2:5000:out0", "239.2.2.3:5000:out1"]\n'
    conf = tmp_path / "big.toml"
    conf.write_text("\n".join(rule.format(a=n // 250, b=n % 250 + 1) for n in range(BIG_TABLE)))
    port = free_port()
    with daemon(
        tmp_path, "--num-workers", "2", "--heartbeat-timeout", "1", "--config", str(conf),
        "--metrics-listen",
        f"127.0.0.1:{port}",
    ) as d:  # fmt: skip
        before = d.wait_running(timeout=30)
        replies = trio.run(_scrape_crowd, port)
        after = d.workers()
    statuses = [reply.split(b"\r\n", 1)[0] for reply in replies]
    assert len(replies) == SCRAPERS * SCRAPES_EACH
    full = 0
    for reply, status in zip(replies, statuses, strict=True):
        head, _, body = reply.partition(b"\r\n\r\n")
        if status == b"HTTP/1.0 503 Service Unavailable":
            continue
        assert status == b"HTTP/1.0 200 OK", reply[:300]
        assert f"Content-Length: {len(body)}".encode() in head
        assert f"\nmcrelay_rules {BIG_TABLE}\n".encode() in body
        full += 1
    assert full >= SCRAPES_EACH  # the cap lets scrapes through, not only refusals
    print(f"{full} of {len(replies)} scrapes got 200, the others 503")
    for wid, w in after.items():
        assert w["state"] == "running", (wid, w)
        assert (w["pid"], w["restarts"]) == (before[wid]["pid"], 0), (wid, w)
