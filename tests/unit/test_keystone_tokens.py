"""Keystone tokens' pure logic: the strict reading of Keystone's answer, the role mapping and project
scope, the cache (expiry, TTL, size) and outages, with Keystone's answers given as data. The same
paths against a real Keystone: tests/integration/api/test_api_keystone.py."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from vmha import config
from vmha.api.auth import Role
from vmha.api.keystone import KeystoneDenied, KeystoneTokens, KeystoneUnavailable, TokenInfo, decide, parse_token
from vmha.config import KeystoneApiConfig

CFG = KeystoneApiConfig(project="admin", cache_ttl=60, cache_size=2)
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z

ANSWER: dict[str, Any] = {"token": {
    "methods": ["password"], "expires_at": "2027-01-15T09:00:00.000000Z", "issued_at": "2027-01-15T08:00:00Z",
    "user": {"id": "u1", "name": "alice", "domain": {"id": "default", "name": "Default"}},
    "project": {"id": "p1", "name": "admin", "domain": {"id": "default", "name": "Default"}},
    "roles": [{"id": "r1", "name": "reader"}, {"id": "r2", "name": "member"}]}}  # fmt: skip


def answer(**token: Any) -> dict[str, Any]:
    a = copy.deepcopy(ANSWER)
    a["token"].update(token)
    return a


def test_a_well_formed_answer() -> None:
    info = parse_token(ANSWER)
    assert info == TokenInfo("alice", ("admin", "Default"), frozenset({"reader", "member"}), T0 + 3600)
    unscoped = answer()
    del unscoped["token"]["project"]
    assert parse_token(unscoped).project is None


@pytest.mark.parametrize(("body", "fault"), [
    (None, "no 'token'"),
    ({"token": []}, "no 'token'"),
    (answer(expires_at="tomorrow"), "token.expires_at"),
    (answer(expires_at="2027-01-15T09:00:00"), "no time zone"),
    (answer(expires_at=1800003600), "token.expires_at"),
    (answer(roles={"name": "admin"}), "token.roles"),
    (answer(roles=[{"name": "admin"}] * 1001), "token.roles"),
    (answer(roles=[{"name": ""}]), "token.roles[0].name"),
    (answer(roles=["admin"]), "token.roles[0].name"),
    (answer(user={"id": "u1"}), "token.user.name"),
    (answer(project={"name": "admin"}), "token.project.domain.name"),
    (answer(project={"name": 7, "domain": {"name": "Default"}}), "token.project.name"),
])  # fmt: skip
def test_malformed_answers_are_refused_naming_the_field(body: Any, fault: str) -> None:
    with pytest.raises(ValueError, match=fault.replace("[", r"\[").replace("]", r"\]")):
        parse_token(body)


def info(roles: set[str], project: tuple[str, str] | None = ("admin", "Default")) -> TokenInfo:
    return TokenInfo("alice", project, frozenset(roles), T0 + 3600)


def test_roles_map_admin_first_on_the_configured_project_only() -> None:
    assert decide(info({"admin", "member", "reader"}), CFG) == Role.ADMIN
    assert decide(info({"reader"}), CFG) == Role.READ_ONLY
    for denied in (info({"member"}), info({"admin"}, ("other", "Default")), info({"admin"}, ("admin", "Other")),
                   info({"admin"}, None)):  # fmt: skip
        with pytest.raises(KeystoneDenied) as e:
            decide(denied, CFG)
        assert e.value.status == 403
    cfg = KeystoneApiConfig(project="ops", project_domain="Ops", admin_roles=["vmha-admin"], read_only_roles=["a", "b"])
    assert decide(info({"b"}, ("ops", "Ops")), cfg) == Role.READ_ONLY
    assert decide(info({"vmha-admin", "a"}, ("ops", "Ops")), cfg) == Role.ADMIN


class Keystone:
    """Keystone's answers as data: status and body per token, or an exception; counts the calls."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, Any] | Exception] = {}
        self.calls = 0

    def __call__(self, token: str) -> tuple[int, Any]:
        self.calls += 1
        a = self.answers.get(token, (404, None))
        if isinstance(a, Exception):
            raise a
        return a


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def tokens() -> tuple[KeystoneTokens, Keystone, Clock]:
    ks, clock = Keystone(), Clock()
    return KeystoneTokens(CFG, ks, clock), ks, clock


async def test_valid_answers_are_cached_until_the_ttl_or_the_expiry() -> None:
    t, ks, clock = tokens()
    ks.answers["tok"] = (200, answer(expires_at="2027-01-15T08:01:30Z"))  # expires at T0 + 90
    assert await t.role("tok") == Role.READ_ONLY
    clock.now = T0 + 59
    assert await t.role("tok") == Role.READ_ONLY and ks.calls == 1
    clock.now = T0 + 61  # past cache_ttl: asked again
    assert await t.role("tok") == Role.READ_ONLY and ks.calls == 2
    clock.now = T0 + 90  # expired, though cached at T0 + 61 for 60 s
    with pytest.raises(KeystoneDenied) as e:
        await t.role("tok")
    assert e.value.status == 401 and ks.calls == 3


async def test_an_expired_answer_is_refused_and_not_cached() -> None:
    t, ks, _ = tokens()
    ks.answers["tok"] = (200, answer(expires_at="2027-01-15T07:59:59Z"))
    for _ in range(2):
        with pytest.raises(KeystoneDenied, match="expired"):
            await t.role("tok")
    assert ks.calls == 2


async def test_the_cache_is_bounded() -> None:
    t, ks, _ = tokens()
    for tok in ("a", "b", "c"):
        ks.answers[tok] = (200, ANSWER)
        await t.role(tok)
    await t.role("c")
    await t.role("b")
    assert ks.calls == 3
    await t.role("a")  # the least recently used went out
    assert ks.calls == 4


async def test_no_role_is_403_and_cached_an_invalid_token_401_and_not_cached() -> None:
    t, ks, _ = tokens()
    ks.answers["norole"] = (200, answer(roles=[{"name": "member"}]))
    for _ in range(2):
        with pytest.raises(KeystoneDenied) as e:
            await t.role("norole")
        assert e.value.status == 403
    assert ks.calls == 1
    for _ in range(2):
        with pytest.raises(KeystoneDenied) as e:
            await t.role("unknown")
        assert e.value.status == 401
    assert ks.calls == 3


@pytest.mark.parametrize("bad", ["", "x" * 8193, "caf\u00e9", "a\tb", "a\nb"])
async def test_tokens_no_keystone_issues_are_refused_unasked(bad: str) -> None:
    t, ks, _ = tokens()
    with pytest.raises(KeystoneDenied) as e:
        await t.role(bad)
    assert e.value.status == 401 and ks.calls == 0


async def test_outages_are_503_logged_once_and_never_a_role(caplog: pytest.LogCaptureFixture) -> None:
    t, ks, _ = tokens()
    caplog.set_level(logging.INFO, logger="vmha.api")
    for answer_ in (KeystoneUnavailable("ConnectFailure: refused"), (500, None), (401, None), (403, None),
                    (200, {"token": {"roles": "admin"}}), (200, None)):  # fmt: skip
        ks.answers["tok"] = answer_
        with pytest.raises(KeystoneUnavailable) as e:
            await t.role("tok")
        assert "refused" not in str(e.value)  # the caller is not told Keystone's address or state
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ConnectFailure" in errors[0] and "file tokens still work" in errors[0]
    ks.answers["tok"] = (200, ANSWER)
    assert await t.role("tok") == Role.READ_ONLY
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_config_is_checked_strictly() -> None:
    base = {"cluster": {"name": "c"}, "planes": {p: {"endpoints": ["http://127.0.0.1:2379"]} for p in
            ("management", "storage", "service")}, "etcd": {"insecure": True}}  # fmt: skip
    api = {"cert": "/c", "key": "/k", "tokens_file": "/t"}

    def parse(keystone: dict[str, Any]) -> config.Config:
        return config.parse({**base, "api": {**api, "keystone": keystone}})

    cfg = parse({"project": "admin"})
    assert cfg.api is not None and cfg.api.keystone is not None
    assert cfg.api.keystone.admin_roles == ["admin"] and cfg.api.keystone.read_only_roles == ["reader"]
    for bad, says in (({}, "api.keystone.project: required field is missing"),
                      ({"project": "p", "admin_roles": ["reader"]}, "reader in both admin_roles and read_only_roles"),
                      ({"project": "p", "admin_roles": []}, "api.keystone.admin_roles"),
                      ({"project": "p", "read_only_roles": ["a,b"]}, "api.keystone.read_only_roles.0"),
                      ({"project": "p", "cache_ttl": -1}, "api.keystone.cache_ttl"),
                      ({"project": "p", "interface": "private"}, "api.keystone.interface"),
                      ({"project": "p", "password": "x"}, "api.keystone.password: unknown field")):  # fmt: skip
        with pytest.raises(config.ConfigError, match=says):
            parse(bad)
