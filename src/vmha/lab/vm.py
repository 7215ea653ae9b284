"""The lab VM: `vmha-vm <vm-name> --host H --disk PATH --config CFG [--incoming]`.

A real process standing for a VM (so `ps` finds it by name). It takes the VM's sanlock lease for
itself before writing anything, then appends one JSON line per write to its disk, a file on the
shared storage: {"vm", "host", "seq", "t", "mono"} (t: unix time; mono: the machine's monotonic
clock, which verify measures silences by), each followed by fsync (the write reaches
the storage server before the next one starts: no cached write can land after the process is gone,
which is what lets the manager accept an exit attestation). A new copy continues seq from the last
record on the disk.

- SIGTERM (the manager's stop, sanlock losing the lockspace, the agent's isolation response): stop
  writing, release the lease, exit 0.
- SIGUSR1 (live migration, source side): the same, exit 0; the destination copy was started with
  --incoming and waits until it can take the lease, then continues the disk.
- A failed write (storage lost) is retried at the next tick: a real guest's disk I/O hangs or errors
  and it keeps running; sanlock stops the holder once the lockspace fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import click

from vmha import config
from vmha.config import ConfigError
from vmha.lab.procs import EXIT_LEASE_REFUSED
from vmha.locks.lease import LeaseHold, acquire_self
from vmha.locks.space import LeaseBusy, LockError, LockSpace

INTERVAL = 0.1  # seconds between writes: verify's gap threshold (1 s) counts on it
READ_TAIL = 4096  # bytes read from the disk's end to find the last record
SECTOR = 512
RUN_DIR = Path("/run/vmha")  # the host's tmpfs (its anchor's mount namespace)


def incoming_marker(vm: str) -> Path:
    """Exists (in the host's /run/vmha) while an incoming copy waits for the VM's lease."""
    return RUN_DIR / f"vm-{vm}.incoming"


def data_end(f: BinaryIO) -> int:
    """Offset just past the last record. The stand-in's disk is a file that ends there; a QEMU guest's
    is a raw disk of fixed size, records from byte 0 and zeros after them (found by bisection)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    f.seek(size - 1)
    if f.read(1) != b"\0":
        return size
    lo, hi = 0, size // SECTOR  # the first all-zero sector is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        f.seek(mid * SECTOR)
        if f.read(SECTOR).strip(b"\0"):
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return 0
    f.seek((lo - 1) * SECTOR)
    return (lo - 1) * SECTOR + len(f.read(SECTOR).rstrip(b"\0"))


def disk_lines(disk: Path) -> list[str]:
    """Every line on the disk, torn ones included (verify judges them)."""
    with disk.open("rb") as f:
        end = data_end(f)
        f.seek(0)
        return f.read(end).decode(errors="replace").splitlines()


def last_record(disk: Path) -> dict[str, Any] | None:
    """The last complete record on the disk (None for an empty or new disk)."""
    try:
        with disk.open("rb") as f:
            end = data_end(f)
            f.seek(max(0, end - READ_TAIL))
            tail = f.read(end - max(0, end - READ_TAIL))
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line of a copy killed mid-write
        if isinstance(rec, dict) and isinstance(rec.get("seq"), int):
            return rec
    return None


def last_seq(disk: Path) -> int:
    rec = last_record(disk)
    return 0 if rec is None else int(rec["seq"])


class LabVm:
    def __init__(self, name: str, host: str, disk: Path, space: LockSpace, interval: float = INTERVAL) -> None:
        self.name = name
        self.host = host
        self.disk = disk
        self.space = space
        self.hold: LeaseHold | None = None
        self.retrying = False
        self.interval = interval
        self.stop = threading.Event()
        self.reason = ""

    def on_signal(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        self.stop.set()

    def log(self, text: str) -> None:
        print(f"vm {self.name} host {self.host}: {text}", file=sys.stderr, flush=True)

    def acquire(self, wait: float) -> None:
        """Takes the lease; with wait > 0 keeps trying while another holder has it (incoming migration).

        While it waits, the incoming marker exists: the migration tells the source to hand over only
        then, so the pause is the lease handover alone, not this process's start-up.
        """
        deadline = time.monotonic() + wait
        marker = incoming_marker(self.name)
        if wait > 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
        try:
            while True:
                try:
                    self.hold = acquire_self(self.space, self.name)
                    return
                except LockError as e:
                    # Waiting for a handover, any refusal may be transient (sanlock answers EAGAIN
                    # while the lease is being released): retry until the deadline.
                    if time.monotonic() >= deadline or self.stop.is_set():
                        raise
                    if not isinstance(e, LeaseBusy) and not self.retrying:
                        self.log(f"lease not taken yet ({e}); retrying")
                        self.retrying = True
                self.stop.wait(0.02)
        finally:
            marker.unlink(missing_ok=True)

    def release(self) -> None:
        if self.hold is None:
            return
        try:
            self.hold.release()
        except LockError as e:
            # A lost lockspace has already dropped the lease; nothing to give back.
            self.log(f"release: {e}")

    def run(self) -> int:
        seq = last_seq(self.disk)
        self.log(f"lease acquired; continuing the disk after seq {seq}")
        fd = os.open(self.disk, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        failing = False
        try:
            while not self.stop.is_set():
                rec = {"vm": self.name, "host": self.host, "seq": seq + 1, "t": round(time.time(), 4),
                       "mono": round(time.monotonic(), 4)}
                try:
                    os.write(fd, (json.dumps(rec) + "\n").encode())
                    os.fsync(fd)
                except OSError as e:
                    if not failing:
                        self.log(f"disk write failed ({e.strerror}); retrying")
                    failing = True
                else:
                    if failing:
                        self.log("disk writes work again")
                    failing = False
                    seq += 1
                self.stop.wait(self.interval)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.log(f"{self.reason or 'stop'}: stopped writing at seq {seq}; releasing the lease")
        self.release()
        return 0


@click.command()
@click.argument("name")
@click.option("--host", required=True, help="the lab host this copy runs on (written in every record)")
@click.option("--disk", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="the host's vmha config ([locks]: lease directory, io_timeout)")
@click.option("--incoming", type=float, default=0.0,
              help="live migration destination: wait up to this many seconds for the lease")
@click.option("--interval", type=float, default=INTERVAL, show_default=True)
def cli(name: str, host: str, disk: Path, config_path: str, incoming: float, interval: float) -> None:
    """A lab VM: holds the VM's sanlock lease and appends records to its disk."""
    cfg = config.load(config_path)
    vm = LabVm(name, host, disk, LockSpace.from_config(cfg.require_locks()), interval)
    signal.signal(signal.SIGTERM, vm.on_signal)
    signal.signal(signal.SIGUSR1, vm.on_signal)
    signal.signal(signal.SIGINT, vm.on_signal)
    try:
        vm.acquire(incoming)
    except LockError as e:
        # Never write without the lease: a copy that cannot take it exits, and says why.
        vm.log(f"not started: {e}")
        sys.exit(EXIT_LEASE_REFUSED)
    if vm.stop.is_set():
        vm.release()
        sys.exit(0)
    sys.exit(vm.run())


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
