"""Accepting connections through shortages, for the control socket and the metrics endpoint.

accept() fails for reasons that pass: the process or the system is out of descriptors (EMFILE,
ENFILE) or memory (ENOBUFS, ENOMEM), or a client gave up before it was accepted (ECONNABORTED,
EPROTO). A listener that ended on those would let a burst of clients take the endpoint down, so
they are retried after a short pause and logged once per run of failures.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["RETRY_DELAY", "TRANSIENT", "accept_retrying"]

#: accept() failures that pass: descriptor or memory exhaustion, an aborted connection.
TRANSIENT = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)
#: Seconds between tries while accept() fails for one of those reasons.
RETRY_DELAY = 0.1

T = TypeVar("T")


async def accept_retrying(accept: Callable[[], Awaitable[T]], log: logging.Logger, what: str) -> T:
    """The next connection from `accept`, trying again while it fails for a `TRANSIENT` reason.

    The first failure of a run is logged as ``WHAT: REASON (retrying)``; any other error is
    raised, for the caller to decide whether its endpoint ends.
    """
    failing = False
    while True:
        try:
            return await accept()
        except OSError as exc:
            if exc.errno not in TRANSIENT:
                raise
            if not failing:
                log.warning("%s: %s (retrying)", what, exc.strerror or exc)
            failing = True
            await trio.sleep(RETRY_DELAY)
