"""Starting the daemon from its options: what ``mcrelay supervisor`` does after parsing.

:func:`run` turns :class:`DaemonOptions` into settings, loads the ``--config`` rules, starts the
worker spawner and runs the daemon with the kernel capture plumbing until it stops. Everything
that can refuse a start (a bad option, a missing group, a bad rule file, a taken socket, a policy
line that does not parse, a port the metrics cannot bind) is raised as one sentence before or
instead of a traceback, so the CLI only has to print it.
"""

from __future__ import annotations

from functools import partial

import trio

from mcrelay import config
from mcrelay.dataplane.ring_size import capture_ring
from mcrelay.errors import McrelayError, leaves
from mcrelay.supervisor.captures import KernelCaptures
from mcrelay.supervisor.launcher import SpawnerLauncher
from mcrelay.supervisor.main import run_daemon
from mcrelay.supervisor.options import DaemonOptions
from mcrelay.supervisor.persistence import RuleStore
from mcrelay.supervisor.worker_users import WorkerUsers
from mcrelay.system.logs import setup_logging
from mcrelay.system.process import raise_open_file_limit


class StartRefused(McrelayError):
    """The daemon cannot start; the message says why (every reason, when there are several)."""


def run(options: DaemonOptions) -> int:
    """Run the daemon in the foreground until it stops; the process exit code (0, or 3 after
    ``--exit-on-fatal``). A bad option is a :class:`BadOption`; any other refusal to start is a
    McrelayError of one sentence. Anything else escaping is a bug and is not disguised."""
    settings = options.settings()
    setup_logging(settings.log_level, "mcrelay: supervisor")
    initial = config.load(options.config_file) if options.config_file else ()
    launcher: SpawnerLauncher | None = None
    try:
        # Before the spawner: it and every worker inherit the raised open-file limit.
        raise_open_file_limit()
        # Before the trio loop: the spawner is the only process that forks workers.
        users = WorkerUsers.resolve(
            options.user, options.control_user, keep_root=options.unsafe_keep_worker_root
        )
        launcher = SpawnerLauncher(users)
        launcher.start()
        return trio.run(
            partial(
                run_daemon,
                settings,
                launcher,
                initial_rules=initial,
                captures=KernelCaptures(capture_ring(settings.capture_ring_mib)),
                config_file=options.config_file,
                store=RuleStore(options.state_dir),
                metrics_listen=options.metrics_listen,
            )
        )
    except (McrelayError, OSError, ExceptionGroup) as exc:
        message = refusal(exc)
        if message is None:
            raise
        raise StartRefused(message) from None
    finally:
        if launcher is not None:
            launcher.close()


def refusal(error: BaseException) -> str | None:
    """The sentence for a daemon that cannot start, or None when ``error`` holds anything else
    (a bug). A refusal raised inside the daemon's task tree arrives in an exception group: every
    leaf is said, joined by "; ", and one leaf that is no refusal makes the whole a bug."""
    parts: list[str] = []
    for leaf in leaves(error):
        if isinstance(leaf, McrelayError):
            parts.append(str(leaf))
        elif isinstance(leaf, OSError):
            parts.append(f"cannot start: {leaf}")
        else:
            return None
    return "; ".join(parts) or None
