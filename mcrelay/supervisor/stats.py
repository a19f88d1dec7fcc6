"""Merging counters pushed by data workers into one view that survives worker restarts.

Workers push cumulative counters since they started. When a worker's pid changes, its last report
is folded into ``retired`` totals, so a crash loses at most one push interval of counts.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

import trio

from mcrelay.ipc.messages import OutputCounters, RuleCounters, StatsReport
from mcrelay.rules import Rule


@dataclasses.dataclass
class _Totals:
    rules: dict[str, RuleCounters] = dataclasses.field(default_factory=dict)
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kernel_drops: int = 0

    def add(self, report: StatsReport, sign: int = 1) -> None:
        for rule_id, rc in report.rules.items():
            mine = self.rules.setdefault(rule_id, RuleCounters())
            mine.packets_in += sign * rc.packets_in
            mine.bytes_in += sign * rc.bytes_in
            for key, oc in rc.outputs.items():
                out = mine.outputs.setdefault(key, OutputCounters())
                out.packets += sign * oc.packets
                out.bytes += sign * oc.bytes
                out.errors += sign * oc.errors
        for reason, count in report.drops.items():
            self.drops[reason] += sign * count
        self.kernel_drops += sign * report.kernel_drops


@dataclasses.dataclass
class _Incarnation:
    pid: int | None
    report: StatsReport
    at: float
    previous: StatsReport | None = None
    previous_at: float | None = None


class StatsBook:
    def __init__(self) -> None:
        self._retired = _Totals()
        self._live: dict[str, _Incarnation] = {}

    def record(self, worker_id: str, pid: int | None, report: StatsReport) -> None:
        now = trio.current_time()
        current = self._live.get(worker_id)
        if current is not None and current.pid == pid:
            self._live[worker_id] = _Incarnation(pid, report, now, current.report, current.at)
            return
        if current is not None:
            self._retired.add(current.report)
        self._live[worker_id] = _Incarnation(pid, report, now)

    def merged(self, rules: Iterable[Rule], workers: Iterable[Any]) -> dict[str, Any]:
        """The view `mcrelay stats` shows: per rule and output, totals and recent rates."""
        totals = _Totals()
        totals.add(_as_report(self._retired))
        rates = _Totals()
        span = 0.0
        for inc in self._live.values():
            totals.add(inc.report)
            if inc.previous is not None and inc.previous_at is not None:
                rates.add(inc.report)
                rates.add(inc.previous, sign=-1)
                span = max(span, inc.at - inc.previous_at)
        out_rules = []
        for rule in rules:
            t = totals.rules.get(rule.id, RuleCounters())
            r = rates.rules.get(rule.id, RuleCounters())
            outputs = []
            for output in rule.outputs:
                key = str(output)
                oc = t.outputs.get(key, OutputCounters())
                orate = r.outputs.get(key, OutputCounters())
                outputs.append(
                    {
                        "output": key,
                        "packets": oc.packets,
                        "bytes": oc.bytes,
                        "errors": oc.errors,
                        "pps": _rate(orate.packets, span),
                        "bps": _rate(orate.bytes * 8, span),
                    }
                )
            out_rules.append(
                {
                    "id": rule.id,
                    "packets_in": t.packets_in,
                    "bytes_in": t.bytes_in,
                    "pps_in": _rate(r.packets_in, span),
                    "bps_in": _rate(r.bytes_in * 8, span),
                    "outputs": outputs,
                }
            )
        return {
            "rules": out_rules,
            "drops": dict(sorted(totals.drops.items())),
            "kernel_drops": totals.kernel_drops,
            "interval_s": round(span, 3),
        }


def _rate(delta: int, span: float) -> float:
    return round(delta / span, 1) if span > 0 else 0.0


def _as_report(totals: _Totals) -> StatsReport:
    return StatsReport(
        rules=totals.rules, drops=dict(totals.drops), kernel_drops=totals.kernel_drops
    )
