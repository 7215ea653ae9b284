"""Power fencing: an out-of-band fence that confirms a host is off.

PowerFence is the protocol the Prover calls. Production: FenceAgentPower runs Debian's
fence-agents (fence_ipmilan, fence_redfish, ...) per host. The lab supplies its own implementation
(kill every process of the host's namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from xml.etree import ElementTree

from vmha.locks.space import LockError


class PowerFenceError(LockError):
    """The host could not be confirmed off."""


class PowerFence(Protocol):
    async def power_off(self, host: str, timeout: float) -> str:
        """Powers the host off and returns evidence once it is confirmed off; PowerFenceError otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class FenceAgent:
    """One host's fence agent: the program (fence_ipmilan, fence_redfish, ...) and its options
    (ip, username, password or password_script, lanplus, ssl_insecure, ...; see `man fence_ipmilan`)."""

    agent: str
    options: Mapping[str, str]


_AGENT = re.compile(r"^fence_[a-z0-9_]+$")
_FORBIDDEN = {"action", "plug"}  # vmha sets the action itself; one host per agent entry
_SECRETS = {"password", "passwd"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MAX_OUTPUT = 2000


@functools.cache
def agent_options(agent: str) -> frozenset[str] | None:
    """The option names the fence agent declares (`fence_x -o metadata`); None if it cannot tell
    (not installed: using it fails later, with that reason)."""
    try:
        r = subprocess.run([agent, "-o", "metadata"], capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
                           check=False,
                           env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})  # fmt: skip
        root = ElementTree.fromstring(r.stdout)
    except (OSError, subprocess.TimeoutExpired, ElementTree.ParseError):
        return None
    names = frozenset(n for p in root.iter("parameter") if (n := p.get("name")))
    return names or None


def fence_agents(table: Mapping[str, Any], source: str = "config [power]") -> dict[str, FenceAgent]:
    """Validates a host -> {agent = "fence_ipmilan", <option> = "<value>", ...} table: an option the
    agent does not declare (a typo) is refused."""
    out: dict[str, FenceAgent] = {}
    for host, entry in table.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("agent"), str):
            raise PowerFenceError(f'{source}.{host}: expected a table with agent = "fence_ipmilan" (or another '
                                  "fence agent) and its options")
        agent = entry["agent"]
        if not _AGENT.match(agent):
            raise PowerFenceError(f"{source}.{host}.agent: {agent!r} is not a fence agent name (fence_...)")
        opts = {str(k): str(v) for k, v in entry.items() if k != "agent"}
        bad = sorted(_FORBIDDEN & set(opts))
        if bad:
            raise PowerFenceError(f"{source}.{host}: remove {', '.join(bad)}: vmha chooses the action")
        known = agent_options(agent)
        unknown = sorted(set(opts) - known) if known is not None else []
        if unknown:
            raise PowerFenceError(f"{source}.{host}: {agent} has no option {', '.join(unknown)} "
                                  f"(`{agent} -o metadata` lists its options)")  # fmt: skip
        out[str(host)] = FenceAgent(agent, opts)
    return out


class FenceAgentPower:
    """PowerFence through fence-agents. Options go on stdin (name=value lines), never on the command
    line, so passwords do not show in the process table."""

    def __init__(self, agents: Mapping[str, FenceAgent]) -> None:
        self.agents = dict(agents)

    async def _run(self, host: str, action: str, timeout: float, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        """The agent's exit code (one of ``ok``, else PowerFenceError) and its output."""
        spec = self.agents.get(host)
        if spec is None:
            raise PowerFenceError(f"host {host}: no fence agent configured ([power.{host}] in the config)")
        stdin = "".join(f"{k}={v}\n" for k, v in {**spec.options, "action": action}.items())
        try:
            proc = await asyncio.create_subprocess_exec(
                spec.agent, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # A process group of its own, killed whole on timeout: fence_ipmilan runs ipmitool,
                # which would otherwise live on and still act on the BMC after vmha gave up.
                start_new_session=True,
                # Debian 12's fence-agents print Python deprecation warnings on stderr; they are not
                # the agent's answer and would end up in the proof's evidence and in error messages.
                env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
            )
        except FileNotFoundError:
            raise PowerFenceError(f"host {host}: {spec.agent} not found: install Debian's fence-agents") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
        except TimeoutError:
            raise PowerFenceError(
                f"host {host}: {spec.agent} action={action} gave no answer in {timeout:.0f} s") from None
        finally:
            if proc.returncode is None:  # timed out or cancelled
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        rc, text = await proc.wait(), self._scrub(spec, out.decode(errors="replace").strip())
        if rc not in ok:
            raise PowerFenceError(f"host {host}: {spec.agent} action={action} failed ({rc}): {text}")
        return rc, text

    @staticmethod
    def _scrub(spec: FenceAgent, text: str) -> str:
        """The agent's output as it may go into logs and the proof's evidence: secrets it echoed
        replaced by ***, control characters dropped, bounded."""
        for name, value in spec.options.items():
            if name in _SECRETS and value:
                text = text.replace(value, "***")
        return _CONTROL.sub(" ", text)[:_MAX_OUTPUT]

    async def status(self, host: str, timeout: float) -> str:
        """The agent's answer to action=status (ON or OFF), changing nothing: `vmha fence test HOST`
        checks the BMC, its credentials and the agent's options before a fence needs them."""
        # fence-agents' status exits 0 for ON, 2 for OFF, 1 on failure (fencing.py, fence_action).
        rc, text = await self._run(host, "status", timeout, ok=(0, 2))
        return f"{self.agents[host].agent}: {'OFF' if rc == 2 else 'ON'} ({text})"

    async def power_off(self, host: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._run(host, "off", timeout)
        # "off" returning 0 already means the agent saw the host off; the status read is the
        # independent confirmation recorded in the proof.
        # fence-agents' status exits 0 for ON, 2 for OFF, 1 on failure (fencing.py, fence_action).
        rc, status = await self._run(host, "status", max(1.0, deadline - loop.time()), ok=(0, 2))
        if rc != 2 or "status: off" not in status.lower():
            raise PowerFenceError(f"host {host}: after action=off the fence agent reports {status!r}, not OFF")
        return f"{self.agents[host].agent}: off confirmed ({status})"
