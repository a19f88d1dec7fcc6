"""One log line per event on stderr; journald adds time and unit, so we add neither."""

from __future__ import annotations

import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def setup_logging(level: str, process_name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{process_name}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mcrelay")
    root.handlers[:] = [handler]
    root.propagate = False
    set_log_level(level)


def set_log_level(level: str) -> None:
    logging.getLogger("mcrelay").setLevel(level.upper())
