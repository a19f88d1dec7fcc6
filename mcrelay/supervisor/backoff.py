"""Restart policy, pure so it is tested exhaustively: exponential backoff, OTP-style intensity."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class BackoffPolicy:
    """When a failed worker is started again.

    The first failure after a stable run is restarted at once: a data worker's replacement
    takes over its capture rings, so a prompt restart loses nothing, and one crash says
    nothing about the next. From the second consecutive failure (a worker that died before
    its run became stable) the delay starts at ``initial`` and doubles up to ``maximum``, so a
    crash loop costs little CPU, and the restart intensity (`RestartIntensity`) calls a worker
    fatal if it keeps failing so.
    """

    #: The delay after the second consecutive failure.
    initial: float = 0.25
    maximum: float = 16.0
    #: A worker that ran this long before dying counts its failures from one again, and that
    #: failure is no part of a crash loop (the restart intensity ignores it). Long enough that
    #: restarting at once never becomes a tight loop (two forks a second at most, a few ms of
    #: CPU each), short enough that a worker killed every second is always replaced at once.
    stable_after: float = 0.5

    def delay(self, consecutive_failures: int) -> float:
        """Delay before the restart that follows the n-th consecutive failure (n >= 1)."""
        if consecutive_failures <= 1:
            return 0.0
        # Cap the exponent so huge failure counts never overflow a float.
        exponent = min(consecutive_failures - 2, 64)
        return min(self.initial * float(2**exponent), self.maximum)


class RestartIntensity:
    """More than ``max_failures`` failures within ``window`` seconds means the worker is fatal."""

    def __init__(self, max_failures: int = 10, window: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        """Record a failure at ``now``; True when the intensity is exceeded."""
        self._times.append(now)
        return self.exceeded(now)

    def exceeded(self, now: float) -> bool:
        return self.recent(now) > self.max_failures

    def recent(self, now: float) -> int:
        """Failures within the window ending at ``now``."""
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times)
