"""The wire: framed msgspec messages between the supervisor, its workers and clients."""

from mcrelay.ipc import messages
from mcrelay.ipc.framing import FrameChannel

__all__ = ["FrameChannel", "messages"]
