"""A real supervisor subprocess on a temporary control socket, ended by PID however a test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mcrelay import client
from mcrelay.ipc import messages as m
from mcrelay.supervisor.settings import SupervisorSettings
from tests.lab.processes import end_process
from tests.lab.processes import wait_for as wait_for  # re-exported for the tests


def heartbeat_timeout(kind: str, settings: SupervisorSettings | None = None) -> float:
    """The heartbeat timeout a worker of ``kind`` ("control" or "data") gets: data workers have
    their own (shorter) one where the supervisor has it, the shared one otherwise."""
    s = settings or SupervisorSettings()
    if kind == "data":
        return float(getattr(s, "data_heartbeat_timeout", s.heartbeat_timeout))
    return s.heartbeat_timeout


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("mcrelay: ")
    except FileNotFoundError:
        return False


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcrelay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


#: Runs Python as another user from an interpreter only root may be able to read (a clone or a
#: Python under a 0700 directory): everything the code needs is imported first, as root.
_AS_USER = """
import importlib, os, pkgutil, sys, warnings
import msgspec, mcrelay, pydantic, typer, trio
# Every module the command might import lazily (typer and pydantic do), while still root.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for package in (mcrelay, typer, pydantic):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                try:
                    importlib.import_module(info.name)
                except Exception:  # optional extras, other platforms' modules
                    pass
uid, gid = int(sys.argv[1]), int(sys.argv[2])
groups = [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups); os.setresgid(gid, gid, gid); os.setresuid(uid, uid, uid)
code, sys.argv = sys.argv[4], sys.argv[4:]
if code == "-":
    sys.argv[0] = "mcrelay"
    mcrelay.cli.main()
else:
    exec(compile(code, "<as-user>", "exec"))
"""


def as_user_argv(uid: int, gid: int, groups: Sequence[int], code: str, *args: str) -> list[str]:
    """argv that runs ``code`` (``-``: the mcrelay CLI) with ``args`` as uid/gid/groups."""
    return [sys.executable, "-c", _AS_USER, str(uid), str(gid), ",".join(map(str, groups)),
            code, *args]  # fmt: skip


def cli_as(
    uid: int, gid: int, *args: str, groups: Sequence[int] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``mcrelay ARGS`` as uid/gid with supplementary ``groups``; needs root."""
    return subprocess.run(
        as_user_argv(uid, gid, groups, "-", *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


class Daemon:
    def __init__(self, socket: Path, proc: subprocess.Popen[str], log: Path) -> None:
        self.socket = socket
        self.proc = proc
        self.log = log
        self.seen_worker_pids: set[int] = set()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--socket", str(self.socket))

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr + self.log.read_text()[-3000:]
        return result.stdout

    def workers(self) -> dict[str, dict[str, Any]]:
        """Through the client library: polling must be cheap (the CLI is tested on its own)."""
        found = {w["id"]: w for w in client.call(self.socket, m.ListWorkers(), timeout=10)}
        self.seen_worker_pids.update(w["pid"] for w in found.values() if w["pid"])
        return found

    def wait_running(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        def all_running() -> dict[str, dict[str, Any]] | None:
            workers = self.workers()
            if all(w["state"] == "running" and pid_alive(w["pid"]) for w in workers.values()):
                return workers
            return None

        return wait_for(all_running, timeout)

    def wait_replaced(
        self, worker_id: str, old_pid: int, timeout: float = 10.0, poll: float = 0.05
    ) -> dict[str, Any]:
        def replaced() -> dict[str, Any] | None:
            w = self.workers()[worker_id]
            return w if w["state"] == "running" and w["pid"] != old_pid else None

        return wait_for(replaced, timeout, poll)


@contextlib.contextmanager
def daemon(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    ready: bool = True,
    python: str = sys.executable,
) -> Iterator[Daemon]:
    """``prefix`` runs the supervisor through another command (``ip netns exec NS``);
    ``ready=False`` yields at once instead of waiting until the daemon answers; ``python`` is the
    interpreter the supervisor (and so its spawner) runs on."""
    socket = tmp / "control.sock"
    log = tmp / "supervisor.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                *prefix,
                python,
                "-m",
                "mcrelay",
                "supervisor",
                "--control-socket",
                str(socket),
                "--state-dir",
                str(tmp / "state"),
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    d = Daemon(socket, proc, log)
    try:
        if ready:
            wait_for(lambda: d.cli("ping").returncode == 0 or proc.poll() is not None, 10)
            assert proc.poll() is None, log.read_text()
        yield d
    finally:
        end_process(proc, signal.SIGTERM)
        for pid in d.seen_worker_pids:  # only workers this test's daemon started
            if pid_alive(pid) and is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def private_python() -> Iterator[str]:
    """An interpreter only root can read: a venv with a copied interpreter inside a 0700
    directory (what ``mktemp -d`` or a Python under /root gives), seeing this venv's packages."""
    import site
    import sysconfig

    with tempfile.TemporaryDirectory(prefix="mcrelay-private-") as tmp:
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o700
        venv = Path(tmp) / "venv"
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run(
            [base, "-m", "venv", "--copies", "--without-pip", str(venv)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        python = venv / "bin" / "python3"
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(ours))
        Path(purelib, "mcrelay-test.pth").write_text(lines)
        yield str(python)
