"""Runs LibvirtDriver calls in a process of its own inside the lab controller's network namespace (see
test_libvirt_driver.in_controller): gRPC's threads, started by earlier tests in the test process's own
namespace, would carry the etcd client's traffic there (seen in the full suite: HTTP/2 404s).

argv[1]: base64 pickle of (uris, etcd url, TLS files, cluster, [(method, args), ...]); stdout: base64 pickle of
[("ok", result, seconds) | ("err", exception, seconds), ...], the calls made in order until one fails.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import sys
import time
from typing import Any

from vmha.drivers.libvirt import LibvirtDriver
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles


async def main(uris: dict[str, str], url: str, tls: TlsFiles, cluster: str,
               calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:  # fmt: skip
    out: list[Any] = []
    async with EtcdClient([url], name="test", tls=tls) as client:
        driver = LibvirtDriver(client, Keys(cluster), uris, migrate_unsafe=True)
        for method, args in calls:
            t = time.monotonic()
            try:
                out.append(("ok", await getattr(driver, method)(*args), time.monotonic() - t))
            except Exception as e:  # handed to the test, which asserts on it
                out.append(("err", e, time.monotonic() - t))
                break
    return out


if __name__ == "__main__":
    results = asyncio.run(main(*pickle.loads(base64.b64decode(sys.argv[1]))))
    sys.stdout.write(base64.b64encode(pickle.dumps(results)).decode())
