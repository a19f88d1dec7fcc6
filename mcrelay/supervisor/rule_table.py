"""The master rule table: where rules live, sequenced so workers can be checked against it."""

from __future__ import annotations

import collections
import types
from collections.abc import Iterable, Mapping

from mcrelay import rules as rules_mod
from mcrelay.errors import RuleError
from mcrelay.ipc.messages import RuleUpdate
from mcrelay.rules import MatchKey, Rule

_DIGEST_HISTORY = 256


class RuleTable:
    """Rules by id, a sequence number bumped on every change, and the digest at recent seqs."""

    def __init__(self) -> None:
        self._rules: dict[str, Rule] = {}
        self.seq = 0
        self._digests: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._record()

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._rules

    @property
    def by_id(self) -> Mapping[str, Rule]:
        """The rules by id, read-only and live (no copy)."""
        return types.MappingProxyType(self._rules)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(sorted(self._rules.values(), key=lambda r: r.id))

    @property
    def digest(self) -> str:
        return self._digests[self.seq]

    def digest_at(self, seq: int) -> str | None:
        """The digest the table had at ``seq``, if it is recent enough to remember."""
        return self._digests.get(seq)

    def _record(self) -> None:
        self._digests[self.seq] = rules_mod.digest(self._rules.values())
        while len(self._digests) > _DIGEST_HISTORY:
            self._digests.popitem(last=False)

    @staticmethod
    def _check_new(rule: Rule, existing: dict[str, Rule], inputs: dict[MatchKey, str]) -> None:
        rules_mod.validate(rule)
        if rule.id in existing:
            raise RuleError(f"a rule with id {rule.id!r} already exists")
        other = inputs.get(rule.match_key)
        if other is not None:
            raise RuleError(
                f"rule {other!r} already relays {rule.input.group}:{rule.input.port} "
                f"on {rule.input.interface}"
            )

    def add(self, rule: Rule) -> RuleUpdate:
        inputs = {r.match_key: r.id for r in self._rules.values()}
        self._check_new(rule, self._rules, inputs)
        self._rules[rule.id] = rule
        return self._commit(added=(rule,))

    def remove(self, rule_id: str) -> RuleUpdate:
        if rule_id not in self._rules:
            raise RuleError(f"no rule with id {rule_id!r}")
        del self._rules[rule_id]
        return self._commit(removed=(rule_id,))

    def replace(self, new_rules: Iterable[Rule]) -> RuleUpdate:
        """Make the table equal to ``new_rules``; a bad set is refused whole and changes nothing."""
        staged: dict[str, Rule] = {}
        inputs: dict[MatchKey, str] = {}
        for rule in new_rules:
            self._check_new(rule, staged, inputs)
            staged[rule.id] = rule
            inputs[rule.match_key] = rule.id
        removed = tuple(rid for rid, r in self._rules.items() if staged.get(rid) != r)
        added = tuple(r for rid, r in staged.items() if self._rules.get(rid) != r)
        self._rules = staged
        return self._commit(added=added, removed=removed)

    def snapshot(self) -> tuple[dict[str, Rule], int]:
        return dict(self._rules), self.seq

    def restore(self, snapshot: tuple[dict[str, Rule], int]) -> None:
        """Undo changes made since ``snapshot`` (a change that could not be saved)."""
        self._rules, seq = dict(snapshot[0]), snapshot[1]
        for later in [s for s in self._digests if s > seq]:
            del self._digests[later]
        self.seq = seq

    def _commit(self, added: tuple[Rule, ...] = (), removed: tuple[str, ...] = ()) -> RuleUpdate:
        self.seq += 1
        self._record()
        return RuleUpdate(seq=self.seq, added=added, removed=removed)
