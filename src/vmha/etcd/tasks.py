"""The persisted recovery queue: tasks/<vm> in etcd, one JSON task per VM (core/queue.py Task).

    store = TaskStore(client, keys)
    tasks = await store.load()                   # [Task], broken values logged and skipped
    await store.write(lead, {vm: task.to_dict()})  # CAS on each task + "still the leader"

Every write is one transaction that compares, for each task written, the mod_revision this store
last saw (0 for a task it believes absent) AND that the leader key still holds this manager's
token (election.leader_txn). Two managers therefore never both advance one task: the deposed one's
write is refused. A refused write raises:
  - NotLeader (election.py): someone else leads; the daemon stops acting at once;
  - StaleTasks: a task changed under us (another writer, or a reload we missed); the daemon stops
    acting on its in-memory queue and reloads.
etcd caps a transaction at 128 operations, so a large batch is written in chunks, each guarded the
same way; the batch is not atomic as a whole, but every task's own transition is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aetcd import transactions as tx

from vmha.core.queue import Task
from vmha.etcd.client import BadValue, EtcdClient, EtcdError, encode_json
from vmha.etcd.election import Leadership, leader_txn
from vmha.etcd.keys import Keys

log = logging.getLogger("vmha.manager.tasks")

# Tasks per transaction: etcd allows 128 compares (one is the leader's) and 128 operations.
CHUNK = 100


class StaleTasks(EtcdError):
    """A task's mod_revision was not the one we expected: reload the tasks before acting again."""

    def __init__(self, vms: list[str]) -> None:
        super().__init__(f"task(s) changed by someone else: {', '.join(vms)}")
        self.vms = vms


class TaskStore:
    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._revs: dict[str, int] = {}  # vm -> mod_revision of tasks/<vm> as last read or written

    async def load(self) -> list[Task]:
        """Every readable task, sorted by VM. Remembers each key's revision, also of broken values,
        so that a new task for such a VM overwrites the broken one instead of failing its CAS."""
        kvs, _ = await self.client.get_prefix(self.keys.tasks_prefix)
        self._revs = {}
        tasks: list[Task] = []
        for kv in kvs:
            vm = kv.key[len(self.keys.tasks_prefix) :]
            self._revs[vm] = kv.mod_revision
            try:
                data = kv.json()
                if not isinstance(data, Mapping):
                    raise BadValue(kv.key, f"expected a JSON object, got {type(data).__name__}")
                task = Task.from_dict(data)
                if task.vm != vm:
                    raise BadValue(kv.key, f"task is for vm {task.vm!r}, key names {vm!r}")
            except (BadValue, KeyError, TypeError, ValueError) as e:
                log.error("task of vm %s skipped: %s (fix or delete key %s)", vm, e, kv.key)
                continue
            tasks.append(task)
        return tasks

    def revision(self, vm: str) -> int:
        """The mod_revision the next write of this VM's task will compare with (0: absent)."""
        return self._revs.get(vm, 0)

    async def write(self, lead: Leadership, tasks: Mapping[str, Mapping[str, object]]) -> None:
        """Write these tasks (vm -> Task.to_dict()) with CAS, guarded by the leadership."""
        vms = sorted(tasks)
        for i in range(0, len(vms), CHUNK):
            chunk = vms[i : i + CHUNK]
            keys = {vm: self.keys.task(vm).encode() for vm in chunk}
            revision = await leader_txn(
                self.client,
                lead,
                compare=[tx.Mod(keys[vm]) == self.revision(vm) for vm in chunk],
                success=[tx.Put(keys[vm], encode_json(dict(tasks[vm]))) for vm in chunk],
            )
            if revision is None:
                raise StaleTasks(await self._stale(chunk))
            for vm in chunk:
                self._revs[vm] = revision

    async def _stale(self, vms: list[str]) -> list[str]:
        """Which of these VMs' tasks differ from what we last saw (for the operator log)."""
        kvs, _ = await self.client.get_prefix(self.keys.tasks_prefix)
        now = {kv.key[len(self.keys.tasks_prefix) :]: kv.mod_revision for kv in kvs}
        return [vm for vm in vms if now.get(vm, 0) != self.revision(vm)] or vms


__all__ = ["CHUNK", "StaleTasks", "TaskStore"]
