"""Fault injection for tests: ``MCRELAY_FAULT_FILE=PATH`` selects faults for worker kinds.

When PATH exists as a worker starts, each line ``KIND:FAULT`` applies to workers of that kind:
``crash-on-start`` (exit at once with status 3) or ``hang`` (stop answering heartbeats); data
workers also take what a broken or compromised worker could say: ``bad-digest`` (acknowledge
every rule set with a wrong digest), ``stats-overflow`` (report a counter of 2^64 − 1),
``send-fd`` (pass a descriptor with its counters), ``install-fail`` (fail to install every
rule whose id starts with ``fail``, as any exception in one rule's installation would) and
``page-garbage`` (after each report, set every count in its counter page to 2^64 − 1). The
supervisor reads the file when it spawns a worker and passes the faults on its command line.
``supervisor:state-dir-fsync`` makes the supervisor's sync of its state directory fail (after
the rule file was renamed into place), read at every save; ``supervisor:state-write`` makes its
write of the temporary rule file fail (ENOSPC), so the save fails and nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path

FAULT_FILE_ENV = "MCRELAY_FAULT_FILE"
KNOWN_FAULTS = frozenset(
    {
        "crash-on-start",
        "hang",
        "bad-digest",
        "stats-overflow",
        "send-fd",
        "install-fail",
        "page-garbage",
        "state-dir-fsync",
        "state-write",
    }
)


def faults_for(kind: str) -> frozenset[str]:
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return frozenset()
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    found = set()
    for line in text.splitlines():
        line_kind, _, fault = line.strip().partition(":")
        if line_kind == kind and fault in KNOWN_FAULTS:
            found.add(fault)
    return frozenset(found)
