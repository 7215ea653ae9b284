"""What runs ON a simulated host in the lock tests: one process per call, talking to that host's
sanlock daemon (the binding binds a process to one daemon, so each host's clients are processes of
their own). Run as a script: `python hostside.py COMMAND JSON-ARGS`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import sanlock

from vmha.etcd.attest import serve_attestations
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles
from vmha.locks import Attestation, LockSpace, acquire_self, attest_exit, register_self, stop_lease_holders
from vmha.locks.disk_leases import DiskLeaseSpace
from vmha.locks.lease import record_seen_holders


def space(a: dict[str, object]) -> LockSpace:
    if "vm_disk" in a:  # libvirt's automatic disk leases (test_libvirt_disk_leases)
        return DiskLeaseSpace(Path(str(a["path"])), str(a["vm_disk"]), int(str(a["io"])))
    return LockSpace(Path(str(a["path"])), str(a["lockspace"]), int(str(a["io"])))


def main() -> None:
    cmd, a = sys.argv[1], json.loads(sys.argv[2])
    if cmd == "join":
        space(a).join(int(str(a["host_id"])), str(a["host"]), timeout=30)
        print("joined", flush=True)
    elif cmd == "hold":
        # The VM process: takes its own lease, says so, then "runs" until killed.
        if a.get("ignore_term"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        hold = acquire_self(space(a), str(a["vm"]))
        print("held", flush=True)
        signal.pause()
        hold.release()
    elif cmd == "register":
        # A QEMU under libvirt: registered with the host's sanlock, its lease acquired for it by another
        # process (libvirtd's sanlock plugin), which writes no vmha holder record.
        if a.get("ignore_term"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fd = register_self()
        print("registered", flush=True)
        signal.pause()
        os.close(fd)
    elif cmd == "acquire-for":  # what libvirt's lock manager does for the QEMU pid: no record
        s = space(a)
        sanlock.acquire(s.bname, str(a["vm"]).encode(), s.disks(str(a["vm"])), pid=int(str(a["pid"])))
        print("acquired", flush=True)
    elif cmd == "sweep":  # the agent's periodic recording
        print(" ".join(f"{h.vm}:{h.pid}" for h in record_seen_holders(space(a))) or "-", flush=True)
    elif cmd == "isolate":
        stopped = asyncio.run(stop_lease_holders(space(a), grace=float(str(a["grace"]))))
        print(stopped.text(), flush=True)
    elif cmd == "attest":
        r = attest_exit(space(a), str(a["vm"]))
        print(json.dumps({"ok": r.ok, "reason": r.reason, **r.evidence}), flush=True)
    elif cmd == "agent":
        asyncio.run(agent(a))


async def agent(a: dict[str, object]) -> None:
    s = space(a)

    async def check(vm: str) -> Attestation:
        return await asyncio.to_thread(attest_exit, s, vm)

    files = a["tls"]  # the host's own etcd certificate: {"ca", "cert", "key"} paths
    assert isinstance(files, dict)
    tls = TlsFiles(*(Path(files[f]) for f in ("ca", "cert", "key")))
    async with EtcdClient([str(a["etcd"])], timeout=1.0, tls=tls) as c:
        print("serving", flush=True)
        await serve_attestations(c, Keys(str(a["cluster"])), str(a["host"]), check, poll=0.2)


if __name__ == "__main__":
    main()
