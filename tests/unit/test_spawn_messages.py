"""Spawner messages whose descriptors could not be received (a supervisor out of descriptors)."""

from __future__ import annotations

import os
import socket

import pytest

from mcrelay.ipc import spawn as sp


def test_a_reply_whose_pidfd_was_lost_is_told_apart_from_a_broken_stream() -> None:
    """The kernel drops the descriptors it cannot install (MSG_CTRUNC) but delivers the
    message: the supervisor reads it as a failed start of that worker, not a dead spawner."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        payload = sp.encode(sp.Spawned(id=7, pid=1234))
        theirs.sendmsg([payload], sp.rights([r]))
        data, ancdata, flags, _ = ours.recvmsg(sp.MAX_MESSAGE, 0)  # no room for the fd
        with pytest.raises(sp.DescriptorsLost) as lost:
            sp.unpack(data, ancdata, flags)
        assert sp.decode_reply(lost.value.data) == sp.Spawned(id=7, pid=1234)
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()
