"""What each client request does: one match from a validated request to its typed result.

The rule changes themselves are the core's (`Supervisor.replace_rules` and friends); this module
only maps a request onto them and builds the reply's result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies as r
from mcrelay.ipc.vocabulary import RuleState

if TYPE_CHECKING:
    from mcrelay.supervisor.core import Supervisor

log = logging.getLogger("mcrelay.supervisor")


async def carry_out(sup: Supervisor, request: m.ClientRequest, start_by: float | None) -> r.Result:
    """The result of ``request``; McrelayError (one sentence) when it cannot be done."""
    match request:
        case m.Ping():
            return r.Pong(protocol=m.PROTOCOL_VERSION)
        case m.ListWorkers():
            aside = sup.state_moved_aside
            return r.Workers([s.describe(state_moved_aside=aside) for s in sup.slots.values()])
        case m.ListRules():
            listed = [r.RuleInfo.of(rule, *sup.rule_state(rule)) for rule in sup.table.rules]
            listed += [
                r.RuleInfo.of(rule, RuleState.REFUSED, reason)
                for rule, reason in sup.refused.values()
            ]
            return r.Rules(sorted(listed, key=lambda info: info.id))
        case m.AddRule(rule=rule):
            sup.check_against_refused(rule)
            sup.admit([rule])
            _, warning = await sup.change_table(lambda: sup.table.add(rule), start_by)
            log.info("rule %s added", rule.id)
            return r.Changed(rule.id, warning)
        case m.RemoveRule(id=rule_id) if rule_id in sup.refused:
            refused = sup.refused.pop(rule_id)
            try:
                _, warning = await sup.change_table(
                    lambda: sup.table.replace(sup.table.rules), start_by
                )
            except BaseException:
                sup.refused[rule_id] = refused
                raise
            log.info("refused rule %s removed", rule_id)
            return r.Changed(rule_id, warning)
        case m.RemoveRule(id=rule_id):
            _, warning = await sup.change_table(lambda: sup.table.remove(rule_id), start_by)
            log.info("rule %s removed", rule_id)
            return r.Changed(rule_id, warning)
        case m.ReplaceRules(rules=rules, dry_run=True):
            return sup.preview_replace(rules)
        case m.ReplaceRules(rules=rules):
            update, warning = await sup.replace_rules(rules, keep_refused=False, start_by=start_by)
            log.info(
                "rule set replaced: %d added or changed, %d removed or changed",
                len(update.added),
                len(update.removed),
            )
            added = [rule.id for rule in update.added]
            return r.RulesReplaced(added, list(update.removed), warning=warning)
        case m.GetStats():
            return sup.stats.merged(sup.table.rules, sup.data_slots)
        case m.LogLevel(level=level):
            if level is not None:
                await sup.set_log_level(level)
            return r.LogLevelIs(sup.log_level.value)
        case m.RestartWorker(id=worker_id):
            slot = sup.slots.get(worker_id)
            if slot is None:
                known = ", ".join(sup.slots)
                raise McrelayError(f"no worker {worker_id!r} (workers: {known})")
            if slot.spec.kind == "control":
                # It carries this very reply: restart it once the reply is on its way.
                sup.after_reply.append(slot.restart_now)
            else:
                await slot.restart_now()
            return r.Restarted(worker_id)
    raise McrelayError(f"unsupported request {type(request).__name__}")
