"""Chaos soak of a real relay (see scripts/soak and docs/soak.md).

gen-ns → relay-ns → sink-ns (tests/lab/topology.py), a real supervisor with 2 data workers and
its own --state-dir in a temporary directory. The run is a sequence of *segments*: sinks join,
one generator per stream starts, and after a random (seeded) interval exactly one event is
induced — a worker SIGKILLed, or SIGSTOPped and SIGCONTed before or after the heartbeat timeout,
the supervisor SIGKILLed (and started again on the same state directory) or SIGSTOPped and
SIGCONTed, the input or output link set down and up, rules added and removed, a config load of a
few hundred rules and back, or nothing (a baseline) — then the soak waits for full recovery, lets
traffic run a little longer, stops the generators and collects the sinks. So every lost packet
belongs to exactly one event. At checkpoints (no traffic, the base rules only) it reads the
descriptors and RSS of every mcrelay process. At the end: no rule lost (`mcrelay rules --json`
equals the soak's bookkeeping), no orphan process or socket file, no wedge (a control request
unanswered within its deadline, or a worker not running again within heartbeat timeout + the
restart backoff's bound), descriptors and RSS flat from the early checkpoint to the end, and the
supervisor stops cleanly. Any of these failing makes the exit status 1.

Safety: traffic only inside the namespaces built here, to 239.0.0.0/8; processes are signalled
through pidfds after checking their identity (pid + start time), only ever ones this run started
(the supervisor's own Popen, workers it listed); every wait has a deadline; everything is ended
(a stopped supervisor is continued first) and the namespaces deleted on any exit, Ctrl-C and
SIGTERM included.
"""
