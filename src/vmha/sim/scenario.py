"""Scenario files (Proxmox's src/test/test-*/ style): a directory with

  setup.toml   hosts (name = failure domain), vms, [settings] (RecoverySettings), [timings]
               (HealthTimings), [sim] (SimTimings; proof_delay by method name), [policy] overrides
  cmdlist      timed commands, one per line: `<seconds> <command> <args...>`, '#' comments
  log.expect   the expected log (regenerated with VMHA_REWRITE=1; review the diff)

Commands:
  cut HOST PLANE|all             restore HOST PLANE|all
  power-off HOST                 power-on HOST
  enable HOST                    (`vmha host enable HOST`: the operator re-enables a repaired host)
  maintenance HOST on|off        (`vmha host maintenance HOST on|off`: drain it, or return it)
  agent-stop HOST    agent-kill HOST    agent-start HOST   (the host's agent: clean stop, crash, start)
  vm-kill VM                     (the VM's copies end, their leases released: a guest crash)
  fabric PLANE down|up [DOMAIN]  (a plane lost for every host, or the hosts of one domain)
  etcd-leader-change             (no writes for sim.election s, then leases extended TTL + 1 s)
  manager-failover               (the leading manager dies; a standby loads the persisted tasks)
  forge-task VM STATE SOURCE DEST  (etcd write access: tasks/VM in STATE (marking-down, ready,
                                 evacuating) off SOURCE with a made-up proof; the next leader loads it)
  fail-evacuate VM N [fatal]     fail-migrate VM N [fatal]     fail-proof VM N [fatal]
  fail-mark-down HOST N [fatal]  (the next N attempts fail; fatal: not retryable)
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vmha.core.fencing import ProofMethod
from vmha.core.health import HealthTimings
from vmha.core.log import Level
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import TaskState
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import VmInfo
from vmha.sim.env import SIM, Sim, SimTimings


class ScenarioError(ValueError):
    pass


_FORGEABLE = ("marking-down", "ready", "evacuating")


@dataclass(frozen=True, slots=True)
class Command:
    time: float
    words: tuple[str, ...]
    where: str  # file:line, for errors


def _dataclass_from(cls: Any, raw: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**raw)


@dataclass(slots=True)
class Scenario:
    name: str
    sim: Sim
    commands: list[Command]
    duration: float

    def run(self, check: Callable[[], None] | None = None) -> list[str]:
        """Replay the commands; `check` (invariants) runs after every event of the simulation."""
        for cmd in self.commands:
            self.sim.at(cmd.time, 0, self._bind(cmd))
        self.sim.run(self.duration, check)
        for text in self.sim.summary():
            self.sim.log(Level.INFO, SIM, text)
        return [line.render() for line in self.sim.lines]

    def _bind(self, cmd: Command) -> Callable[[], None]:
        def fire() -> None:
            self.sim.log(Level.INFO, SIM, " ".join(cmd.words))
            _apply(self.sim, cmd)

        return fire


def _planes(word: str, where: str) -> list[Plane]:
    if word == "all":
        return list(PLANES)
    try:
        return [Plane(word)]
    except ValueError:
        raise ScenarioError(f"{where}: unknown plane {word!r} (management, storage, service, all)") from None


def _apply(sim: Sim, cmd: Command) -> None:
    w, where = cmd.words, cmd.where
    match w:
        case ("cut", host, plane):
            sim.cut(host, _planes(plane, where))
        case ("restore", host, plane):
            sim.restore(host, _planes(plane, where))
        case ("power-off", host):
            sim.power_off(host)
        case ("power-on", host):
            sim.power_on(host)
        case ("enable", host):
            sim.enable(host)
        case ("maintenance", host, state) if state in ("on", "off"):
            sim.maintenance(host, state == "on")
        case ("agent-stop", host):
            sim.agent_stop(host)
        case ("agent-kill", host):
            sim.agent_kill(host)
        case ("agent-start", host):
            sim.agent_start(host)
        case ("vm-kill", vm):
            sim.vm_kill(vm)
        case ("fabric", plane, state, *domain) if state in ("down", "up") and len(domain) <= 1:
            sim.fabric(_planes(plane, where)[0], state == "down", domain[0] if domain else None)
        case ("etcd-leader-change",):
            sim.etcd_leader_change()
        case ("manager-failover",):
            sim.manager_failover()
        case ("forge-task", vm, state, source, dest) if state in _FORGEABLE:
            sim.forge_task(vm, TaskState(state), source, dest)
        case (kind, name, count, *rest) if kind in (
            "fail-evacuate",
            "fail-migrate",
            "fail-proof",
            "fail-mark-down",
        ) and rest in ([], ["fatal"]):
            sim.fail_next(kind.removeprefix("fail-"), name, int(count), retryable=not rest)
        case _:
            raise ScenarioError(f"{where}: unknown command {' '.join(w)!r} (see vmha.sim.scenario)")


def _check_names(sim: Sim, cmd: Command) -> None:
    names = set(sim.hosts) | set(sim.vms)
    w = cmd.words
    if w[0] in ("cut", "restore", "power-off", "power-on", "enable", "maintenance", "agent-stop", "agent-kill",
                "agent-start", "vm-kill", "fail-evacuate", "fail-migrate", "fail-proof", "fail-mark-down",
                "forge-task") \
            and len(w) > 1 and w[1] not in names:
        raise ScenarioError(f"{cmd.where}: unknown host or vm {w[1]!r}")


def load(directory: Path) -> Scenario:
    setup_file = directory / "setup.toml"
    try:
        raw = tomllib.loads(setup_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{setup_file}: {e}") from None
    sim, duration = from_setup(raw, str(setup_file))
    commands = []
    cmd_file = directory / "cmdlist"
    for n, line in enumerate(cmd_file.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].split()
        if not text:
            continue
        where = f"{cmd_file}:{n}"
        try:
            t = float(text[0])
        except ValueError:
            raise ScenarioError(f"{where}: a line starts with its time in seconds, got {text[0]!r}") from None
        if len(text) < 2:
            raise ScenarioError(f"{where}: no command after the time")
        cmd = Command(t, tuple(text[1:]), where)
        _check_names(sim, cmd)
        commands.append(cmd)
    return Scenario(directory.name, sim, commands, duration)


def from_setup(raw: dict[str, Any], setup_file: str) -> tuple[Sim, float]:
    """The simulator a setup.toml (parsed) describes, and the scenario's duration."""
    hosts = raw.get("hosts")
    vms_raw = raw.get("vms")
    if not isinstance(hosts, dict) or not hosts or not isinstance(vms_raw, dict):
        raise ScenarioError(f"{setup_file}: [hosts] (name = domain) and [vms] (name = {{host = ...}}) needed")
    vms = []
    for name, v in sorted(vms_raw.items()):
        if v.get("host") not in hosts:
            raise ScenarioError(f"{setup_file}: vms.{name}.host {v.get('host')!r} is not in [hosts]")
        vms.append(VmInfo(name, v["host"], bool(v.get("ha", True)), int(v.get("priority", 0))))
    settings = _dataclass_from(RecoverySettings, raw.get("settings", {}), f"{setup_file} [settings]")
    timings = _dataclass_from(HealthTimings, raw.get("timings", {}), f"{setup_file} [timings]")
    sim_raw = dict(raw.get("sim", {}))
    if "proof_delay" in sim_raw:
        base = dict(SimTimings().proof_delay)
        base.update({ProofMethod(k): float(v) for k, v in sim_raw["proof_delay"].items()})
        sim_raw["proof_delay"] = base
    sim_t = _dataclass_from(SimTimings, sim_raw, f"{setup_file} [sim]")
    policy = PolicyTable.parse({**DEFAULT_POLICY, **raw.get("policy", {})})
    sim = Sim({h: str(d) for h, d in hosts.items()}, vms, policy, settings, timings, sim_t)
    return sim, sim_t.duration
