"""One worker's lifecycle: spawn, hello, provision, heartbeat, death, backoff, again.

A slot outlives the processes it runs. Each pending backoff is a cancel scope, so an operator's
``restart-worker`` or the supervisor's shutdown simply cancels it.

Every send to a worker has a deadline (:attr:`WorkerSlot.send_deadline`): a worker that cannot
take a message in time is hung, whatever the message, and is killed (then replaced and resynced
like any failed worker). So no caller, and no lock a caller holds, waits on a worker for longer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio
import trio_util

from mcrelay.errors import ChannelClosed, McrelayError, ProtocolError, describe
from mcrelay.ipc.messages import PROTOCOL_VERSION, Heartbeat, HeartbeatAck, Hello, Stop
from mcrelay.ipc.replies import WorkerInfo
from mcrelay.supervisor.backoff import RestartIntensity
from mcrelay.supervisor.launcher import Launched, Launcher, WorkerSpec
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.states import Event, WorkerState, transition

log = logging.getLogger("mcrelay.supervisor")

Outcome = Literal["clean", "failure", "restart"]


class WorkerFatal(McrelayError):
    """A worker exceeded its restart intensity and the supervisor was told to give up."""


@dataclass(frozen=True)
class RuleHoldings:
    """What a data worker holds of the rule table, as `mcrelay workers` shows it."""

    #: Rules in its last matching acknowledgement (None: none yet from this process).
    rules: int | None
    #: Digest of that rule set.
    digest: str | None
    #: How many of them it could not install.
    failed_rules: int


class SlotRole(Protocol):
    """What differs between control-plane and data-plane workers."""

    def starting(self, slot: WorkerSlot) -> None:
        """A new process is about to be started: forget what the previous one held."""
        ...

    async def provision(self, slot: WorkerSlot) -> None:
        """Hand the new worker what it must hold; return once it has acknowledged it."""
        ...

    async def handle(self, slot: WorkerSlot, message: Any, nursery: trio.Nursery) -> None:
        """React to a message from the worker; long work goes into ``nursery``."""
        ...

    def released(self, slot: WorkerSlot, pid: int) -> None:
        """Worker process ``pid`` has been reaped: drop what the supervisor held for it."""
        ...

    def holdings(self, slot: WorkerSlot) -> RuleHoldings | None:
        """What the worker holds of the rule table (None: it holds no rules)."""
        ...

    def delayed(self, slot: WorkerSlot, delay: float) -> None:
        """The slot's next worker starts in ``delay`` seconds (its backoff)."""
        ...

    def owes_ack(self, slot: WorkerSlot) -> bool:
        """The worker was sent rules it has not acknowledged yet: it may be busy installing
        them, so its heartbeat gets the general timeout instead of its kind's short one."""
        ...


class WorkerSlot:
    def __init__(
        self,
        spec: WorkerSpec,
        launcher: Launcher,
        settings: SupervisorSettings,
        role: SlotRole,
        log_level: trio_util.AsyncValue[str],
    ) -> None:
        self.spec = spec
        self._launcher = launcher
        self._settings = settings
        self._role = role
        self._log_level = log_level
        self.state: trio_util.AsyncValue[WorkerState] = trio_util.AsyncValue(WorkerState.EXITED)
        self.pid: int | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.intensity = RestartIntensity(settings.max_failures, settings.failure_window)
        self.channel_ready = False
        self._launched: Launched | None = None
        self._run_nursery: trio.Nursery | None = None
        self._backoff_scope: trio.CancelScope | None = None
        self._backoff_deadline: float | None = None
        self._running_since: float | None = None
        self._hb_acked: trio_util.AsyncValue[int] = trio_util.AsyncValue(0)
        self._hung = False
        self._restart_requested = False
        #: Set by stop(): the supervisor is stopping, this slot never starts a worker again.
        self._stopping = False
        #: Set once the current process has exited and been reaped.
        self._exited = trio.Event()
        #: Bumped for every process the slot starts; tells a reply's worker from its successor.
        self.incarnation = 0

    @property
    def id(self) -> str:
        return self.spec.worker_id

    def _fire(self, event: Event) -> None:
        self.state.value = transition(self.state.value, event)

    # --- what operators see -------------------------------------------------------------

    def describe(self, *, state_moved_aside: str | None = None) -> WorkerInfo:
        """The slot as `mcrelay workers` lists it (``state_moved_aside``: the supervisor's)."""
        remaining = None
        if self._backoff_deadline is not None:
            remaining = round(max(0.0, self._backoff_deadline - trio.current_time()), 3)
        held = self._role.holdings(self)
        return WorkerInfo(
            id=self.id,
            kind=self.spec.kind,
            pid=self.pid,
            state=self.state.value,
            restarts=self.restarts,
            rules=held.rules if held is not None else None,
            digest=held.digest if held is not None else None,
            failed_rules=held.failed_rules if held is not None else None,
            backoff_remaining_s=remaining,
            recent_failures=self.intensity.recent(trio.current_time()),
            state_moved_aside=state_moved_aside,
        )

    async def restart_now(self) -> None:
        """Skip a pending backoff, or replace a live worker now (not counted as a failure).

        A live worker is stopped softly (Stop, then SIGKILL after the grace), so a control
        worker answers the requests it holds, this one included.
        """
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
            return
        launched, nursery = self._launched, self._run_nursery
        if launched is None or nursery is None:
            return
        self._restart_requested = True
        if not await self._deliver(launched, Stop()):
            launched.kill()
            return

        async def kill_if_still_there() -> None:
            await trio.sleep(self._settings.stop_grace)
            launched.kill()

        nursery.start_soon(kill_if_still_there)

    @property
    def send_deadline(self) -> float:
        """How long a worker may take to accept one message before it counts as hung.

        The heartbeat timeout: a worker that cannot take a message for that long could not
        have answered a heartbeat either.
        """
        return self._settings.heartbeat_timeout

    async def send(
        self, message: object, fds: list[int] | None = None, *, incarnation: int | None = None
    ) -> bool:
        """Send to the live, provisioned worker (only to ``incarnation`` when given).

        False when there is none, or when it could not take the message in time: then it is
        killed as hung, and its replacement resyncs on start.
        """
        launched = self._launched
        if launched is None or not self.channel_ready:
            return False
        if incarnation is not None and incarnation != self.incarnation:
            return False
        return await self._deliver(launched, message, fds)

    async def send_during_provisioning(self, message: object, fds: list[int] | None = None) -> None:
        """Send to the worker being provisioned; ChannelClosed if it cannot take it in time."""
        launched = self._launched
        if launched is None or not await self._deliver(launched, message, fds):
            raise ChannelClosed(f"worker {self.id} did not take {type(message).__name__}")

    def post(self, make_message: Callable[[], object], *, delay: float = 0.0) -> None:
        """Send in the background, to this process only, after ``delay`` seconds.

        For the read loop, which must never wait on a send (the worker may itself be waiting
        for us to read). The message is made when the send starts, so it is as fresh as
        anything sent after it.
        """
        launched, nursery = self._launched, self._run_nursery
        if launched is None or nursery is None:
            return

        async def deliver() -> None:
            await trio.sleep(delay)
            await self._deliver(launched, make_message())

        nursery.start_soon(deliver)

    async def _deliver(
        self, launched: Launched, message: object, fds: list[int] | None = None
    ) -> bool:
        """One send within the deadline; a worker that misses it is killed as hung."""
        with trio.move_on_after(self.send_deadline):
            try:
                await launched.channel.send(message, fds)
            except ChannelClosed:
                return False
            return True
        self._hang(
            launched, f"did not take a {type(message).__name__} within {self.send_deadline:g} s"
        )
        return False

    def _hang(self, launched: Launched, why: str) -> None:
        if launched is not self._launched or self._hung:
            return
        self._hung = True
        self.channel_ready = False
        log.error("worker %s %s: killing it", self.id, why)
        launched.kill()

    # --- lifecycle ------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop for good (the supervisor is stopping): no restart.

        The live worker gets Stop, then SIGKILL after the stop grace, and is reaped before
        this returns.
        """
        self._stopping = True
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
        launched, exited = self._launched, self._exited
        if launched is None:
            return
        self._fire(Event.STOP)
        with trio.move_on_after(self._settings.stop_grace):
            await self._deliver(launched, Stop())
            await exited.wait()
        launched.kill()
        await exited.wait()

    async def run(self) -> None:
        """Keep a worker running until cancelled; raises WorkerFatal only with exit_on_fatal."""
        policy = self._settings.backoff
        while True:
            if self._stopping:
                await self._park()
            outcome = await self._run_once()
            if self._stopping:
                await self._park()
            if outcome == "restart":
                self._fire(Event.DIED)
                self.restarts += 1
                continue
            now = trio.current_time()
            ran_for = now - self._running_since if self._running_since is not None else 0.0
            if outcome == "clean":
                self.consecutive_failures = 0
                delay = policy.initial
                self._fire(Event.DIED)
            else:
                # A run that got past `stable_after` ends a crash loop: its failure is a first
                # one (restarted at once) and does not count towards the restart intensity.
                stable = ran_for >= policy.stable_after
                if stable:
                    self.consecutive_failures = 0
                self.consecutive_failures += 1
                delay = policy.delay(self.consecutive_failures)
                if not stable and self.intensity.record(now):
                    if self._settings.exit_on_fatal:
                        raise WorkerFatal(
                            f"worker {self.id} failed more than {self.intensity.max_failures} "
                            f"times within {self.intensity.window:g} s"
                        )
                    log.critical(
                        "worker %s failed more than %d times within %g s: it is fatal "
                        "(still retried every %g s)",
                        self.id,
                        self.intensity.max_failures,
                        self.intensity.window,
                        policy.maximum,
                    )
                    delay = policy.maximum
                    self._fire(Event.DIED_TOO_OFTEN)
                else:
                    self._fire(Event.DIED)
            self._running_since = None
            self._role.delayed(self, delay)
            await self._backoff(delay)
            self.restarts += 1

    async def _park(self) -> None:
        """A stopped slot: nothing more to run until the supervisor's nursery is cancelled."""
        if self.state.value is not WorkerState.EXITED:
            self._fire(Event.STOP)
            self._fire(Event.STOPPED)
        await trio.sleep_forever()

    async def _backoff(self, delay: float) -> None:
        if delay <= 0:
            log.info("worker %s restarts now", self.id)
            return
        log.info("worker %s restarts in %.3f s", self.id, delay)
        with trio.CancelScope() as scope:
            self._backoff_scope = scope
            self._backoff_deadline = trio.current_time() + delay
            try:
                await trio.sleep(delay)
            finally:
                self._backoff_scope = None
                self._backoff_deadline = None

    async def _run_once(self) -> Outcome:
        self._fire(Event.SPAWN)
        self._hung = False
        self._restart_requested = False
        self.channel_ready = False
        self._hb_acked = trio_util.AsyncValue(0)
        self._role.starting(self)
        try:
            launched = await self._launcher.launch(self.spec)
        except (OSError, McrelayError) as exc:
            # EMFILE, ENOMEM, EAGAIN, no spawner...: a failed start, retried after the backoff.
            log.error("worker %s could not be started: %s", self.id, _describe_error(exc))
            return "failure"
        self._launched = launched
        self.incarnation += 1
        exited = self._exited = trio.Event()
        self.pid = launched.pid
        log.info("worker %s started (pid %d)", self.id, launched.pid)
        status: int | None = None
        gone = False
        try:
            async with trio.open_nursery() as nursery:
                self._run_nursery = nursery
                nursery.start_soon(self._converse, launched)
                # None when the process is gone but its spawner died before telling its status.
                status = await launched.wait()
                gone = True
                exited.set()
                nursery.cancel_scope.cancel()
        finally:
            self._run_nursery = None
            self.channel_ready = False
            self._launched = None
            with trio.CancelScope(shield=True):
                if not gone:  # cancelled while it runs: the supervisor is ending
                    await self._stop(launched)
                    log.warning(
                        "worker %s (pid %d) ended with the supervisor: it had not stopped in "
                        "the time the stop allows",
                        self.id,
                        launched.pid,
                    )
                launched.close()
            exited.set()
            self.pid = None
            self._role.released(self, launched.pid)
            if gone and self._stopping:
                # Said here, not after the block: once `exited` is set the supervisor may end,
                # and cancel this task while its nursery is still closing.
                log.info(
                    "worker %s (pid %d) stopped: %s",
                    self.id,
                    launched.pid,
                    _describe_status(status),
                )
        if self._stopping:
            return "clean"
        if self._restart_requested:
            log.info("worker %s (pid %d) replaced on request", self.id, launched.pid)
            return "restart"
        if status == 0 and not self._hung:
            log.info("worker %s (pid %d) exited cleanly", self.id, launched.pid)
            return "clean"
        cause = "hung" if self._hung else _describe_status(status)
        log.error("worker %s (pid %d) failed: %s", self.id, launched.pid, cause)
        return "failure"

    async def _stop(self, launched: Launched) -> None:
        """Soft, then hard: Stop, a grace period, SIGKILL, and always reap."""
        self._fire(Event.STOP)
        with trio.move_on_after(self._settings.stop_grace):
            with contextlib.suppress(ChannelClosed):
                await launched.channel.send(Stop())
            await launched.wait()
        launched.kill()
        await launched.wait()
        self._fire(Event.STOPPED)

    async def _converse(self, launched: Launched) -> None:
        """Everything said to one worker process; any failure here ends that process."""
        channel = launched.channel
        settings = self._settings
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(settings.startup_timeout):
                    await channel.send(
                        Hello(
                            version=PROTOCOL_VERSION,
                            role="supervisor",
                            worker_id=self.id,
                            log_level=self._log_level.value,
                        )
                    )
                    hello = await channel.receive()
                    _check_hello(hello, self.spec.kind)
                    nursery.start_soon(self._read_loop, launched, nursery)
                    await self._role.provision(self)
                self.channel_ready = True
                self._running_since = trio.current_time()
                self._fire(Event.READY)
                log.info("worker %s running", self.id)
                await self._heartbeat(launched)
                nursery.cancel_scope.cancel()
        except* trio.TooSlowError:
            self._hung = True
            log.error(
                "worker %s did not finish starting in %.1f s", self.id, settings.startup_timeout
            )
            launched.kill()
        except* ProtocolError as group:
            log.error("worker %s broke the protocol: %s", self.id, describe(group))
            launched.kill()
        except* ChannelClosed:
            # Usually the worker is exiting: its exit (seen by _run_once, which then cancels
            # this task) normally comes first, so the real status is reported, not our SIGKILL.
            await trio.sleep(settings.stop_grace)
            launched.kill()

    async def _read_loop(self, launched: Launched, nursery: trio.Nursery) -> None:
        while True:
            message = await launched.channel.receive()
            if isinstance(message, HeartbeatAck):
                if message.n > self._hb_acked.value:
                    self._hb_acked.value = message.n
            else:
                await self._role.handle(self, message, nursery)

    def _heartbeat_timing(self) -> tuple[float, float]:
        """(interval, timeout) of this slot's kind of worker."""
        settings = self._settings
        if self.spec.kind == "data":
            return settings.data_heartbeat_interval, settings.data_heartbeat_timeout
        return settings.heartbeat_interval, settings.heartbeat_timeout

    async def _heartbeat(self, launched: Launched) -> None:
        """Return (after killing the worker) once a heartbeat goes unanswered."""
        interval, timeout = self._heartbeat_timing()
        n = 0
        while True:
            await trio.sleep(interval)
            n += 1
            took = await self._beat(launched, n, timeout)
            if took is None:
                continue
            self._hang(launched, f"did not answer a heartbeat within {took:g} s")
            return

    async def _beat(self, launched: Launched, n: int, timeout: float) -> float | None:
        """Heartbeat ``n``: None once answered, else the time it was given.

        The send counts against the time (a worker whose channel is full is as hung as one
        that does not answer, and a rule push queued in front delays it no longer). A worker
        that owes the acknowledgement of rules it was sent gets the general heartbeat timeout,
        since it answers after installing them. An answer that arrived while the supervisor's
        own loop was held up is taken too: its read loop gets a short turn before the verdict.
        """
        start = trio.current_time()
        general = max(timeout, self._settings.heartbeat_timeout)

        def allowed() -> float:
            return general if self._role.owes_ack(self) else timeout

        sent = False
        while True:
            with trio.move_on_at(start + allowed()):
                if not sent:
                    await launched.channel.send(Heartbeat(n))
                    sent = True
                await self._hb_acked.wait_value(lambda v: v >= n)
                return None
            if trio.current_time() >= start + allowed():
                break  # else the worker was sent rules meanwhile: it has longer
        if sent:
            with trio.move_on_after(_LATE_READ_GRACE):
                await self._hb_acked.wait_value(lambda v: v >= n)
                return None
        return allowed()


#: How long an answer that may already be waiting in the channel gets to be read.
_LATE_READ_GRACE = 0.02


def _check_hello(hello: object, kind: str) -> None:
    if not isinstance(hello, Hello):
        raise ProtocolError(f"expected hello, got {type(hello).__name__}")
    if hello.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"worker speaks protocol version {hello.version}, this supervisor speaks "
            f"{PROTOCOL_VERSION} (mixed installations?)"
        )
    if hello.role != kind:
        raise ProtocolError(f"worker says it is {hello.role!r}, expected {kind!r}")


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    return str(exc)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "exit status unknown (its spawner died first)"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
