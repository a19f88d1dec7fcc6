"""How large a capture ring is: its geometry, the one place its values are written.

Kept apart from `mcrelay.dataplane.capture` (which opens the sockets) so the supervisor's
settings, and so every CLI command, can name the default size without importing the capture
machinery (BPF, netlink, the ring itself).
"""

from __future__ import annotations

from mcrelay.ipc.messages import CaptureSpec

__all__ = ["CAPTURE_RING", "CAPTURE_RING_MIB", "capture_ring"]

#: A capture ring's blocks: one is handed over when full or after 2 ms, whichever comes first.
CAPTURE_BLOCK_BYTES = 1 << 17
CAPTURE_RETIRE_MS = 2
#: The default ring size (``--capture-ring-mib``).
CAPTURE_RING_MIB = 64


def capture_ring(mib: int = CAPTURE_RING_MIB) -> CaptureSpec:
    """The ring of every capture socket: ``mib`` MiB in blocks of 128 KiB.

    It also holds what arrives while no worker reads it (a worker died and its replacement is
    starting). Every retire timeout closes a block however few frames it holds, so at low rates
    the ring covers ``blocks x 2 ms`` (`CaptureSpec.low_rate_cover_s`: 1 s for 64 MiB), and at
    high rates its bytes: 64 MiB hold about 58,000 frames of 1 KiB datagrams (0.58 s at
    100k pps). docs/architecture.md § "A data worker's death" has the table. The only place
    these values are written; the worker gets them with the socket.
    """
    return CaptureSpec(
        block_size=CAPTURE_BLOCK_BYTES,
        block_count=(mib << 20) // CAPTURE_BLOCK_BYTES,
        frame_size=2048,
        retire_ms=CAPTURE_RETIRE_MS,
    )


CAPTURE_RING = capture_ring()
