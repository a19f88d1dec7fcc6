"""The pre-loaded spawner: a single-threaded process that forks every worker.

The supervisor starts it (``python -m mcrelay.worker.spawner``, as root) before its own trio loop
and again whenever it dies. It imports the worker code once, then answers requests on a
SOCK_SEQPACKET socket (mcrelay.ipc.spawn): for each it forks a child that

1. closes every descriptor but stdio and a private hand-off socket, and starts its own session;
2. sets PR_SET_PDEATHSIG (SIGKILL) and checks it was not orphaned before that (getppid);
3. takes its process name and CPU placement;
4. drops its privileges (mcrelay.system.privileges.drop_privileges) and verifies the drop;
5. only then receives its channel to the supervisor, and runs the worker.

Lifetimes: the spawner itself has PDEATHSIG tied to the supervisor, and every worker has it tied
to the spawner, so a supervisor that dies however it dies takes both down with it. A spawner that
dies takes its workers with it; the supervisor starts a new spawner and replaces the workers.
The spawner never runs trio and has one thread, so forking it is safe, and a spawn costs a
fork instead of an interpreter start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import traceback

# Pre-loaded: everything a worker runs is imported before any fork.
import mcrelay.worker.control
import mcrelay.worker.data
from mcrelay.errors import ChannelClosed, McrelayError
from mcrelay.ipc import spawn as sp
from mcrelay.ipc.messages import WorkerKind
from mcrelay.system.logs import setup_logging
from mcrelay.system.privileges import Identity, PrivilegeError, drop_privileges
from mcrelay.system.process import arm_parent_death, set_process_name
from mcrelay.worker import main as worker_main

NAME = "mcrelay: spawner"
#: A child's exit code when it could not become a worker (the drop failed, orphaned, ...).
EXIT_SETUP_FAILED = 78

assert mcrelay.worker.control and mcrelay.worker.data  # imported for their side effect


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mcrelay.worker.spawner")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--control-user", default="", help="NAME:UID:GID ('' keeps ours)")
    parser.add_argument("--data-user", default="", help="NAME:UID:GID ('' keeps ours)")
    parser.add_argument("--keep-root", action="store_true", help="tolerate a failed user switch")
    args = parser.parse_args(argv)
    arm_parent_death(args.supervisor_pid)
    set_process_name(NAME)
    setup_logging("info", NAME)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    server = Spawner(
        sock,
        {"control": _identity(args.control_user), "data": _identity(args.data_user)},
        keep_root=args.keep_root,
    )
    sys.exit(server.serve())


def _identity(text: str) -> Identity | None:
    if not text:
        return None
    name, uid, gid = text.rsplit(":", 2)
    return Identity(name, int(uid), int(gid))


def identity_arg(identity: Identity | None) -> str:
    return "" if identity is None else f"{identity.name}:{identity.uid}:{identity.gid}"


class Spawner:
    def __init__(
        self, sock: socket.socket, identities: dict[str, Identity | None], *, keep_root: bool
    ) -> None:
        self._sock = sock
        self._identities = identities
        self._keep_root = keep_root
        #: pidfd -> pid of every child not reaped yet.
        self._children: dict[int, int] = {}

    def serve(self) -> int:
        error = self._probe()
        self._send(sp.Ready(pid=os.getpid(), drop_error=error))
        if error is not None and not self._keep_root:
            return 0  # the supervisor refuses to start
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._sock.fileno():
                    try:
                        pidfd = self._request()
                    except (ChannelClosed, ConnectionError):
                        # The supervisor is gone or stopping (a supervisor killed with a
                        # request unread resets the socket rather than closing it).
                        return 0
                    if pidfd is not None:
                        poller.register(pidfd, select.POLLIN)
                else:
                    poller.unregister(fd)
                    self._reap(fd)

    def _request(self) -> int | None:
        """Serve one request; the new child's pidfd, if there is one."""
        data, ancdata, flags, _ = self._sock.recvmsg(sp.MAX_MESSAGE, sp.ancillary_space(4))
        payload, fds = sp.unpack(data, ancdata, flags)
        request_id = 0
        try:
            request = sp.decode_request(payload)
            request_id = request.id
            if len(fds) != 1:
                raise McrelayError(f"a spawn request carries 1 descriptor, not {len(fds)}")
            pid, pidfd = self._fork(request, fds[0])
        except (OSError, McrelayError) as exc:
            self._send(sp.SpawnFailed(id=request_id, error=str(exc)))
            return None
        finally:
            for fd in fds:
                os.close(fd)
        self._children[pidfd] = pid
        try:
            self._send(sp.Spawned(id=request_id, pid=pid), [pidfd])
        except OSError:
            os.kill(pid, signal.SIGKILL)  # nobody could watch it: never leave it behind
            raise
        return pidfd

    def _fork(self, request: sp.Spawn, channel_fd: int) -> tuple[int, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spawner_pid = os.getpid()
        with ours, theirs:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                code = EXIT_SETUP_FAILED
                try:
                    code = self._child(request, theirs.fileno(), spawner_pid)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            try:
                pidfd = os.pidfd_open(pid)  # before any reaping: cannot name another process
            except OSError:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            try:
                # The child asks for its channel only once its privileges are gone.
                socket.send_fds(ours, [b"c"], [channel_fd])
            except OSError:  # a failed start, never a child nobody watches
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(pidfd)
                raise
        return pid, pidfd

    def _child(self, request: sp.Spawn, handoff: int, spawner_pid: int) -> int:
        _close_all_but(handoff)
        os.setsid()  # a Ctrl-C on the supervisor's terminal is the supervisor's to handle
        arm_parent_death(spawner_pid)
        name = worker_main.process_name(request.kind, request.worker_id)
        set_process_name(name)
        if request.cpus:  # placement is an optimisation: unpinned if it cannot be done
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, request.cpus)
        os.chdir("/")
        try:
            drop_privileges(self._identities.get(request.kind), keep_root=self._keep_root)
        except PrivilegeError as exc:
            print(f"{name}: CRITICAL {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
        with socket.socket(fileno=handoff) as sock:
            _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        if len(fds) != 1:
            return EXIT_SETUP_FAILED
        kind: WorkerKind = "control" if request.kind == "control" else "data"
        return worker_main.run(kind, request.worker_id, fds[0], frozenset(request.faults))

    def _probe(self) -> str | None:
        """Fork one child per worker user that drops as a worker would; why it failed, if so."""
        for kind, identity in self._identities.items():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                os.close(r)
                try:
                    drop_privileges(identity, keep_root=False)
                except PrivilegeError as exc:
                    os.write(w, str(exc).encode())
                except BaseException as exc:
                    os.write(w, f"{kind} workers: {exc}".encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as pipe:
                error = pipe.read().decode(errors="replace")
            os.waitpid(pid, 0)
            if error:
                return error
        return None

    def _reap(self, pidfd: int) -> None:
        pid = self._children.pop(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):
            self._send(sp.Exited(pid=pid, status=code))

    def _send(self, message: sp.FromSpawner, fds: list[int] | None = None) -> None:
        self._sock.sendmsg([sp.encode(message)], sp.rights(fds or []))


def _close_all_but(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


if __name__ == "__main__":
    main()
