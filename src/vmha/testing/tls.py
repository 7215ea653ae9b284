"""A self-signed server certificate for the tests and the lab (the API's HTTPS), made with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """(cert, key) in `directory`, made once (kept if present): CN `name`, valid for these IP addresses
    and `name` itself, for 10 years; the key readable by its owner only."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    san = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "3650", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={san}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"openssl req failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    key.chmod(0o600)
    return cert, key
