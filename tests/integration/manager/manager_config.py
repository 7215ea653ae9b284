"""The config the manager tests write: one etcd for every plane, plus the sections a test adds."""

from __future__ import annotations


def config_text(url: str, extra: str, cluster: str = "vt5") -> str:
    planes = "".join(f'[planes.{p}]\nendpoints = ["{url}"]\n' for p in ("management", "storage", "service"))
    return f'[cluster]\nname = "{cluster}"\n{planes}[etcd]\ninsecure = true\n{extra}'
