"""The soak's fixed figures: streams, deadlines, chaos intervals, event kinds and weights, and
the options of one run."""

from __future__ import annotations

import dataclasses

from mcrelay.supervisor.settings import SupervisorSettings
from tests.lab.daemon import heartbeat_timeout as lab_heartbeat_timeout

STREAMS = 3
SIZE = 512
#: Duplicates one takeover of a data worker's rings may cause: the frames of a half-sent block,
#: at most a whole block (128 KiB of 512-byte datagrams) per stream.
TAKEOVER_DUPLICATES = STREAMS * 230
IN_PORT, OUT_PORT = 5000, 5001
SUPERVISOR_ARGS = ("--num-workers", "2", "--max-failures", "1000")
DEFAULTS = SupervisorSettings()  # the soak's supervisor runs with these (but the two above)


def heartbeat_timeout(kind: str) -> float:
    """The heartbeat timeout of a worker of ``kind`` ("control" or "data") under DEFAULTS."""
    return lab_heartbeat_timeout(kind, DEFAULTS)


def pause_s(kind: str) -> tuple[float, float]:
    """pause-worker: how long the SIGSTOP may last, safely below the victim's heartbeat timeout
    (so it must carry on): 0.2-1.5 s for 3 s, 0.05-0.15 s for 0.3 s."""
    timeout = heartbeat_timeout(kind)
    return min(0.2, timeout / 6), timeout / 2


def hang_s(kind: str) -> tuple[float, float]:
    """stop-worker: how long the SIGSTOP lasts, past the victim's heartbeat timeout (so it must
    be declared hung and replaced before the SIGCONT)."""
    timeout = heartbeat_timeout(kind)
    return timeout + 1.0, timeout + 3.0


SETTINGS_NOTE = (
    "supervisor: --num-workers 2 --max-failures 1000 (so the induced failures never make a "
    f"worker fatal);\nevery other setting default (heartbeat timeout "
    f"{heartbeat_timeout('control'):g} s control, {heartbeat_timeout('data'):g} s data, "
    f"backoff at once, then {DEFAULTS.backoff.initial:g}→{DEFAULTS.backoff.maximum:g} s, "
    f"stable-after {DEFAULTS.backoff.stable_after:g} s)"
)
HEARTBEAT_TIMEOUT_S = max(heartbeat_timeout("control"), heartbeat_timeout("data"))
# A worker not running again within its heartbeat timeout + the restart backoff's bound (its cap
# and the start timeout, with slack for a loaded 2-CPU machine) is wedged: 3 + 16 + 10 + 5 = 34 s
# with the longer (control) timeout, which bounds a data worker's too.
WEDGE_SLACK_S = 5.0
WORKER_WEDGE_S = (
    HEARTBEAT_TIMEOUT_S + DEFAULTS.backoff.maximum + DEFAULTS.startup_timeout + WEDGE_SLACK_S
)
RECOVERY_TIMEOUT = 45.0  # the soak stops waiting (and the run ends) after this
# A control request that gets no answer within this is wedged (a config load of a few hundred
# rules gets longer); the soak never asks while it holds the supervisor stopped.
REQUEST_DEADLINE_S = 10.0
LOAD_DEADLINE_S = 30.0
# stop-supervisor: both sides of the (control) heartbeat timeout
SUPERVISOR_STOP_S = (0.5, heartbeat_timeout("control") + 2.0)
FLAP_S = (0.2, 2.0)  # link-flap: down for this long
BULK_RULES = (200, 400)  # config-load: rules in the file besides the soak's own
SEGMENT_MAX_S = 120  # a generator's --count covers this long; sinks stop 30 s later at the latest
EXTRA_RULES_MAX = 12
PRE_S = (0.5, 2.0)  # chaos interval: traffic flowing → event
TAIL_S = (0.5, 1.5)  # chaos interval: recovered → generators stopped
WARMUP_S = 5.0  # supervisor samples ignored after each start
SAMPLE_EVERY_S = 0.5
# Growth: descriptors and RSS of the supervisor, its spawner and every worker slot at checkpoints
# (no traffic, the base rules only, everything running), early = after every kind of event has
# happened once, end = after the last. Flat means: descriptors not more than early, RSS at most
# RSS_GROWTH_KIB more (allocator high-water marks after a large config load, not a leak).
RSS_GROWTH_KIB = 4096
CHECKPOINT_EVERY_S = 120.0  # and, for the report, one every this often in between
# Drop counters on the soak's own path (veths, sinks, the relay's rings and sends); the host-wide
# backlog counter is reported but explains nothing by itself. Veth counters count packets, and
# the relay sends with UDP GSO, so one dropped packet can carry several datagrams.
PATH_DROPS = (
    "gen_tx",
    "relay_in_rx",
    "relay_out_tx",
    "sink_rx",
    "sink_socket",
    "relay_ring",
    "relay_send_errors",
)
QUIET_KINDS = ("none", "churn", "kill-control", "config-load")  # must not lose a datagram
KINDS = (
    "none",
    "kill-data",
    "kill-control",
    "pause-worker",
    "stop-worker",
    "kill-supervisor",
    "stop-supervisor",
    "link-flap",
    "churn",
    "config-load",
)
WEIGHTS = {
    "none": 1,
    "kill-data": 3,
    "kill-control": 1,
    "pause-worker": 2,
    "stop-worker": 2,
    "stop-supervisor": 1,
    "link-flap": 2,
    "churn": 3,
    "config-load": 1,
}
ESTIMATE_S = {  # event + recovery, for deciding whether a segment still fits the budget
    "none": 0.0,
    "kill-data": 1.5,
    "kill-control": 1.5,
    "pause-worker": 3.0,
    "stop-worker": 6.0,
    "kill-supervisor": 4.0,
    "stop-supervisor": 6.0,
    "link-flap": 3.0,
    "churn": 2.0,
    "config-load": 6.0,
}
SEGMENT_OVERHEAD_S = 2.0  # sinks ready, generators up, drain and reports


@dataclasses.dataclass
class Options:
    duration_s: float
    seed: int
    rate: float
    json: bool
