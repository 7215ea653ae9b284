"""Per-host decisions: the policy row of each host's plane states, held until it lasts, then acted
upon (alert, disable, live-migrate, evacuate); tasks withdrawn when the row changes; fabric
outages, the cluster-wide pause, maintenance, and the results of host operations.
"""

from __future__ import annotations

from vmha.core.actions import Alert, CancelProof, DisableHost, RecoveryOutput
from vmha.core.desired import STOPPED_KEY
from vmha.core.events import HostOp
from vmha.core.fencing import proof_methods
from vmha.core.health import FabricChange, HostHealth
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import AGENT_STOPPED_KEY, FABRIC_KEY, MAINTENANCE_KEY, Action, Decision
from vmha.core.queue import ACTOR, RUNNING, Step, Task, TaskKind, TaskState
from vmha.core.rejoin import Rejoin
from vmha.core.state import EVACUATING_ACTIONS, HostDecision


class HostDecisions(Rejoin):
    """What to do about each host: its policy row, held until it lasts, then acted upon (`_act`)."""

    def _reconcile(self, host: str, now: float, out: RecoveryOutput) -> None:
        hh = self._health.get(host)
        if hh is None or any(hh.planes.get(p) is None or hh.planes[p].state == PlaneState.UNKNOWN
                             for p in PLANES):
            self._not_healthy(host)
            return  # not everything known yet (e.g. just after a takeover): decide nothing
        decision = self.policy.decide(hh.states())
        if host in self._maintenance and decision.action is not None:
            decision = Decision(MAINTENANCE_KEY, Action.ALERT)
        elif host in self._agent_stopped and decision.action is not None:
            decision = Decision(AGENT_STOPPED_KEY, Action.ALERT)
        if decision.action is None and any(hh.planes[p].state != PlaneState.UP for p in PLANES):
            # SUSPECT, nothing failed: not back yet, not failed yet (e.g. after a fabric outage); a
            # host on its way back must be UP for rejoin_after in one stretch
            self._not_healthy(host)
            return
        cur = self._decisions.get(host)
        if cur is None or cur.decision != decision:
            self._pause_held.discard(host)  # a new row: alerted anew if it waits for the resume
            old = cur.decision if cur is not None else Decision("", None)
            if decision.action is None:
                self._decisions.pop(host, None)
                self._handled.pop(host, None)
                self._episode.discard(host)
                # What we did to the host (disable, mark down) holds until it rejoins (rejoin_after)
                # or the operator re-enables it (`vmha host enable`, HostEnabled): until then it
                # receives no VM.
                self._dests = None
                if old.action is not None:
                    out.log.append(LogLine(Level.INFO, now, ACTOR,
                                           f"host '{host}': healthy again (was row {old.key})"))
                    self._out_row.setdefault(host, old.key)
                self._healthy(host, now, out)
            else:
                self._not_healthy(host)
                # A new row with the same action (storage -> management+storage) is the same episode.
                same = cur is not None and cur.acted and cur.decision.action == decision.action
                wait = self.settings.settle_after if _better(old, decision) else self.settings.decide_after
                self._decisions[host] = cur = HostDecision(decision, now, now + wait, acted=same)
                if not same:
                    self._held.add(host)
                hold = f", acting at {now + wait:.1f} if it holds" if wait and not same else ""
                out.log.append(LogLine(
                    Level.WARN, now, ACTOR,
                    f"host '{host}': row {decision.key} -> {decision.action.value if decision.action else '-'}"
                    f" ({self._failed_text(hh)}{hold})"))
            self._withdraw(host, decision, now, out)
        if cur is not None and not cur.acted and now >= cur.act_at:
            self._act(host, cur, hh, now, out)

    def _withdraw(self, host: str, decision: Decision, now: float, out: RecoveryOutput) -> None:
        """The host's row changed: cancel the tasks the new row no longer calls for and that have
        not passed the point of no return (a proof: the old copy is gone, the restart must follow)."""
        proved: list[str] = []
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.active(vm)
            if task is None or task.source != host or task.row in (MAINTENANCE_KEY, STOPPED_KEY) \
                    or vm in self._unverified:
                # A drain is the operator's, not the health row's: maintenance off ends it. A restart's
                # proof only observes a death: the row changes nothing to it. A resumed task waits for
                # its check against the world.
                continue
            if task.kind == TaskKind.EVACUATE:
                if decision.action not in EVACUATING_ACTIONS and task.proof is not None:
                    proved.append(vm)
                if decision.action in EVACUATING_ACTIONS or task.proof is not None:
                    continue
            elif decision.action == Action.LIVE_MIGRATE or task.state == TaskState.MIGRATING:
                continue
            if task.kind == TaskKind.EVACUATE and decision.action is None:
                # Back before a proof, but sanlock may have killed the VM meanwhile (a storage blip):
                # the lease decides, not the host's return.
                if not task.recheck:
                    self._recheck(task, now, out)
                continue
            why = f"host back to row {decision.key or 'none'} before a proof" if decision.action is None \
                else f"row now {decision.key} ({decision.action.value if decision.action else '-'})"
            if task.state == TaskState.PROVING:
                attempt = self._attempt(task)
                out.actions.append(CancelProof(vm, host, attempt))
                self._late_proof[vm] = attempt
                task.finish(Step.PROVE, now, "cancelled")
            self._transition(task, TaskState.CANCELLED, now, f"cancelled: {why}", out)
            self._record_evidence(task, out)
        if proved:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': row {decision.key or 'none'}, but "
                                   f"{', '.join(proved)} already proved dead there: their recovery continues"))

    def _act(self, host: str, cur: HostDecision, hh: HostHealth, now: float, out: RecoveryOutput) -> None:
        action = cur.decision.action
        assert action is not None
        key = cur.decision.key
        if key == MAINTENANCE_KEY:
            cur.acted = True
            out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': in maintenance, alert only "
                                     f"({self._failed_text(hh)})"))
            return
        if key == AGENT_STOPPED_KEY:
            cur.acted = True
            out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': its agent was stopped cleanly at "
                                     f"{self._agent_stopped.get(host, 0.0):.1f} ({self._failed_text(hh)}): its "
                                     "running VMs are not protected until the agent runs again; those it "
                                     "stopped are recovered once proved stopped"))
            return
        if self._paused and action != Action.ALERT:
            if host not in self._pause_held:
                self._pause_held.add(host)
                out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': row {key} ({action.value}) "
                                         f"waits: recoveries are paused ({self._failed_text(hh)})"))
            return
        if action != Action.ALERT:
            self._count_failure(host, key, now, out)
        if action == Action.ALERT:
            cur.acted = True
            text = f"host '{host}': row {key}: alert only ({self._failed_text(hh)})"
            if key == FABRIC_KEY:
                # The outage itself was alerted once, naming its hosts: one alert per host on top of
                # it would flood the operator (600 in a 600-host outage). The log keeps each host.
                out.log.append(LogLine(Level.INFO, now, ACTOR, text))
            else:
                out.actions.append(Alert(Level.WARN, host, None, text))
            return
        if action in (Action.DISABLE, Action.LIVE_MIGRATE):
            self._disable(host, f"row {key}: {self._failed_text(hh)}", now, out)
            if action == Action.DISABLE:
                cur.acted = True
                out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': row {key}: scheduling "
                                         f"disabled, VMs left running ({self._failed_text(hh)})"))
                return
        if not self._inventory:
            if not cur.waiting_inventory:
                cur.waiting_inventory = True
                out.log.append(LogLine(Level.INFO, now, ACTOR,
                                       f"host '{host}': waiting for the inventory before acting"))
            return
        cur.acted = True
        kind = TaskKind.MIGRATE if action == Action.LIVE_MIGRATE else TaskKind.EVACUATE
        failed = {p.value: hh.planes[p].since for p in PLANES
                  if hh.planes[p].state in (PlaneState.DOWN, PlaneState.FABRIC)}
        handled = self._handled.get(host, set())
        vms = [self._vms[v] for v in sorted(self._vms_on.get(host, ()))]
        new: list[Task] = []
        skipped_non_ha = skipped_known = 0
        for vm in vms:
            if not vm.ha:
                skipped_non_ha += 1
                continue
            if vm.name in handled or self.queue.active(vm.name) is not None:
                skipped_known += 1
                continue
            task = Task(vm=vm.name, source=host, kind=kind, recovery=self.queue.next_recovery(vm.name),
                        priority=vm.priority, row=key, action=action.value, failed=failed, created=now)
            self.queue.add(task, now)
            self._late_proof.pop(vm.name, None)  # a result of the old task's proof is no longer awaited
            self._by_source.setdefault(host, set()).add(vm.name)
            new.append(task)
        out.log.append(LogLine(Level.INFO, now, ACTOR,
                               f"host '{host}': {action.value} {len(new)} HA VM(s)"
                               + (f", {skipped_known} already handled" if skipped_known else "")
                               + (f", {skipped_non_ha} non-HA VM(s) left alone" if skipped_non_ha else "")))
        if kind == TaskKind.EVACUATE:
            self._capacity_check(now, out)
        methods = proof_methods(hh.states(), power_fence=self.settings.power_fence,
                                allow_exit_attested=self.settings.allow_exit_attested)
        for task in new:
            if kind == TaskKind.MIGRATE:
                self._transition(task, TaskState.READY, now,
                                 f"row {key}, action {action.value}, priority {task.priority}", out)
            else:
                self._prove(task, methods, now, out, f"row {key}, action {action.value}")

    def _disable(self, host: str, reason: str, now: float, out: RecoveryOutput) -> None:
        if host in self._disabled:
            return
        self._disabled.add(host)
        self._dests = None
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': disable scheduling ({reason})"))
        out.actions.append(DisableHost(host, reason))

    def _fabric(self, change: FabricChange, now: float, out: RecoveryOutput) -> None:
        where = "cluster" if change.domain is None else f"domain {change.domain}"
        if change.active:
            text = (f"fabric outage of plane {change.plane.value} in {where} "
                    f"(hosts {', '.join(change.hosts)}): nothing is evacuated because of it")
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, None, None, text))
        else:
            out.log.append(LogLine(Level.INFO, now, ACTOR,
                                   f"fabric outage of plane {change.plane.value} in {where} over"))

    def _pause(self, on: bool, why: str, now: float, out: RecoveryOutput) -> None:
        if on == self._paused:
            return
        self._paused = on
        if on:
            out.actions.append(Alert(Level.WARN, None, None, f"recoveries paused cluster-wide ({why}): new "
                                     "recoveries wait, those started run to their end"))
            return
        waiting = sorted(self._pause_held)
        self._pause_held.clear()
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"recoveries resumed ({why}); hosts waiting: "
                               f"{', '.join(waiting) or 'none'}"))
        self._held.update(waiting)  # _timers acts on them in this step

    def _maintenance_set(self, host: str, who: str, on: bool, why: str, now: float, out: RecoveryOutput) -> None:
        reasons = self._maintenance.get(host, set())
        was = bool(reasons)
        reasons = reasons | {who} if on else reasons - {who}
        if reasons:
            self._maintenance[host] = reasons
        else:
            self._maintenance.pop(host, None)
        if was == bool(reasons):
            return  # still (or still not) in maintenance, for another reason
        if not on:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': maintenance off ({why})"))
            self._cancel_drain(host, now, out)
            cur = self._decisions.get(host)
            if cur is not None and cur.decision.key == MAINTENANCE_KEY:
                del self._decisions[host]  # its real row, if any, is decided afresh
            if (host not in self._decisions and self._all_up(host) and host in self._disabled
                    and host not in self._marked_down and host not in self._quarantined):
                self._rejoining.add(host)  # nothing was fenced: back to placement at once
                self._enable(host, f"maintenance over ({why}), every plane up", now, out)
            else:
                self._reconcile(host, now, out)  # a fault meanwhile is acted upon; else it rejoins
                if host not in self._decisions and self._all_up(host):
                    self._healthy(host, now, out)
            return
        self._not_healthy(host)
        self._disable(host, f"maintenance ({why})", now, out)
        self._drain(host, sorted(self._vms_on.get(host, ())), f"maintenance on ({why})", now, out)

    def _cancel_drain(self, host: str, now: float, out: RecoveryOutput) -> None:
        """Maintenance off: drain tasks not moving yet are cancelled (a migration in flight ends)."""
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.active(vm)
            if task is None or task.source != host or task.row != MAINTENANCE_KEY or task.state in RUNNING:
                continue
            if task.state == TaskState.RETRY_WAIT:
                task.retry_at, task.resume = None, None
            self._transition(task, TaskState.CANCELLED, now, "cancelled: maintenance off", out)
            self._record_evidence(task, out)

    def _host_op_done(self, host: str, op: HostOp, now: float, out: RecoveryOutput) -> None:
        if op == HostOp.ENABLE:
            self._rejoin_done(host, now, out)
            return
        if op == HostOp.DISABLE:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': disabled"))
            return
        self._marking_down.discard(host)
        self._marked_down.add(host)
        self._dests = None
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': marked down"))
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.get(vm)
            if task is not None and task.state == TaskState.MARKING_DOWN and task.source == host:
                task.finish(Step.MARK_DOWN, now, "ok")
                self._transition(task, TaskState.READY, now, f"host marked down, priority {task.priority}", out)

    def _host_op_failed(self, host: str, op: HostOp, reason: str, retryable: bool, now: float,
                        out: RecoveryOutput) -> None:
        if op == HostOp.ENABLE:
            self._rejoining.discard(host)
            if host not in self._decisions and self._all_up(host):
                self._healthy(host, now, out)  # an enable at maintenance off has no clock running yet
            if host in self._healthy_since:
                self._rejoin_retry[host] = now + self.settings.rejoin_after
            text = (f"host '{host}': enable failed ({reason}): it stays out, tried again in "
                    f"{self.settings.rejoin_after:g}s")
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, host, None, text))
            return
        if op == HostOp.DISABLE:
            self._disabled.discard(host)
            self._dests = None
            text = f"host '{host}': disable failed: {reason}"
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, host, None, text))
            return
        self._marking_down.discard(host)
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"host '{host}': mark down failed: {reason}"))
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.get(vm)
            if task is not None and task.state == TaskState.MARKING_DOWN and task.source == host:
                self._fail_step(task, Step.MARK_DOWN, reason, retryable, now, out)


def _better(old: Decision, new: Decision) -> bool:
    """The host lost fewer planes than before (a strict subset): it is on its way back."""
    if old.action is None or {FABRIC_KEY, AGENT_STOPPED_KEY, MAINTENANCE_KEY} & {old.key, new.key}:
        return False
    before, after = set(old.key.split("+")), set(new.key.split("+"))
    return after < before
