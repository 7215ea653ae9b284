"""Keystone tokens on the REST API ([api.keystone]): X-Auth-Token checked against Keystone.

    ks = KeystoneTokens.connect(cfg.api.keystone, cloud)   # vmha's service user, from clouds.yaml
    role = await ks.role(token)   # Role; KeystoneDenied (401 / 403) or KeystoneUnavailable (503)

As keystonemiddleware does: GET /v3/auth/tokens with the token in X-Subject-Token, as vmha's service
user (Keystone's policy lets the service, admin or system-reader roles validate tokens). Only
X-Auth-Token carries a Keystone token: "Authorization: Bearer" stays the file tokens', so a wrong
file token is a plain 401 whatever Keystone's state, and no guessed bearer token reaches Keystone.
The token must be scoped to [api.keystone] project (a role held elsewhere, or a domain, system or
unscoped token, gives no role here); its roles on that project map to admin (admin_roles) before
read-only (read_only_roles), none of them: 403. Keystone's answers are untrusted: a malformed one is
refused (503), never taken for a role. Valid answers are remembered until the token's expiry or
cache_ttl, whichever comes first (a revocation takes up to cache_ttl to bite), by the token's
SHA-256, at most cache_size of them (least recently used go first). Keystone unreachable: its
tokens get 503, logged once per outage; the file tokens do not depend on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vmha.api.auth import Role
from vmha.config import KeystoneApiConfig

log = logging.getLogger("vmha.api")

MAX_TOKEN = 8192  # Fernet tokens are ~200 characters, JWS ones ~800
MAX_ROLES = 1000

# What a caller is told: the details (Keystone's address among them) are for the manager's log only.
_UNAVAILABLE = "keystone: no usable answer, Keystone tokens cannot be checked now (the manager's log says why)"

# (HTTP status, JSON body or None) of GET /v3/auth/tokens for one token; blocking.
Fetch = Callable[[str], tuple[int, Any]]


class KeystoneDenied(Exception):
    """The token gives no access: status 401 (invalid, expired, revoked) or 403 (no vmha role)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class KeystoneUnavailable(Exception):
    """Keystone did not give a usable answer (down, slow, refusing vmha, malformed): 503."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    user: str
    project: tuple[str, str] | None  # (name, domain name), None if not project-scoped
    roles: frozenset[str]
    expires: float  # Unix time


def _str(obj: Any, field: str, where: str) -> str:
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValueError(f"{where}.{field}: expected a non-empty string of at most 255 characters")
    return value


def parse_token(body: Any) -> TokenInfo:
    """What a 200 answer of GET /v3/auth/tokens says; ValueError naming the first fault."""
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, dict):
        raise ValueError("no 'token' object")
    try:
        expires = datetime.fromisoformat(_str(token, "expires_at", "token"))
    except ValueError as e:
        raise ValueError(f"token.expires_at: {e}") from None
    if expires.tzinfo is None:
        raise ValueError("token.expires_at: no time zone")
    roles = token.get("roles", [])
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise ValueError(f"token.roles: expected a list of at most {MAX_ROLES}")
    project = None
    if "project" in token:
        p = token["project"]
        project = (_str(p, "name", "token.project"), _str(p.get("domain"), "name", "token.project.domain"))
    return TokenInfo(
        user=_str(token.get("user"), "name", "token.user"),
        project=project,
        roles=frozenset(_str(r, "name", f"token.roles[{i}]") for i, r in enumerate(roles)),
        expires=expires.timestamp(),
    )


def decide(info: TokenInfo, cfg: KeystoneApiConfig) -> Role:
    """The vmha role of a valid token, or KeystoneDenied(403) saying why none."""
    if info.project != (cfg.project, cfg.project_domain):
        scope = "not scoped to a project" if info.project is None else f"scoped to project {info.project[0]}"
        raise KeystoneDenied(403, f"keystone token of {info.user}: {scope}; vmha accepts project {cfg.project} "
                                  f"(domain {cfg.project_domain})")  # fmt: skip
    if info.roles & set(cfg.admin_roles):
        return Role.ADMIN
    if info.roles & set(cfg.read_only_roles):
        return Role.READ_ONLY
    raise KeystoneDenied(403, f"keystone token of {info.user}: none of the roles "
                              f"{', '.join(cfg.admin_roles + cfg.read_only_roles)} on project {cfg.project}")


class KeystoneTokens:
    def __init__(self, cfg: KeystoneApiConfig, fetch: Fetch, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self._fetch, self._clock = cfg, fetch, clock
        self._cache: OrderedDict[bytes, tuple[TokenInfo, float]] = OrderedDict()
        self._outage: str | None = None  # what went wrong, while Keystone gives no usable answer

    @classmethod
    def connect(cls, cfg: KeystoneApiConfig, cloud: str) -> KeystoneTokens:
        """Validation as the service user of clouds.yaml entry `cloud`; DriverError if it cannot be
        loaded. Nothing is asked of Keystone before the first token."""
        import keystoneauth1.exceptions as ks_exc

        from vmha.drivers.nova import connect

        session = connect(cloud, api_timeout=cfg.timeout).session
        where = {"service_type": "identity", "interface": cfg.interface, "version": (3, 0)}

        def fetch(token: str) -> tuple[int, Any]:
            try:
                r = session.get("/auth/tokens?nocatalog", endpoint_filter=where, raise_exc=False,
                                headers={"X-Subject-Token": token}, timeout=cfg.timeout)  # fmt: skip
            except ks_exc.ClientException as e:  # connection refused, timeout, discovery, our own login...
                raise KeystoneUnavailable(f"{type(e).__name__}: {str(e)[:300]}") from None
            try:
                return r.status_code, r.json() if r.status_code == 200 else None
            except ValueError:
                return r.status_code, None

        return cls(cfg, fetch)

    async def role(self, token: str) -> Role:
        if not token or len(token) > MAX_TOKEN or not token.isascii() or not token.isprintable():
            raise KeystoneDenied(401, "X-Auth-Token: not a Keystone token")
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            self._cache.move_to_end(key)
            return decide(cached[0], self.cfg)
        self._cache.pop(key, None)
        info = await self._validate(token)
        now = self._clock()  # after Keystone's answer, which may have taken seconds
        if info.expires <= now:
            raise KeystoneDenied(401, "keystone token expired")
        # Remembered before the decision: a valid token without a vmha role is not asked about again.
        self._cache[key] = (info, min(info.expires, now + self.cfg.cache_ttl))
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return self._decided(info)

    def _decided(self, info: TokenInfo) -> Role:
        try:
            role = decide(info, self.cfg)
        except KeystoneDenied as e:
            log.info("api: %s: refused", e)
            raise
        log.info("api: keystone token of %s on project %s: %s (roles %s)", info.user, self.cfg.project, role.value,
                 ",".join(sorted(info.roles)))  # fmt: skip
        return role

    async def _validate(self, token: str) -> TokenInfo:
        try:
            status, body = await asyncio.wait_for(asyncio.to_thread(self._fetch, token), self.cfg.timeout + 1)
            if status == 404:  # Keystone's answer for an invalid, expired or revoked subject token
                self._answered()
                raise KeystoneDenied(401, "keystone token invalid, expired or revoked")
            if status != 200:
                hint = {401: ": vmha's service credentials refused", 403: ": vmha's service user may not validate "
                        "tokens (give it the service role)"}.get(status, "")  # fmt: skip
                raise KeystoneUnavailable(f"HTTP {status} validating a token{hint}")
            try:
                info = parse_token(body)
            except ValueError as e:
                raise KeystoneUnavailable(f"malformed answer: {e}") from None
        except TimeoutError:
            self._failed(f"no answer within {self.cfg.timeout + 1:.0f} s")
            raise KeystoneUnavailable(_UNAVAILABLE) from None
        except KeystoneUnavailable as e:
            self._failed(str(e))
            raise KeystoneUnavailable(_UNAVAILABLE) from None
        self._answered()
        return info

    def _failed(self, why: str) -> None:
        if self._outage is None:
            log.error("api: keystone: %s; Keystone tokens get 503 until it answers (file tokens still work)", why)
        self._outage = why

    def _answered(self) -> None:
        if self._outage is not None:
            log.warning("api: keystone answers again (was: %s)", self._outage)
        self._outage = None


__all__ = ["KeystoneDenied", "KeystoneTokens", "KeystoneUnavailable", "TokenInfo", "decide", "parse_token"]
