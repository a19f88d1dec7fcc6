"""Operating-system glue: logging, privileges, process names, systemd, paths, netlink."""

from mcrelay.system.logs import LOG_LEVELS, check_log_level, set_log_level, setup_logging
from mcrelay.system.paths import DEFAULT_CONTROL_SOCKET

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "LOG_LEVELS",
    "check_log_level",
    "set_log_level",
    "setup_logging",
]
