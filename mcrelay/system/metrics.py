"""Prometheus metrics: the text exposition format (0.0.4) and a minimal HTTP endpoint serving it.

`render_metrics` is pure: it turns what `mcrelay workers`, `mcrelay stats` and `mcrelay rules`
return (`mcrelay.ipc.replies`) into exposition text. `serve_metrics` answers ``GET /metrics``
(and ``HEAD``) with whatever its ``snapshot`` callable returns; anything else gets 404 (405
for another method on /metrics).

The server runs in the supervisor, so it reads as little of a request as it can: only the request
line is parsed, headers are skipped, the whole head is capped at `Limits.max_head` bytes and must
arrive within `Limits.read_timeout`, every connection is closed after one reply, and at most
`Limits.max_clients` are served at once (more wait in the listen backlog, unaccepted).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import operator
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import TypeVar

import trio
import trio.lowlevel

from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc.replies import Result, RuleInfo, Stats, WorkerInfo
from mcrelay.ipc.vocabulary import COUNTED_DROPS, RuleState, WorkerState
from mcrelay.system.accept import accept_retrying

log = logging.getLogger("mcrelay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER_STATES: tuple[str, ...] = tuple(WorkerState)
RULE_STATES: tuple[str, ...] = tuple(RuleState)
#: The documented reasons: exported as 0 until seen, so a rate() works from the first scrape.
DROP_REASONS: tuple[str, ...] = COUNTED_DROPS
R = TypeVar("R", bound=Result)


class MetricsListenError(McrelayError):
    """--metrics-listen is malformed or cannot be bound; the message says which and why."""


# --- exposition format ----------------------------------------------------------------------


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed, escaped as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Sample = tuple[Mapping[str, str], float]


class _Exposition:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[Sample],
    ) -> None:
        """One metric family: HELP, TYPE, then all its samples together, as the format wants."""
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                pairs = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                self._lines.append(f"{name}{{{pairs}}} {_number(value)}")
            else:
                self._lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


Family = tuple[str, str, str, Iterable[Sample]]


def _families(
    workers: Sequence[WorkerInfo], stats: Stats, rules: Sequence[RuleInfo]
) -> Iterator[Family]:
    """Every metric family as (name, kind, help, samples), samples generated lazily."""
    stat_rules = stats.rules
    outputs = [(r.id, o) for r in stat_rules for o in r.outputs]

    yield (
        "mcrelay_rule_packets_in_total",
        "counter",
        "Datagrams that matched the rule, since the supervisor started.",
        (({"rule": r.id}, r.packets_in) for r in stat_rules),
    )
    yield (
        "mcrelay_rule_bytes_in_total",
        "counter",
        "UDP payload bytes of the datagrams that matched the rule.",
        (({"rule": r.id}, r.bytes_in) for r in stat_rules),
    )
    for metric, help_text in (
        ("packets", "Datagrams the kernel accepted for this output."),
        ("bytes", "UDP payload bytes the kernel accepted for this output."),
        ("errors", "Datagrams whose send the kernel refused for this output."),
    ):
        count = operator.attrgetter(metric)
        yield (
            f"mcrelay_output_{metric}_total",
            "counter",
            help_text,
            (({"rule": rid, "output": o.output}, count(o)) for rid, o in outputs),
        )
    drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
    drops.update(stats.drops)
    yield (
        "mcrelay_drops_total",
        "counter",
        "Frames a data worker saw and did not relay, by reason.",
        (({"reason": reason}, count) for reason, count in drops.items()),
    )
    yield (
        "mcrelay_kernel_drops_total",
        "counter",
        "Frames the kernel dropped because a worker's receive ring was full.",
        [({}, stats.kernel_drops)],
    )
    yield (
        "mcrelay_worker_restarts_total",
        "counter",
        "Times a new process replaced an earlier one in this worker slot.",
        (({"worker": w.id, "kind": w.kind}, w.restarts) for w in workers),
    )
    yield (
        "mcrelay_worker_state",
        "gauge",
        "1 for the worker's current state, 0 for the others.",
        (
            ({"worker": w.id, "state": state}, int(w.state == state))
            for w in workers
            for state in _states(WORKER_STATES, w.state)
        ),
    )
    yield (
        "mcrelay_rule_state",
        "gauge",
        "1 for the rule's current state (input interface, refused or failed), 0 otherwise.",
        (
            ({"rule": r.id, "state": state}, int(r.state == state))
            for r in rules
            for state in _states(RULE_STATES, r.state)
        ),
    )
    yield ("mcrelay_rules", "gauge", "Relay rules in the table.", [({}, len(rules))])


def render_metrics(workers: Sequence[WorkerInfo], stats: Stats, rules: Sequence[RuleInfo]) -> str:
    """Exposition text from the results of ListWorkers, GetStats and ListRules."""
    out = _Exposition()
    for name, kind, help_text, samples in _families(workers, stats, rules):
        out.family(name, kind, help_text, samples)
    return out.text()


def _states(known: tuple[str, ...], current: str) -> tuple[str, ...]:
    """Every known state, plus the current one if it is new (a newer daemon), never dropped."""
    return known if current in known else (*known, current)


async def supervisor_snapshot(execute: Callable[[m.ClientRequest], Awaitable[m.Reply]]) -> str:
    """Exposition text built from the supervisor's own answers (pass ``Supervisor.execute``)."""

    async def ask(request: m.Request[R]) -> R:
        reply = await execute(request)  # type: ignore[arg-type]  # each is a ClientRequest
        if not reply.ok:
            raise McrelayError(f"{type(request).__name__}: {reply.error}")
        await trio.lowlevel.checkpoint()
        return m.result_of(request, reply)

    workers = (await ask(m.ListWorkers())).workers
    stats = await ask(m.GetStats())
    rules = (await ask(m.ListRules())).rules
    # Rendering a large table is ~1 s of pure Python (300,000 lines for 10,000 rules x 8
    # outputs): a thread renders it from these private copies while the event loop goes on
    # serving heartbeats and clients (the GIL is handed over every few milliseconds).
    return await trio.to_thread.run_sync(render_metrics, workers, stats, rules)


#: A scrape within this many seconds of the last rendering is answered with that rendering.
SNAPSHOT_MAX_AGE = 1.0


class CachedSnapshot:
    """Renders at most once per ``max_age`` seconds; scrapes in between, and scrapes that arrive
    while a rendering is under way, share its text, so N scrapers cost the supervisor one."""

    def __init__(
        self, render: Callable[[], Awaitable[str]], *, max_age: float = SNAPSHOT_MAX_AGE
    ) -> None:
        self._render = render
        self._max_age = max_age
        self._text: str | None = None
        self._rendered_at = -math.inf
        self._lock = trio.Lock()

    async def __call__(self) -> str:
        async with self._lock:
            if self._text is None or trio.current_time() - self._rendered_at >= self._max_age:
                self._text = await self._render()
                self._rendered_at = trio.current_time()
            return self._text


# --- listen address -------------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """``ADDR:PORT`` (IPv4) or ``[ADDR]:PORT`` (IPv6) to ``(address, port)``; port 0 = any free."""
    usage = "use ADDR:PORT, e.g. 127.0.0.1:9464 or [::1]:9464"
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise MetricsListenError(f"{value!r}: {usage}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MetricsListenError(f"{value!r}: {host!r} is not an IP address ({usage})") from None
    if address.version == 6 and not bracketed:
        raise MetricsListenError(f"{value!r}: put an IPv6 address in [brackets]")
    if address.version == 4 and bracketed:
        raise MetricsListenError(f"{value!r}: {usage}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise MetricsListenError(f"{value!r}: port must be 0-65535")
    return str(address), int(port_text)


async def open_metrics_listeners(listen: str) -> list[trio.SocketListener]:
    """Bind the endpoint; a bad value or a failed bind is a `MetricsListenError`."""
    host, port = parse_listen(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    except OSError as exc:
        raise MetricsListenError(
            f"cannot listen for metrics on {listen}: {exc.strerror or exc}"
        ) from None


# --- the HTTP endpoint ----------------------------------------------------------------------

BACKLOG = 128
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    #: The request head (request line and headers) must arrive within this time.
    read_timeout: float = 5.0
    #: A client that does not take its reply within this time is disconnected.
    write_timeout: float = 10.0
    #: Longest request head accepted, bytes.
    max_head: int = 8192
    #: Connections served at once; more wait, unaccepted, in the listen backlog.
    max_clients: int = 16
    #: Scrapes served at once; one more is answered 503 at once, so a crowd of scrapers never
    #: queues work on the supervisor's event loop.
    max_scrapes: int = 4
    #: How long rendering may take before the scrape gets a 500.
    snapshot_timeout: float = 5.0
    #: After replying, unread client bytes are drained this long so closing does not reset the
    #: connection before the client read its reply.
    linger: float = 1.0


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def serve_metrics(
    listen: str | Sequence[trio.SocketListener],
    snapshot: Callable[[], Awaitable[str]],
    *,
    limits: Limits = Limits(),
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` until cancelled; ``started`` with the bound (address, port)s.

    ``listen`` is ``ADDR:PORT`` or listeners from `open_metrics_listeners` (bind before starting
    the task so a bind failure is a plain error, not one wrapped in the nursery's group). The
    listeners are closed when this returns.
    """
    listeners = await open_metrics_listeners(listen) if isinstance(listen, str) else list(listen)
    try:
        addresses = [_address(listener) for listener in listeners]
        slots = trio.Semaphore(limits.max_clients)
        scrapes = trio.CapacityLimiter(limits.max_scrapes)
        serve = partial(serve_connection, snapshot=snapshot, limits=limits, scrapes=scrapes)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, slots, serve)
            for host, port in addresses:
                log.info("metrics on http://%s/metrics", _hostport(host, port))
            task_status.started(addresses)
    finally:
        for listener in listeners:
            listener.socket.close()  # no checkpoint here: it could hide the error in flight


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return str(name[0]), int(name[1])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _accept_loop(
    listener: trio.SocketListener,
    slots: trio.Semaphore,
    serve: Callable[[trio.abc.HalfCloseableStream], Awaitable[None]],
) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            # A slot first, then accept: excess clients cost a backlog entry, not a descriptor.
            await slots.acquire()
            try:
                stream = await accept_retrying(listener.accept, log, "metrics: cannot accept")
            except OSError as exc:
                slots.release()
                # Not worth the supervisor's life: the endpoint stops, the daemon goes on.
                log.error("metrics: endpoint stopped: accept failed: %s", exc)
                return
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_client, stream, slots, serve)


async def _client(
    stream: trio.abc.HalfCloseableStream,
    slots: trio.Semaphore,
    serve: Callable[[trio.abc.HalfCloseableStream], Awaitable[None]],
) -> None:
    try:
        await serve(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to tell it
    except Exception:  # a bug serving one scrape must not take the supervisor down
        log.exception("metrics: serving a client failed")
    finally:
        await trio.aclose_forcefully(stream)
        slots.release()


async def serve_connection(
    stream: trio.abc.HalfCloseableStream,
    snapshot: Callable[[], Awaitable[str]],
    limits: Limits = Limits(),
    scrapes: trio.CapacityLimiter | None = None,
) -> None:
    """Read one request from ``stream`` and write one reply; the caller closes the stream.

    ``scrapes`` caps concurrent scrapes across connections (a private one of
    ``limits.max_scrapes`` when not given); a scrape over the cap is answered 503 at once.
    """
    if scrapes is None:
        scrapes = trio.CapacityLimiter(limits.max_scrapes)
    status, head_only, body = 200, False, b""
    holding = False
    try:
        try:
            with trio.fail_after(limits.read_timeout):
                method, path = parse_request_line(await _read_head(stream, limits.max_head))
            head_only = method == "HEAD"
            if path != "/metrics":
                status = 404
            elif method not in ("GET", "HEAD"):
                status = 405
            else:
                try:
                    scrapes.acquire_nowait()
                    holding = True
                except trio.WouldBlock:
                    status = 503
                else:
                    try:
                        with trio.fail_after(limits.snapshot_timeout):
                            body = (await snapshot()).encode()
                    except Exception:  # a failed scrape is a 500, never a dead endpoint
                        log.exception("metrics: rendering failed")
                        status = 500
        except _BadRequest as exc:
            status = exc.status
        except trio.TooSlowError:
            status = 408
        if status != 200:
            body = f"{status} {_REASONS[status]}\n".encode()
        with trio.move_on_after(limits.write_timeout) as sending:
            await stream.send_all(_response(status, body, head_only=head_only))
    finally:
        if holding:
            scrapes.release()
    if sending.cancelled_caught:
        return  # it does not read: nothing more to wait for
    with trio.move_on_after(limits.linger):
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass


async def _read_head(stream: trio.abc.ReceiveStream, max_head: int) -> bytes:
    """Bytes up to the blank line that ends the request head (headers are not parsed)."""
    head = b""
    while True:
        end = head.find(b"\r\n\r\n")
        if end < 0:
            end = head.find(b"\n\n")  # bare LF: tolerated, as most servers do
        if end >= 0:
            if end > max_head:
                raise _BadRequest(431)
            return head[:end]
        if len(head) > max_head:
            raise _BadRequest(431)
        chunk = await stream.receive_some(max_head + 4 - len(head))
        if not chunk:
            raise _BadRequest(400)  # closed before the end of the head
        head += chunk


def parse_request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` from a request head; the query string is ignored."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest(400) from None
    if not method.isalpha() or not method.isupper() or not version.startswith("HTTP/1."):
        raise _BadRequest(400)
    if target.startswith(("http://", "https://")):  # absolute form: keep the path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    if not target.startswith("/"):
        raise _BadRequest(400)
    return method, target.split("?", 1)[0]


def _response(status: int, body: bytes, *, head_only: bool) -> bytes:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = [
        f"HTTP/1.0 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body
