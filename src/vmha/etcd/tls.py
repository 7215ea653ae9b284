"""TLS for etcd connections: CA-verified server, client certificate (whose CN is the etcd user).

aetcd 1.0 always opens ``grpc.aio.insecure_channel`` in ``Client.connect`` and offers no hook for
credentials: an ``https://`` URL was used in plaintext. SecureClient overrides that one method to
open ``grpc.aio.secure_channel`` instead and sets up the same stubs; every other aetcd method works
unchanged on top of it (they only use the stubs). A subclass was chosen over another client: aetcd
is the one maintained asyncio client that works with current protobuf (see the etcd notes), and
the override is the only place it touches a channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc  # type: ignore[import-untyped]
from aetcd import rpc, watcher


class TlsError(Exception):
    """A certificate or key file that cannot be read; str() names the file."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of one etcd client: the CA that signed etcd's server certificate, and this
    process's own certificate and key (the certificate's CN is its etcd user)."""

    ca: Path
    cert: Path
    key: Path

    def problems(self) -> list[str]:
        """One message per file that cannot be read, or a key that others than its owner can read (it
        is this process's etcd identity); empty: all usable."""
        errors = []
        for what, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            try:
                with path.open("rb") as f:
                    f.read(1)
                    mode = os.fstat(f.fileno()).st_mode
            except OSError as e:
                errors.append(f"{what} = {str(path)!r}: {e.strerror or e}")
                continue
            if what == "key" and mode & 0o077:
                errors.append(f"key = {str(path)!r}: readable by group or others (mode {mode & 0o777:o}): "
                              "chmod 600 it")
        return errors

    def credentials(self) -> Any:
        """gRPC channel credentials from the files (read now: a renewed certificate is used by the
        next connection)."""
        errors = self.problems()
        if errors:
            raise TlsError("etcd TLS files refused: " + "; ".join(errors))
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


class SecureClient(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client on a TLS channel (client certificate authentication, no password)."""

    def __init__(self, *, credentials: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        # No await before _connected is set: no other task can start connecting meanwhile, so
        # aetcd's "another task is connecting" wait is not needed here.
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                          options=list(self._options.items()))  # fmt: skip
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.auth_stub = rpc.AuthStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None)
        self._connected.set()


__all__ = ["SecureClient", "TlsError", "TlsFiles"]
