"""The config the manager tests write: one etcd URL for every plane (etcd's own unless ``url`` says
another, e.g. a proxy's), the TLS files of etcd user ``user``, plus the sections a test adds."""

from __future__ import annotations

from vmha.core.planes import PLANES
from vmha.testing import hosts
from vmha.testing.etcd import EtcdProcess


def config_text(etcd: EtcdProcess, user: str, extra: str, cluster: str = "vt5", url: str | None = None) -> str:
    endpoints = {p: [url or etcd.client_urls[0]] for p in PLANES}
    return hosts.config_text(cluster, None, "-", endpoints, extra=extra, etcd=etcd.toml(user))
