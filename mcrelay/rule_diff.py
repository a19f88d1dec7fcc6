"""What a change from one rule set to another adds, removes and changes, by rule id (pure).

The supervisor computes it to answer ``config load`` and to log a reload; the CLI rebuilds it
from a ReplaceRules reply. Both sides use this one type, so it lives outside either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from mcrelay.rules import Rule


@dataclasses.dataclass(frozen=True)
class RuleDiff:
    """Ids that a change from one rule set to another adds, removes and changes."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: int = 0

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @classmethod
    def between(cls, before: Iterable[Rule], after: Iterable[Rule]) -> RuleDiff:
        old = {r.id: r for r in before}
        new = {r.id: r for r in after}
        return cls(
            added=tuple(sorted(new.keys() - old.keys())),
            removed=tuple(sorted(old.keys() - new.keys())),
            changed=tuple(sorted(i for i in new.keys() & old.keys() if new[i] != old[i])),
            unchanged=sum(1 for i in new.keys() & old.keys() if new[i] == old[i]),
        )

    @classmethod
    def from_reply(cls, added: Sequence[str], removed: Sequence[str], total: int) -> RuleDiff:
        """From a ReplaceRules result, whose ``added`` and ``removed`` both list changed ids."""
        changed = set(added) & set(removed)
        return cls(
            added=tuple(sorted(set(added) - changed)),
            removed=tuple(sorted(set(removed) - changed)),
            changed=tuple(sorted(changed)),
            unchanged=total - len(set(added)),
        )
