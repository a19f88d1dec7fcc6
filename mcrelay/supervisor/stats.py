"""Merging counters pushed by data workers into one view that survives worker restarts.

Workers push cumulative counters since they started, once a second: the live view and the
rates. When a worker process is gone, however it died, what its counter page held at its death
(`mcrelay.supervisor.counter_pages`) is folded into ``retired`` totals, so a crash loses no
count. The page is the worker's to write: a count below what the worker last reported is taken
as reported, and one out of bounds never reaches the totals. A process without a page has its
last report folded instead (it then loses what it counted since).

Reports are trusted no further than the table: counters of rules and outputs the table does not
hold are dropped on arrival, and retired totals are pruned to the table whenever it changes, so
memory follows the live rules, not every id a worker ever named. Each count is bounded on the
wire (``MAX_COUNT``); sums shown are capped at 2^64 − 1 so a reply can always be encoded.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from mcrelay.ipc.messages import OutputCounters, RuleCounters, StatsReport
from mcrelay.ipc.replies import OutputStats, RuleStats, Stats
from mcrelay.rules import Rule

#: The largest value a reply or scrape shows (msgpack and JSON consumers take unsigned 64 bits).
MAX_SHOWN = 2**64 - 1


@dataclasses.dataclass
class _Totals:
    rules: dict[str, RuleCounters] = dataclasses.field(default_factory=dict)
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kernel_drops: int = 0

    def add(self, report: StatsReport, sign: int = 1) -> None:
        combine = operator.add if sign > 0 else operator.sub
        for rule_id, rc in report.rules.items():
            mine = self.rules.get(rule_id)
            if mine is None:
                mine = self.rules[rule_id] = RuleCounters()
            mine.fold(rc, combine)
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

    def record(
        self, worker_id: str, pid: int | None, report: StatsReport, rules: Mapping[str, Rule]
    ) -> None:
        """Keep ``report`` as the latest of ``worker_id`` (process ``pid``), reduced to the
        rules and outputs in ``rules`` (the table, by id). A rule the report does not carry
        keeps the count the process last reported (it did not change)."""
        now = trio.current_time()
        current = self._live.get(worker_id)
        if current is not None and current.pid == pid:
            merged = {**current.report.rules, **report.rules}
            report = StatsReport(merged, report.drops, report.kernel_drops)
            report = _known_only(report, rules)
            self._live[worker_id] = _Incarnation(pid, report, now, current.report, current.at)
            return
        report = _known_only(report, rules)
        if current is not None:
            self._retired.add(current.report)
        self._live[worker_id] = _Incarnation(pid, report, now)

    def retire(
        self,
        worker_id: str,
        pid: int,
        final: StatsReport | None,
        rules: Mapping[str, Rule],
    ) -> int:
        """Process ``pid`` of ``worker_id`` is gone: fold ``final`` (its counter page), never
        below its last report, or else that report, into the retired totals. How many of the
        page's counts were below the report (0 for a sane worker)."""
        current = self._live.get(worker_id)
        last = None
        if current is not None and current.pid == pid:
            del self._live[worker_id]
            last = current.report
        if final is None:
            if last is not None:
                self._retired.add(last)
            return 0
        final, lowered = _at_least(_known_only(final, rules), last)
        self._retired.add(final)
        return lowered

    def retire_kernel_drops(self, count: int) -> None:
        """Frames a dead worker's rings dropped after its last report, read by the supervisor
        when it closes the slot's capture sockets (otherwise the replacement reads and reports
        them)."""
        self._retired.kernel_drops += count

    def prune(self, rules: Mapping[str, Rule]) -> None:
        """Forget retired counters of rules and outputs no longer in the table."""
        self._retired.rules = _known_only(_as_report(self._retired), rules).rules

    def merged(self, rules: Iterable[Rule], workers: Iterable[Any]) -> Stats:
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
                    OutputStats(
                        output=key,
                        packets=_shown(oc.packets),
                        bytes=_shown(oc.bytes),
                        errors=_shown(oc.errors),
                        pps=_rate(orate.packets, span),
                        bps=_rate(orate.bytes * 8, span),
                    )
                )
            out_rules.append(
                RuleStats(
                    id=rule.id,
                    packets_in=_shown(t.packets_in),
                    bytes_in=_shown(t.bytes_in),
                    pps_in=_rate(r.packets_in, span),
                    bps_in=_rate(r.bytes_in * 8, span),
                    outputs=outputs,
                )
            )
        return Stats(
            rules=out_rules,
            drops={k: _shown(v) for k, v in sorted(totals.drops.items())},
            kernel_drops=_shown(totals.kernel_drops),
            interval_s=round(span, 3),
        )


def _shown(value: int) -> int:
    return min(value, MAX_SHOWN)


@functools.lru_cache(maxsize=1 << 16)
def _output_keys(rule: Rule) -> frozenset[str]:
    return frozenset(str(o) for o in rule.outputs)


def _known_only(report: StatsReport, rules: Mapping[str, Rule]) -> StatsReport:
    kept: dict[str, RuleCounters] = {}
    for rule_id, counters in report.rules.items():
        rule = rules.get(rule_id)
        if rule is None:
            continue
        outputs = _output_keys(rule)
        if counters.outputs.keys() <= outputs:
            kept[rule_id] = counters
        else:
            known = {k: v for k, v in counters.outputs.items() if k in outputs}
            kept[rule_id] = RuleCounters(counters.packets_in, counters.bytes_in, known)
    return StatsReport(rules=kept, drops=report.drops, kernel_drops=report.kernel_drops)


def _at_least(report: StatsReport, floor: StatsReport | None) -> tuple[StatsReport, int]:
    """``report`` with every count raised to ``floor``'s where it is lower, and how many were."""
    if floor is None:
        return report, 0
    lowered = 0

    def most(value: int, low: int) -> int:
        nonlocal lowered
        if value < low:
            lowered += 1
            return low
        return value

    rules = dict(report.rules)
    for rule_id, low in floor.rules.items():
        got = rules.get(rule_id)
        raised = RuleCounters() if got is None else got.copy()
        raised.fold(low, most)
        rules[rule_id] = raised
    drops = dict(report.drops)
    for reason, count in floor.drops.items():
        drops[reason] = most(drops.get(reason, 0), count)
    kernel = max(report.kernel_drops, floor.kernel_drops)
    return StatsReport(rules=rules, drops=drops, kernel_drops=kernel), lowered


def _rate(delta: int, span: float) -> float:
    return round(delta / span, 1) if span > 0 else 0.0


def _as_report(totals: _Totals) -> StatsReport:
    return StatsReport(
        rules=totals.rules, drops=dict(totals.drops), kernel_drops=totals.kernel_drops
    )
