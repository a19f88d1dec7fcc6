"""Process identity and lifetime: names operators can see, and never outliving the supervisor."""

from __future__ import annotations

import os
import signal

import prctl


def arm_parent_death(supervisor_pid: int) -> None:
    """Die with the supervisor. PDEATHSIG covers a supervisor that dies after this call; the
    ``getppid`` check covers one that died before it (we would have been re-parented already)."""
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(1)


def set_process_name(name: str) -> None:
    """Shown by ps/top (argv) and in /proc/PID/comm (first 15 bytes)."""
    prctl.set_name(name[:15])
    prctl.set_proctitle(name)
