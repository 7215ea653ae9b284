"""Rejoin and quarantine: a host vmha took out (disabled, marked down) comes back once healthy long
enough and, if it was fenced, checked; a host that fails too often stays out until the operator
enables it.
"""

from __future__ import annotations

from vmha.core.actions import Alert, CheckRejoin, EnableHost, QuarantineHost, RecoveryOutput
from vmha.core.events import HostOp
from vmha.core.log import Level, LogLine
from vmha.core.queue import ACTOR, TaskKind
from vmha.core.takeover import Takeover


class Rejoin(Takeover):
    """Hosts coming back to placement, and those kept out (quarantine)."""

    def _healthy(self, host: str, now: float, out: RecoveryOutput) -> None:
        """Every plane of the host is UP: if we took it out, its rejoin clock starts."""
        if (not self.settings.rejoin_after or host in self._healthy_since or host in self._maintenance
                or host in self._rejoining):
            return
        if host not in self._disabled and host not in self._marked_down:
            return
        if host in self._quarantined:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': healthy, but quarantined: it "
                                   f"stays out until `vmha host enable {host}`"))
            return
        self._healthy_since[host] = now
        self._rejoin_retry.pop(host, None)
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoins at "
                               f"{now + self.settings.rejoin_after:.1f} if it stays healthy"))

    def _not_healthy(self, host: str) -> None:
        self._healthy_since.pop(host, None)
        self._rejoin_retry.pop(host, None)
        self._rejoin_wait.discard(host)

    def _rejoin_at(self, host: str) -> float:
        return max(self._healthy_since[host] + self.settings.rejoin_after, self._rejoin_retry.get(host, 0.0))

    def _try_rejoin(self, host: str, now: float, out: RecoveryOutput) -> None:
        since = self._healthy_since[host]
        unproved = sorted(vm for vm in self._by_source.get(host, ())
                          if (t := self.queue.active(vm)) is not None and t.source == host
                          and t.kind == TaskKind.EVACUATE and t.proof is None)
        if unproved:
            # A recovery from the host not proved yet: its VM's fate is open (the recheck decides).
            if host not in self._rejoin_wait:
                self._rejoin_wait.add(host)
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoin waits for the "
                                       f"recovery of {', '.join(unproved)} (not proved yet)"))
            return
        self._rejoin_wait.discard(host)
        self._rejoining.add(host)
        healthy = f"every plane up since {since:.1f}"
        if host in self._marked_down:
            vms = tuple(sorted(self._by_source.get(host, ())))
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {self._why_out(host, 'fenced')}, "
                                   f"{healthy}, its agent beating again: checking its lockspace and leases"
                                   + (f" ({', '.join(vms)} recovered from it)" if vms else "")))
            out.actions.append(CheckRejoin(host, vms))
            return
        self._enable(host, f"nothing was fenced there ({self._why_out(host, 'disabled')}), {healthy}", now, out)

    def _why_out(self, host: str, what: str) -> str:
        row = self._out_row.get(host)
        return f"{what} for row {row}" if row else f"{what} by an earlier leader"

    def _enable(self, host: str, evidence: str, now: float, out: RecoveryOutput) -> None:
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoins ({evidence})"))
        out.actions.append(EnableHost(host, evidence))

    def _rejoin_checked(self, host: str, ok: bool, evidence: str, now: float, out: RecoveryOutput) -> None:
        if host not in self._rejoining or host not in self._healthy_since:
            self._rejoining.discard(host)
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoin check ignored "
                                   f"(no longer waiting to rejoin): {evidence}"))
            return
        if ok:
            since = self._healthy_since[host]
            self._enable(host, f"{self._why_out(host, 'fenced')}, every plane up since "
                               f"{since:.1f}, agent beating again, {evidence}", now, out)
            return
        self._rejoining.discard(host)
        self._rejoin_retry[host] = now + self.settings.rejoin_after
        text = (f"host '{host}': rejoin check failed ({evidence}): it stays out, checked again at "
                f"{now + self.settings.rejoin_after:.1f}")
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, host, None, text))

    def _rejoin_done(self, host: str, now: float, out: RecoveryOutput) -> None:
        self._rejoining.discard(host)
        self._disabled.discard(host)
        self._marked_down.discard(host)
        self._not_healthy(host)
        self._out_row.pop(host, None)
        self._rejoined.add(host)
        self._dests = None
        self._rebalance_due = self.settings.rebalance
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoined, a destination again"))

    def _host_enabled(self, host: str, now: float, out: RecoveryOutput) -> None:
        undone = [what for what, flags in (("disabled", self._disabled), ("marked down", self._marked_down),
                                           ("quarantined", self._quarantined)) if host in flags]
        if not undone and host in self._rejoined:
            self._rejoined.discard(host)  # our own rejoin's keys.disabled deletion, seen by the watch
            return
        self._rejoined.discard(host)
        self._disabled.discard(host)
        self._marked_down.discard(host)
        self._quarantined.discard(host)
        self._failures.pop(host, None)
        self._not_healthy(host)
        self._out_row.pop(host, None)
        self._dests = None
        self._rebalance_due = self.settings.rebalance
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': enabled by the operator"
                               + (f" (was {' and '.join(undone)} by vmha)" if undone else "")))

    def _host_out(self, host: str, op: HostOp, quarantine: str, now: float, out: RecoveryOutput) -> None:
        flags = self._marked_down if op == HostOp.MARK_DOWN else self._disabled
        if op == HostOp.ENABLE or host in flags:
            return
        flags.add(host)
        self._dests = None
        if quarantine:
            self._quarantined.add(host)
            self._not_healthy(host)
        what = "marked down" if op == HostOp.MARK_DOWN else "disabled"
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {what} by an earlier leader, "
                               "not enabled since" + (f", quarantined ({quarantine})" if quarantine else "")))
        if host not in self._decisions and self._all_up(host):
            self._healthy(host, now, out)

    def _count_failure(self, host: str, row: str, now: float, out: RecoveryOutput) -> None:
        """One failure per episode (from healthy to healthy again), for quarantine."""
        if not self.settings.quarantine_after or host in self._episode:
            return
        self._episode.add(host)
        window = self.settings.quarantine_window
        seen = [(t, r) for t, r in self._failures.get(host, []) if now - t <= window] + [(now, row)]
        self._failures[host] = seen
        if len(seen) < self.settings.quarantine_after or host in self._quarantined:
            return
        self._quarantined.add(host)
        self._not_healthy(host)
        text = (f"host '{host}': quarantined after {len(seen)} failures within {window:g}s ("
                + ", ".join(f"row {r} at {t:.1f}" for t, r in seen)
                + f"): it stays out until `vmha host enable {host}`")
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, host, None, text))
        out.actions.append(QuarantineHost(host, text))
