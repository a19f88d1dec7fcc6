"""The supervisor process: the task tree, worker lifecycles, the rule table, the control server.

Outsiders start a daemon with :class:`DaemonOptions` and `mcrelay.supervisor.start.run` (kept out
of this namespace: it loads the whole daemon, and the options alone are what ``--help`` needs).
"""

from mcrelay.supervisor.backoff import BackoffPolicy
from mcrelay.supervisor.options import DEFAULTS, MAXIMUM, MINIMUM, BadOption, DaemonOptions
from mcrelay.supervisor.settings import DEFAULT_CONTROL_SOCKET, SupervisorSettings

__all__ = [
    "DEFAULTS",
    "DEFAULT_CONTROL_SOCKET",
    "MAXIMUM",
    "MINIMUM",
    "BackoffPolicy",
    "BadOption",
    "DaemonOptions",
    "SupervisorSettings",
]
