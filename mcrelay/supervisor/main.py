"""The daemon: owns the control socket on disk, runs the core, stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import trio

from mcrelay import config
from mcrelay.errors import ConfigError, McrelayError, RuleError, SupervisorRunning, describe
from mcrelay.rules import Rule
from mcrelay.supervisor import precedence
from mcrelay.supervisor.core import CapturePlumbing, Supervisor
from mcrelay.supervisor.launcher import Launcher, SpawnerLauncher
from mcrelay.supervisor.persistence import (
    RuleStore,
    SavedState,
    StateNotDurable,
    UnreadableState,
)
from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.slot import WorkerFatal
from mcrelay.system import netlink
from mcrelay.system.metrics import (
    CachedSnapshot,
    open_metrics_listeners,
    serve_metrics,
    supervisor_snapshot,
)
from mcrelay.system.notify import SystemdNotifier
from mcrelay.system.paths import ensure_safe_directory, open_lock_file

log = logging.getLogger("mcrelay.supervisor")

LISTEN_BACKLOG = 512
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass
class Signals:
    """The supervisor's signals, received for its whole life (see :func:`held_signals`)."""

    receiver: AsyncIterator[int]
    stopping: bool = False


@contextlib.contextmanager
def held_signals() -> Iterator[Signals]:
    """SIGTERM, SIGINT and SIGHUP are delivered to the supervisor's signal task from before
    any worker exists until after the socket is removed, so a second stop signal during the
    stop changes nothing. Once a stop began, they stay ignored until the process exits."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    held: Signals | None = None
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as receiver:
            held = Signals(receiver)
            yield held
    finally:
        if held is None or not held.stopping:  # ends otherwise: give the handlers back
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def control_socket(
    path: Path, group: int | None = None, *, open_to_all: bool = False
) -> Iterator[socket.socket]:
    """Bind the control socket, refusing if a live supervisor owns the path.

    Ownership is an flock on ``PATH.lock`` held for the supervisor's lifetime: the kernel drops it
    when the process dies however it dies, so a stale socket file is told apart from a live one
    without guessing, and is replaced.

    The file is 0660 (owner and ``group``); ``open_to_all`` (a read-only group exists besides
    the socket's group, and a file has one group owner) makes it 0666: the daemon's own
    SO_PEERCRED check (`mcrelay.system.peers`) is what decides who may do what either way.
    """
    ensure_safe_directory(path.parent, "control socket directory")
    lock_path = path.with_name(path.name + ".lock")
    lock = open_lock_file(lock_path)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                owner = os.pread(lock, 64, 0).decode(errors="replace").strip() or "?"
                raise SupervisorRunning(
                    f"another mcrelay supervisor (pid {owner}) is running on {path}"
                ) from None
            raise
        os.ftruncate(lock, 0)  # our own regular file: open_lock_file followed no link
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: its owner is gone, or we could not have taken the lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _bind_private(sock, path, 0o666 if open_to_all else 0o660, group)
            sock.listen(LISTEN_BACKLOG)
            yield sock
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            # The lock file stays: unlinking it while locked would let two starters race.
    finally:
        os.close(lock)


def _bind_private(sock: socket.socket, path: Path, mode: int, group: int | None) -> None:
    """Bind ``sock`` at ``path`` with ``mode`` and ``group`` and no window for a swapped name.

    Linux applies the umask to an AF_UNIX socket file and ignores fchown of the socket for it
    (fchmod before bind is honoured, but masked), so the mode and group are set by path, inside
    a fresh 0700 directory nobody else can enter; the finished file is then renamed into place.
    See mcrelay.system.peers for who may do what.
    """
    private = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    inside = private / path.name
    try:
        sock.bind(str(inside))
        os.chmod(inside, mode)
        if group is not None:
            os.chown(inside, -1, group)
        os.rename(inside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            inside.unlink()
        private.rmdir()


async def run_daemon(settings: SupervisorSettings, launcher: SpawnerLauncher, **kwargs: Any) -> int:
    """:func:`serve` with the worker spawner kept running around it (it must outlive the
    workers: they die with it, and stopping them softly needs its exit reports)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.run)
        code = await serve(settings, launcher, **kwargs)
        nursery.cancel_scope.cancel()
    return code


async def serve(
    settings: SupervisorSettings,
    launcher: Launcher,
    *,
    initial_rules: tuple[Rule, ...] = (),
    captures: CapturePlumbing,
    config_file: Path | None = None,
    store: RuleStore | None = None,
    metrics_listen: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; the process exit code.

    ``initial_rules`` are the rules of ``config_file``; which of them and the saved table
    (``store``) the daemon starts with is `mcrelay.supervisor.precedence`'s rule.
    """
    # Takes NOTIFY_SOCKET/WATCHDOG_* out of os.environ before any worker exists.
    with (
        held_signals() as signals,
        SystemdNotifier.from_environment() as notifier,
        control_socket(
            settings.control_socket,
            settings.socket_gid,
            open_to_all=settings.read_gid is not None,
        ) as listener,
    ):
        sup = Supervisor(
            settings,
            launcher,
            table=RuleTable(),
            listen_fd=listener.fileno(),
            captures=captures,
            store=store,
        )
        for line in settings.policy.describe():
            log.info("access policy: %s", line)
        start_rules(sup, config_file, initial_rules)
        table = sup.table
        # Bound before any worker starts: a taken port is a plain error (exit 2), not a group.
        metrics = await open_metrics_listeners(metrics_listen) if metrics_listen else []
        netlink.probe_socket()  # kept open: looking at interfaces never needs a new descriptor
        fatal = False
        log.info(
            "supervisor %d on %s: %d data workers, %d rules",
            os.getpid(),
            settings.control_socket,
            settings.num_workers,
            len(table),
        )
        try:
            async with trio.open_nursery() as nursery:
                if metrics:
                    snapshot = CachedSnapshot(partial(supervisor_snapshot, sup.execute))
                    nursery.start_soon(serve_metrics, metrics, snapshot, name="metrics")
                nursery.start_soon(notifier.watchdog_loop)  # fed by this loop: a hang stops it
                nursery.start_soon(_handle_signals, signals, nursery, sup, config_file, notifier)
                await nursery.start(sup.run)
                notifier.status(f"starting {len(sup.slots)} workers")
                await sup.wait_all_running()
                notifier.ready(status_line(sup))
        except* WorkerFatal as group:
            why = describe(group)  # every worker that went fatal: two can fail at once
            log.critical("%s: exiting (--exit-on-fatal)", why)
            notifier.stopping(f"exiting: {why}")
            fatal = True
        finally:
            sup.captures.close()
            sup.counter_pages.close()
    if fatal:
        return 3
    log.info("supervisor stopped")
    return 0


def status_line(sup: Supervisor) -> str:
    """For ``systemctl status``."""
    line = f"{len(sup.slots)} workers running, {len(sup.table)} rules"
    if sup.state_moved_aside is not None:
        line += f"; the saved rule table was unreadable and moved aside to {sup.state_moved_aside}"
    return line


def start_rules(sup: Supervisor, config_file: Path | None, file_rules: tuple[Rule, ...]) -> None:
    """Load the table the daemon starts with: the saved one or the --config file's (see
    `mcrelay.supervisor.precedence`), logged in one line; an unreadable state file is moved
    aside and the daemon starts from the file (or empty)."""
    store = sup.store
    saved = _restore(sup, config_file)
    if config_file is None or store is None:
        rules = saved.rules if saved is not None else file_rules
        sup.load(rules)
        if saved is not None:
            log.info("restored %d rules from %s", len(saved.rules), store.path if store else "")
        return
    if saved is None:
        outcome = precedence.decide(file_rules, (), None, keep_runtime=False)
        sup.load(outcome.rules)
        log.info("loaded %d rules from %s (no saved table)", len(file_rules), config_file)
    else:
        outcome = precedence.decide(
            file_rules, saved.rules, saved.seed, keep_runtime=sup.settings.keep_runtime_rules
        )
        if outcome.file_unchanged:
            sup.load(saved.rules)
            log.info(
                "config file %s unchanged since the saved table was made from it: restored "
                "%d rules from %s (runtime changes kept)",
                config_file,
                len(saved.rules),
                store.path,
            )
            return
        sup.load(outcome.rules)
        _log_outcome(outcome, config_file, "the saved table", len(file_rules))
    store.seed = outcome.seed
    try:
        store.save(sup.saved_rules())
    except StateNotDurable as exc:
        log.warning("%s", exc)


def _restore(sup: Supervisor, config_file: Path | None) -> SavedState | None:
    """The saved table, or None; an unreadable one is moved aside (and None)."""
    store = sup.store
    if store is None:
        return None
    try:
        saved = store.load()
        if saved is not None:
            RuleTable().replace(saved.rules)  # its rules must also make a consistent set
        return saved
    except (UnreadableState, RuleError) as exc:
        aside = store.move_aside()
        store.seed = None
        start = f"the rules of {config_file}" if config_file is not None else "no rules"
        log.error(
            "the saved rule table is unreadable (%s): moved aside to %s; starting with %s",
            exc,
            aside,
            start,
        )
        return None


def _log_outcome(
    outcome: precedence.Outcome, config_file: Path, table: str, count: int, prefix: str = ""
) -> None:
    """The one line that says why the file won and what that changed."""
    if outcome.no_seed:
        why = f"{table} records no config file it was made from, so {config_file} wins"
    else:
        why = f"config file {config_file} changed since {table} was made from it"
    level = logging.WARNING if outcome.dropped or outcome.clashing else logging.INFO
    what = precedence.describe(outcome)
    rules = precedence.plural_rules(count) + (" applies" if count == 1 else " apply")
    log.log(level, "%s%s: its %s: %s", prefix, why, rules, what)


async def _handle_signals(
    signals: Signals,
    nursery: trio.Nursery,
    sup: Supervisor,
    config_file: Path | None,
    notifier: SystemdNotifier,
) -> None:
    """SIGTERM/SIGINT stop the daemon (once: repeats are logged and change nothing); SIGHUP
    reloads the --config file. Neither waits here: this loop always takes the next signal."""
    reloads_send, reloads = trio.open_memory_channel[None](1)
    nursery.start_soon(_reload_loop, reloads, signals, sup, config_file, notifier)
    async for signum in signals.receiver:
        name = signal.Signals(signum).name
        if signals.stopping:
            log.info("%s: already stopping", name)
        elif signum == signal.SIGHUP:
            with contextlib.suppress(trio.WouldBlock):  # one pending reload reads the newest file
                reloads_send.send_nowait(None)
        else:
            signals.stopping = True
            log.info("%s: stopping", name)
            notifier.stopping(f"{name}: stopping workers")
            nursery.start_soon(_stop, nursery.cancel_scope, sup)


async def _stop(scope: trio.CancelScope, sup: Supervisor) -> None:
    """Workers first, in order, each softly then hard (bounded by the stop grace), then the rest."""
    # sup.stop() is bounded by the stop grace per step already; this bounds a process that
    # even SIGKILL does not end at once (uninterruptible sleep): cancelling still reaps it.
    with trio.move_on_after(3 * sup.settings.stop_grace + 1):
        await sup.stop()
    scope.cancel()


async def _reload_loop(
    reloads: trio.MemoryReceiveChannel[None],
    signals: Signals,
    sup: Supervisor,
    config_file: Path | None,
    notifier: SystemdNotifier,
) -> None:
    async for _ in reloads:
        if signals.stopping:
            return
        notifier.reloading(f"reloading {config_file}")
        await reload_config(sup, config_file)
        notifier.reloaded(status_line(sup))  # READY=1 again (only if it was ready)


async def reload_config(sup: Supervisor, config_file: Path | None) -> None:
    """Apply the difference between the file and the table; a bad file changes nothing."""
    if config_file is None:
        log.warning("SIGHUP: the supervisor was started without --config: nothing to reload")
        return
    try:
        rules = config.load(config_file)
    except ConfigError as exc:
        log.error("SIGHUP: %s; nothing changed", exc)
        return
    keep = sup.settings.keep_runtime_rules
    outcomes: list[precedence.Outcome] = []

    def choose(table: tuple[Rule, ...]) -> tuple[tuple[Rule, ...], precedence.Seed]:
        seed = sup.store.seed if sup.store is not None else None
        outcomes.append(precedence.decide(rules, table, seed, keep_runtime=keep))
        return outcomes[-1].rules, outcomes[-1].seed

    try:
        # Decided under the rule-change lock, so a change made meanwhile is not undone. An
        # unchanged file still re-checks the table (the policy, failed joins and captures).
        await sup.reload_rules(choose)
    except McrelayError as exc:
        log.error("SIGHUP: %s: %s; nothing changed", config_file, exc)
        return
    except Exception:  # a bug must not take the daemon down with its signal handler
        log.exception("SIGHUP: reloading %s failed", config_file)
        return
    outcome = outcomes[-1]
    if outcome.file_unchanged:
        log.info(
            "SIGHUP: config file %s unchanged since the table was made from it: the table "
            "stays as it is (%d rules, runtime changes kept)",
            config_file,
            len(outcome.rules),
        )
    else:
        _log_outcome(outcome, config_file, "the table", len(rules), prefix="SIGHUP: ")
