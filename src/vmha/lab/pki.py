"""The lab's certificates, made with the openssl CLI: a CA, etcd's server certificate and one
client certificate per etcd user.

    <dir>/ca.crt                 the CA every client and etcd verify against
    <dir>/<name>.crt, .key       a client certificate whose CN is <name> (etcd's user): each host,
                                 each manager, operator, root (`vmha etcd setup-auth` runs as root)
    <dir>/etcd-server.crt, .key  etcd's own, with an IP SAN per client address (of every member)
    <dir>/etcd-peer.crt, .key    the members' peer certificate (server and client), an IP SAN per peer address

The file names are a published contract (outside checks use them). A failure raises PkiError: the
lab refuses to run without TLS rather than fall back to plaintext.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmha.etcd.tls import TlsFiles

SERVER = "etcd-server"
PEER = "etcd-peer"
_DAYS = "3650"
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]  # fast to make, accepted by etcd and gRPC


class PkiError(RuntimeError):
    """A certificate could not be made; the message carries openssl's own error."""


def _openssl(*args: str) -> None:
    try:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PkiError(f"openssl {args[0]}: {e}") from None
    if r.returncode != 0:
        raise PkiError(f"openssl {' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip()[-400:]}")


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def client(self, name: str) -> TlsFiles:
        """The TLS files of etcd user ``name``."""
        return TlsFiles(self.ca, self.cert(name), self.key(name))

    def create_ca(self) -> None:
        """A new CA, unless one exists (certificates made earlier stay valid)."""
        if self.ca.exists() and self.key("ca").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        _openssl("req", "-x509", *_CURVE, "-nodes", "-keyout", str(self.key("ca")), "-out", str(self.ca),
                 "-days", _DAYS, "-subj", "/CN=vmha-lab-ca")  # fmt: skip

    def issue(self, name: str, ips: list[str] | None = None) -> TlsFiles:
        """A certificate with CN ``name`` signed by the CA (kept when present). With ``ips``: a
        server certificate for those addresses; without: a client certificate."""
        if self.cert(name).exists() and self.key(name).exists():
            return self.client(name)
        csr, ext = self.dir / f"{name}.csr", self.dir / f"{name}.ext"
        usage = "serverAuth,clientAuth" if ips else "clientAuth"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment", f"extendedKeyUsage={usage}"]
        if ips:
            lines.append("subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips))
        ext.write_text("\n".join(lines) + "\n")
        try:
            _openssl("req", *_CURVE, "-nodes", "-keyout", str(self.key(name)), "-out", str(csr), "-subj", f"/CN={name}")
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.key("ca")),
                     "-CAcreateserial", "-days", _DAYS, "-extfile", str(ext), "-out", str(self.cert(name)))  # fmt: skip
        finally:
            csr.unlink(missing_ok=True)
            ext.unlink(missing_ok=True)
        os.chmod(self.key(name), 0o600)
        return self.client(name)

    def create(self, server_ips: list[str], clients: list[str]) -> Pki:
        """CA, etcd's server certificate for ``server_ips`` and a client certificate per name."""
        self.create_ca()
        self.issue(SERVER, server_ips)
        for name in clients:
            self.issue(name)
        return self


__all__ = ["PEER", "SERVER", "Pki", "PkiError"]
