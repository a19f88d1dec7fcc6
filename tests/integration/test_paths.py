"""Paths the supervisor creates as root cannot be redirected by another user (real supervisor)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.lab.daemon import cli, daemon, wait_for

RULE = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:o"]
PRECIOUS = "precious contents\n"


def start(socket: Path, state: Path) -> tuple[int, str]:
    """A supervisor expected to refuse at once: its exit status and its stderr."""
    result = cli(
        "supervisor", "--num-workers", "1", "--control-socket", str(socket), "--state-dir",
        str(state), timeout=20,
    )  # fmt: skip
    return result.returncode, result.stderr


def assert_one_line_refusal(code: int, stderr: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr


def test_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    socket = tmp_path / "control.sock"
    lock = tmp_path / "control.sock.lock"
    lock.symlink_to(victim)
    code, stderr = start(socket, tmp_path / "state")
    assert_one_line_refusal(code, stderr, str(lock), "symbolic link")
    assert victim.read_text() == PRECIOUS
    assert lock.is_symlink()
    assert not socket.exists()


def test_symlink_at_a_guessed_state_temp_name_receives_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    state = tmp_path / "state"
    with daemon(tmp_path, "--num-workers", "1") as d:
        d.ok("add", "--input-group", "239.1.1.1", *RULE, "--id", "a")
        # The names a temporary file used to get (pid-based), and a few more guesses.
        guesses = [f".rules.toml.{d.proc.pid}.tmp", "rules.toml.tmp", ".rules.toml.tmp"]
        for name in guesses:
            (state / name).symlink_to(victim)
        d.ok("add", "--input-group", "239.1.1.2", *RULE, "--id", "b")
        assert victim.read_text() == PRECIOUS
        assert all((state / name).is_symlink() for name in guesses)
        assert [r["id"] for r in json.loads(d.ok("rules", "--json"))] == ["a", "b"]
        assert 'id = "b"' in (state / "rules.toml").read_text()
        leftovers = {p.name for p in state.iterdir()} - {"rules.toml", *guesses}
        assert not leftovers


def test_world_writable_socket_directory_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    code, stderr = start(run / "control.sock", tmp_path / "state")
    assert_one_line_refusal(code, stderr, str(run), "world-writable")
    assert list(run.iterdir()) == []  # not even the lock file was created


def test_world_writable_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    code, stderr = start(tmp_path / "control.sock", state)
    assert_one_line_refusal(code, stderr, str(state), "world-writable")
    assert not (tmp_path / "control.sock").exists()


def test_foreign_owned_state_and_socket_directories_are_refused(tmp_path: Path) -> None:
    for which in ("socket", "state"):
        foreign = tmp_path / which
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 65534, 65534)
        socket = foreign / "control.sock" if which == "socket" else tmp_path / "control.sock"
        state = foreign if which == "state" else tmp_path / "state"
        code, stderr = start(socket, state)
        assert_one_line_refusal(code, stderr, str(foreign), "owned by uid 65534")


def test_sticky_world_writable_socket_directory_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    socket = shared / "control.sock"
    # The later --control-socket wins; the helper's own readiness ping would look elsewhere.
    with daemon(tmp_path, "--num-workers", "1", "--control-socket", str(socket), ready=False) as d:
        wait_for(lambda: cli("ping", "--socket", str(socket)).returncode == 0, 10)
        assert d.proc.poll() is None
        assert stat.S_IMODE(os.lstat(socket).st_mode) == 0o660


def test_normal_start_socket_mode_lock_pid_and_no_leftovers(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "1") as d:
        d.ok("add", "--input-group", "239.1.1.1", *RULE, "--id", "a")
        info = os.lstat(d.socket)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        lock = d.socket.with_name(d.socket.name + ".lock")
        assert lock.read_text() == f"{d.proc.pid}\n"
        expected = {"control.sock", "control.sock.lock", "state", "supervisor.log"}
        assert {p.name for p in tmp_path.iterdir()} == expected  # no private bind directory
        assert [p.name for p in (tmp_path / "state").iterdir()] == ["rules.toml"]
