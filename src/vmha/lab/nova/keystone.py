"""LAB / TEST ONLY: a real Keystone (keystone==30.0.0 from PyPI, in the rig's venv) on loopback.

    with Keystone(workdir, token_expiration=3600) as ks:     # a few seconds to start
        ks.create_user("reader", "pw", role="reader")          # on project "admin"
        tok = ks.token("reader", "pw")                         # a project-scoped token
        ks.revoke(tok); ks.stop_server(); ks.start_server()

Its own sqlite database and fernet / credential keys under `workdir`, set up by keystone-manage
(db_sync, fernet_setup, credential_setup, bootstrap: the admin user and project, the roles admin,
member and reader, the identity endpoint), served by gunicorn through vmha.lab.nova.wsgi. The
process is stopped by its process group (vmha.lab.nova.rig's _Proc), nothing outlives stop().
Standard library only: this module runs in vmha's venv, Keystone in the rig's.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from vmha.lab.nova.rig import SRC, VENV, RigError, _Proc, _wait, stop_procs
from vmha.testing.etcd import free_ports

ADMIN_PASSWORD = "rig-admin-password"
DOMAIN = "Default"
PROJECT = "admin"


class Keystone:
    def __init__(self, workdir: Path, token_expiration: int = 3600, venv: Path = VENV) -> None:
        self.dir, self.venv, self.token_expiration = workdir, venv, token_expiration
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/v3"
        self.proc: _Proc | None = None

    def __enter__(self) -> Keystone:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_server()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON"))}
        env.update(PATH=f"{self.venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin", PYTHONPATH=str(SRC),
                   OS_KEYSTONE_CONFIG_DIR=str(self.dir / "etc"))  # fmt: skip
        return env

    def _manage(self, *args: str) -> None:
        cmd = [str(self.venv / "bin" / "keystone-manage"), "--config-file", str(self.dir / "etc" / "keystone.conf"),
               *args]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=self._env(), cwd=self.dir)
        if r.returncode != 0:
            raise RigError(f"keystone-manage {args[0]} failed ({r.returncode}):\n{r.stderr[-2000:]}")

    def start(self, timeout: float = 120.0) -> Keystone:
        if not (self.venv / "bin" / "keystone-manage").exists():
            raise RigError(f"{self.venv} has no Keystone: run scripts/setup-nova.sh first")
        (self.dir / "etc").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "etc" / "keystone.conf").write_text(
            f"[DEFAULT]\nlog_file = {self.dir / 'logs' / 'keystone.log'}\n"
            f"[database]\nconnection = sqlite:///{self.dir / 'keystone.db'}\n"
            f"[token]\nprovider = fernet\nexpiration = {self.token_expiration}\n"
            f"[fernet_tokens]\nkey_repository = {self.dir / 'fernet-keys'}\n"
            f"[credential]\nkey_repository = {self.dir / 'credential-keys'}\n"
        )
        self._manage("db_sync")
        # As root here: the key directories belong to root rather than to a "keystone" user.
        self._manage("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("bootstrap", "--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-admin-url", self.url,
                     "--bootstrap-public-url", self.url, "--bootstrap-internal-url", self.url,
                     "--bootstrap-region-id", "RegionOne")  # fmt: skip
        try:
            self.start_server(timeout)
        except BaseException:
            self.stop_server()
            raise
        return self

    def start_server(self, timeout: float = 120.0) -> None:
        """Serve (again) on the same port, on the same database and keys: tokens stay valid."""
        self.proc = _Proc(
            "keystone",
            [str(self.venv / "bin" / "gunicorn"), "-b", f"127.0.0.1:{self.port}", "-w", "1", "--threads", "4",
             "--timeout", "120", "--graceful-timeout", "3", "vmha.lab.nova.wsgi:keystone_api()"],
            self.dir / "logs" / "gunicorn.log", self._env(), self.dir,
        )  # fmt: skip
        _wait("keystone", self._up, timeout, [self.proc])

    def stop_server(self) -> None:
        if self.proc is not None:
            stop_procs([self.proc])
            self.proc = None

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                token: str | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        """(status, JSON body or None, headers) of one call; `token`: as the admin if None."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if path != "/auth/tokens" or method != "POST":
            hdrs["X-Auth-Token"] = token or self.token("admin", ADMIN_PASSWORD)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return int(r.status), json.loads(raw) if raw else None, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, None, dict(e.headers)

    def _ok(self, what: str, answer: tuple[int, Any, dict[str, str]]) -> Any:
        status, body, headers = answer
        if status >= 300:
            raise RigError(f"keystone: {what}: HTTP {status}")
        return body, headers

    def token(self, user: str, password: str, project: str | None = PROJECT) -> str:
        """A password token of `user` (domain Default), scoped to `project` (None: unscoped)."""
        auth: dict[str, Any] = {"identity": {"methods": ["password"], "password": {
            "user": {"name": user, "domain": {"name": DOMAIN}, "password": password}}}}
        if project is not None:
            auth["scope"] = {"project": {"name": project, "domain": {"name": DOMAIN}}}
        _, headers = self._ok(f"token of {user}", self.request("POST", "/auth/tokens", {"auth": auth}))
        return str(headers["X-Subject-Token"])

    def revoke(self, token: str) -> None:
        self._ok("revoke", self.request("DELETE", "/auth/tokens", headers={"X-Subject-Token": token}))

    def _id(self, kind: str, name: str) -> str:
        body, _ = self._ok(f"{kind} {name}", self.request("GET", f"/{kind}s?name={name}"))
        found = body[f"{kind}s"]
        if len(found) != 1:
            raise RigError(f"keystone: {len(found)} {kind}(s) named {name}")
        return str(found[0]["id"])

    def create_project(self, name: str) -> str:
        body, _ = self._ok(f"project {name}", self.request("POST", "/projects", {"project": {
            "name": name, "domain_id": "default"}}))
        return str(body["project"]["id"])

    def create_role(self, name: str) -> str:
        body, _ = self._ok(f"role {name}", self.request("POST", "/roles", {"role": {"name": name}}))
        return str(body["role"]["id"])

    def create_user(self, name: str, password: str, role: str | None, project: str = PROJECT) -> str:
        """A user in domain Default, with `role` (if any) on `project`."""
        body, _ = self._ok(f"user {name}", self.request("POST", "/users", {"user": {
            "name": name, "password": password, "domain_id": "default"}}))
        user_id = str(body["user"]["id"])
        if role is not None:
            path = f"/projects/{self._id('project', project)}/users/{user_id}/roles/{self._id('role', role)}"
            self._ok(f"role {role} for {name}", self.request("PUT", path))
        return user_id


__all__ = ["ADMIN_PASSWORD", "DOMAIN", "PROJECT", "Keystone"]
