"""Run by test_manager_prover.py in a subprocess bound to a test sanlock daemon (SANLOCK_RUN_DIR):
the manager's production parts (lock host join, Prover) prove and release one VM's lease. Its one
daemon is both the manager's host and the VM's: the VM "ran" on the manager's host (mgr-p), whose
host_id the prover looks up in etcd; a lease never held there gets no proof."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from vmha import config
from vmha.core.fencing import ProofMethod
from vmha.etcd.client import EtcdClient
from vmha.locks import LockSpace, ProofRefused
from vmha.locks.lease import LeaseHold
from vmha.manager.daemon import production_parts


async def main(path: str) -> None:
    cfg = config.load(path)
    space = LockSpace.from_config(cfg.require_locks())
    space.init()
    space.create_lease("vm1")
    space.create_lease("vm2")
    host = cfg.require_manager().name
    async with EtcdClient(cfg.require_manager().endpoints, tls=cfg.etcd.tls()) as client:
        parts = await production_parts(cfg, client)
        try:
            await parts.fencer.prove("vm2", host, [ProofMethod.LEASE_TAKEN], 30.0)
            raise AssertionError("a lease never held got a proof")
        except ProofRefused as e:
            print(json.dumps({"refused": str(e), "alert": e.alert}), flush=True)
        LeaseHold(space, "vm1").release()  # the VM ran on this host and stopped
        proof = await parts.fencer.prove("vm1", host, [ProofMethod.LEASE_TAKEN], 30.0)
        print(json.dumps(proof.to_dict()), flush=True)
        await parts.fencer.release("vm1")
        assert parts.release_all is not None
        await parts.release_all()


logging.basicConfig(level=logging.INFO, stream=sys.stderr)
asyncio.run(main(sys.argv[1]))
