"""One log line per event on stderr; journald adds time and unit, so we add neither."""

from __future__ import annotations

import logging
import sys

from mcrelay.errors import McrelayError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UnknownLogLevel(McrelayError):
    """A log level that is not one of :data:`LOG_LEVELS`; the message lists the valid ones."""


def check_log_level(level: str) -> str:
    """``level`` when valid, else UnknownLogLevel: the one sentence the CLI, the supervisor and
    the control worker all give for a bad level."""
    if level not in LOG_LEVELS:
        raise UnknownLogLevel(f"unknown log level {level!r} (use {', '.join(LOG_LEVELS)})")
    return level


def setup_logging(level: str, process_name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{process_name}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mcrelay")
    root.handlers[:] = [handler]
    root.propagate = False
    set_log_level(level)


def set_log_level(level: str) -> None:
    logging.getLogger("mcrelay").setLevel(level.upper())
