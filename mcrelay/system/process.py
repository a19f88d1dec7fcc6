"""Process identity and lifetime: names operators can see, and never outliving the parent."""

from __future__ import annotations

import logging
import os
import resource
import signal

import prctl

log = logging.getLogger("mcrelay.supervisor")


def arm_parent_death(parent_pid: int) -> None:
    """Die with the parent (the supervisor for the spawner, the spawner for a worker).

    PDEATHSIG covers a parent that dies after this call; the ``getppid`` check covers one that
    died before it (we would have been re-parented already). The parent must fork from a thread
    that lives as long as it does: PDEATHSIG fires when the forking *thread* exits.
    """
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def set_process_name(name: str) -> None:
    """Shown by ps/top (argv) and in /proc/PID/comm (first 15 bytes)."""
    prctl.set_name(name[:15])
    prctl.set_proctitle(name)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (workers inherit it); (soft, hard) after.

    systemd and most shells start services with a soft limit of 1024, far below what the kernel
    allows (the hard limit); descriptors are what a large rule set costs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # e.g. an infinite hard limit the kernel caps lower
            log.warning(
                "open file limit (RLIMIT_NOFILE) stays %d (hard limit %d): %s", soft, hard, exc
            )
        else:
            log.info("open file limit (RLIMIT_NOFILE) raised from %d to %d", soft, hard)
            soft = hard
    return soft, hard
