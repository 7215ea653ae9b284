"""`vmha bench ...`: each benchmark lives in its own module, imported on use."""

from __future__ import annotations

from vmha.cli import LazyGroup

BENCHMARKS: dict[str, str] = {
    "detection": "vmha.bench.detection:detection",  # issue 2: cut a plane, time to DOWN
    "locks": "vmha.bench.locks:locks",  # issue 3: time to proof per method, lease throughput
    "core": "vmha.bench.core:core",  # issue 4: decision time and queue dispatch at scale
    "rto": "vmha.bench.rto:rto",  # issue 5: fault to VM running elsewhere, per fault class
    "nova": "vmha.bench.nova:nova",  # issue 6: compute killed to server ACTIVE elsewhere through Nova
}

bench = LazyGroup(name="bench", commands_map=BENCHMARKS, help="Benchmarks that print numbers.")
