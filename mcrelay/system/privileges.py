"""Least privilege: who the workers run as, and the drop every worker makes before it works.

Only the supervisor (and the spawner it starts, which forks the workers) keeps privileges. A
worker is forked from the pre-loaded spawner with its code already imported, then drops
everything itself (:func:`drop_privileges`) before it receives its channel: its own user and
group with no supplementary groups, no capability in any set (bounding and ambient included),
``no_new_privs``, and not dumpable, so processes of the same uid cannot ptrace it or take its fds
with ``pidfd_getfd``. Because the code is loaded before the drop, it does not matter whether the
worker user could read the interpreter or the package (a Python under a 0700 ``/root`` works).

The control worker and the data workers run under different users (:data:`DEFAULT_CONTROL_USER`
and :data:`DEFAULT_DATA_USER`), so neither can signal the other. When a default user does not
exist (a plain ``pip install``: no package, no sysusers.d), a free uid is picked the way systemd's
DynamicUser does, from 61184-65519, stable for a given name.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import zlib

import prctl

from mcrelay.errors import McrelayError

#: Created by packaging/sysusers.d/mcrelay.conf and by scripts/setup.
DEFAULT_DATA_USER = "mcrelay"
DEFAULT_CONTROL_USER = "mcrelay-control"
#: Where systemd's DynamicUser= picks uids; unused ones there are our fallback.
DYNAMIC_UID_RANGE = range(61184, 65520)

log = logging.getLogger("mcrelay.supervisor")


class PrivilegeError(McrelayError):
    pass


@dataclasses.dataclass(frozen=True)
class Identity:
    """A worker's user: ``name`` is for humans (a dynamic uid has no passwd entry)."""

    name: str
    uid: int
    gid: int

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid})"


def resolve_user(name: str, *, default: bool) -> Identity:
    """The identity for ``--user``/``--control-user``; a missing *default* user falls back to a
    dynamic uid (never an error), a missing user someone named is one."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not default:
            raise PrivilegeError(f"no such user: {name}") from None
        uid = dynamic_uid(name)
        log.info("user %s does not exist: workers use the unused uid %d instead", name, uid)
        return Identity(f"{name}-dynamic", uid, uid)
    return Identity(name, entry.pw_uid, entry.pw_gid)


def dynamic_uid(name: str) -> int:
    """A uid (also used as gid) no user or group has, derived from ``name`` so it is stable."""
    span = len(DYNAMIC_UID_RANGE)
    start = zlib.crc32(f"mcrelay:{name}".encode()) % span
    for i in range(span):
        uid = DYNAMIC_UID_RANGE[(start + i) % span]
        if not _taken(uid):
            return uid
    raise PrivilegeError("no unused uid left in 61184-65519 for the workers")


def _taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def check_supervisor(switch_user: bool) -> None:
    """Fail with one clear sentence when a capability the supervisor needs is missing."""
    needed = {"net_raw": "CAP_NET_RAW"}
    if switch_user:
        needed |= {"setuid": "CAP_SETUID", "setgid": "CAP_SETGID"}
    missing = [cap for attr, cap in needed.items() if not getattr(prctl.cap_effective, attr)]
    if missing:
        raise PrivilegeError(
            f"mcrelay supervisor needs {', '.join(missing)} (run it as root, or grant the "
            "capabilities, e.g. AmbientCapabilities= in its systemd unit)"
        )


def drop_privileges(identity: Identity | None, *, keep_root: bool = False) -> None:
    """Become ``identity`` with nothing left to regain; raise PrivilegeError if any step fails.

    ``identity`` None keeps the current (already unprivileged) uid. ``keep_root`` (the unsafe
    opt-out) tolerates a failed user switch but still drops every capability.
    """
    # The bounding set needs CAP_SETPCAP, which the user switch below takes away.
    if prctl.cap_effective.setpcap:
        for cap in prctl.ALL_CAPS:
            prctl.capbset_drop(cap)
    if identity is not None:
        try:
            os.setgroups([])
            os.setresgid(identity.gid, identity.gid, identity.gid)
            os.setresuid(identity.uid, identity.uid, identity.uid)
        except OSError as exc:
            if not keep_root:
                raise PrivilegeError(
                    f"cannot switch workers to {identity.describe()}: {exc.strerror}"
                ) from None
    # Emptying the inheritable and permitted sets empties the ambient set too.
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.set_no_new_privs(True)
    # After the uid change: changing euid resets "dumpable" to the fs.suid_dumpable default.
    prctl.set_dumpable(False)
    verify_dropped(expect_root=keep_root and os.getuid() == 0)


def verify_dropped(*, expect_root: bool = False) -> None:
    """Check the drop from the kernel's view: no capability, no way back to uid 0."""
    status = _proc_status()
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        if int(status.get(field, "0"), 16) != 0:
            raise PrivilegeError(f"workers kept capabilities ({field} {status[field]})")
    if status.get("NoNewPrivs") != "1":
        raise PrivilegeError("workers could not set no_new_privs")
    if prctl.get_dumpable():
        raise PrivilegeError("workers could not be made non-dumpable")
    if expect_root:
        return
    if 0 in os.getresuid() or 0 in os.getresgid():
        raise PrivilegeError("workers kept uid or gid 0")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("workers could regain uid 0 after dropping it")


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
