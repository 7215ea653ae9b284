"""The persisted recovery queue: tasks/<vm> in etcd, one JSON task per VM (core/queue.py Task).

    store = TaskStore(client, keys)
    tasks = await store.load()                   # [Task], broken values logged and skipped
    await store.write(lead, {vm: task.to_dict()})  # CAS on each task + "still the leader"
    await store.write(lead, {vm: d}, records=[(vm, n, d)])  # and its evidence record, atomically

Every write is one transaction that compares, for each task written, the mod_revision this store
last saw (0 for a task it believes absent) AND that the leader key still holds this manager's
token (election.leader_txn). Two managers therefore never both advance one task: the deposed one's
write is refused. A refused write raises:
  - NotLeader (election.py): someone else leads; the daemon stops acting at once;
  - StaleTasks: a task changed under us (another writer, or a reload we missed); the daemon stops
    acting on its in-memory queue and reloads.
etcd caps a transaction at 128 operations, so a large batch is written in chunks, each guarded the
same way; the batch is not atomic as a whole, but every task's own transition (with its record) is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from aetcd import transactions as tx

from vmha.core.queue import Task
from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdError, encode_json
from vmha.etcd.election import Leadership, leader_txn
from vmha.etcd.keys import Keys

log = logging.getLogger("vmha.manager.tasks")

# Operations per transaction: etcd allows 128 compares (one is the leader's) and 128 operations.
MAX_OPS = 100


def parse_task(kv: KV) -> Task:
    """A stored task (or evidence record), checked by values.TaskValue first: BadValue otherwise."""
    data = kv.json()
    values.parse(values.TaskValue, kv, data)
    return Task.from_dict(data)


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
        self.unreadable: list[str] = []  # keys the last load() refused (whose task it is, nobody knows)
        self.refused: dict[str, str] = {}  # those keys -> why (for the operator: `vmha recovery list`)

    async def load(self) -> list[Task]:
        """Every readable task, sorted by VM. Remembers each key's revision, also of broken values,
        so that a new task for such a VM overwrites the broken one instead of failing its CAS."""
        kvs, _ = await self.client.get_prefix(self.keys.tasks_prefix)
        self._revs = {}
        self.unreadable = []
        self.refused = {}
        tasks: list[Task] = []
        for kv in kvs:
            vm = kv.key[len(self.keys.tasks_prefix) :]
            self._revs[vm] = kv.mod_revision
            try:
                task = parse_task(kv)
                if task.vm != vm:
                    raise BadValue(kv.key, f"task is for vm {task.vm!r}, key names {vm!r}")
            except BadValue as e:
                values.refused(e, kv, f"task of vm {vm} skipped (fix or delete the key)")
                self.unreadable.append(kv.key)
                self.refused[kv.key] = e.reason
                continue
            tasks.append(task)
        return tasks

    def revision(self, vm: str) -> int:
        """The mod_revision the next write of this VM's task will compare with (0: absent)."""
        return self._revs.get(vm, 0)

    async def write(
        self,
        lead: Leadership,
        tasks: Mapping[str, Mapping[str, object]],
        records: Sequence[tuple[str, int, Mapping[str, object]]] = (),
    ) -> None:
        """Write these tasks (vm -> Task.to_dict()) with CAS, guarded by the leadership, and the
        evidence records (vm, recovery number, Task.to_dict()) in the same transaction as their VM's
        task: a leader that dies mid-write cannot leave a finished task without its record."""
        extra: dict[str, list[tx.Put]] = {}
        for vm, n, data in records:
            extra.setdefault(vm, []).append(tx.Put(self.keys.record(vm, n).encode(), encode_json(dict(data))))
        vms = sorted(tasks)
        # Records of a VM whose task is not written here go alone, without a compare.
        groups = [(vm, extra.pop(vm, [])) for vm in vms] + [("", ops) for ops in extra.values()]
        chunk: list[tuple[str, list[tx.Put]]] = []
        size = 0
        for group in groups:
            ops = len(group[1]) + (1 if group[0] else 0)
            if chunk and size + ops > MAX_OPS:
                await self._write_chunk(lead, tasks, chunk)
                chunk, size = [], 0
            chunk.append(group)
            size += ops
        if chunk:
            await self._write_chunk(lead, tasks, chunk)

    async def _write_chunk(
        self,
        lead: Leadership,
        tasks: Mapping[str, Mapping[str, object]],
        chunk: list[tuple[str, list[tx.Put]]],
    ) -> None:
        written = [vm for vm, _ in chunk if vm]
        keys = {vm: self.keys.task(vm).encode() for vm in written}
        success = [tx.Put(keys[vm], encode_json(dict(tasks[vm]))) for vm in written]
        revision = await leader_txn(
            self.client,
            lead,
            compare=[tx.Mod(keys[vm]) == self.revision(vm) for vm in written],
            success=success + [op for _, ops in chunk for op in ops],
        )
        if revision is None:
            raise StaleTasks(await self._stale(written))
        for vm in written:
            self._revs[vm] = revision

    async def _stale(self, vms: list[str]) -> list[str]:
        """Which of these VMs' tasks differ from what we last saw (for the operator log)."""
        kvs, _ = await self.client.get_prefix(self.keys.tasks_prefix)
        now = {kv.key[len(self.keys.tasks_prefix) :]: kv.mod_revision for kv in kvs}
        return [vm for vm in vms if now.get(vm, 0) != self.revision(vm)] or vms


__all__ = ["MAX_OPS", "StaleTasks", "TaskStore", "parse_task"]
