"""The REST API's token file and its OpenAPI document (no etcd: the server's tests are in
tests/integration/api)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from vmha.api.auth import Role, TokenError, load_tokens
from vmha.api.server import ROUTES
from vmha.config import ConfigError, parse

ADMIN = "a" * 32
READER = "r" * 32


def tokens_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_tokens_give_their_roles_and_nothing_else(tmp_path: Path) -> None:
    tokens = load_tokens(tokens_file(tmp_path, f"# ops\n{ADMIN} admin\n\n{READER}   read-only\n"))
    assert tokens.role(f"Bearer {ADMIN}") == Role.ADMIN
    assert tokens.role(f"Bearer {READER}") == Role.READ_ONLY
    assert tokens.role(None) is None
    assert tokens.role(ADMIN) is None  # not a bearer header
    assert tokens.role(f"Bearer {ADMIN[:-1]}") is None  # a prefix is no token
    assert tokens.role("Bearer ") is None
    assert len(tokens) == 2


@pytest.mark.parametrize(
    ("text", "mode", "fault"),
    [
        (f"{ADMIN} admin\n", 0o640, "group or others may access it (mode 640)"),
        (f"{ADMIN} admin\n", 0o604, "group or others may access it (mode 604)"),
        (f"{ADMIN} root\n", 0o600, "line 1: role 'root' is neither read-only nor admin"),
        ("short admin\n", 0o600, "line 1: a token must be at least 16 printable characters"),
        (f"# x\n{ADMIN}\n", 0o600, "line 2: expected 'TOKEN ROLE', got 1 field(s)"),
        (f"{ADMIN} admin\n{ADMIN} read-only\n", 0o600, "line 2: the token of an earlier line again"),
        ("# nothing\n", 0o600, "no token"),
    ],
)
def test_a_bad_token_file_is_refused_naming_the_fault(tmp_path: Path, text: str, mode: int, fault: str) -> None:
    with pytest.raises(TokenError) as e:
        load_tokens(tokens_file(tmp_path, text, mode))
    assert fault in str(e.value)
    assert ADMIN not in str(e.value)  # the message never shows a secret


def test_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read it"):
        load_tokens(tmp_path / "absent")


def test_api_config_section() -> None:
    base = {"cluster": {"name": "c"}, "planes": {p: {"endpoints": ["http://127.0.0.1:2379"]}
                                                 for p in ("management", "service", "storage")},
            "etcd": {"insecure": True}}
    cfg = parse({**base, "api": {"listen": "[::1]:9443", "cert": "/c", "key": "/k", "tokens_file": "/t"}})
    assert cfg.api is not None and cfg.api.address() == ("::1", 9443)
    for listen in ("9443", "0.0.0.0:70000", "host name:80"):
        with pytest.raises(ConfigError, match=r"api\.listen"):
            parse({**base, "api": {"listen": listen, "cert": "/c", "key": "/k", "tokens_file": "/t"}})


def _openapi_paths() -> dict[str, dict[str, object]]:
    doc = json.loads(resources.files("vmha.api").joinpath("static", "openapi.json").read_text())
    assert doc["openapi"].startswith("3.")
    return doc["paths"]  # type: ignore[no-any-return]


def test_every_route_is_in_the_openapi_document_and_nothing_else() -> None:
    documented = {(method.upper(), path) for path, ops in _openapi_paths().items() for method in ops}
    served = {(method, path) for method, path, _ in ROUTES}
    assert served - documented == set(), "routes missing from src/vmha/api/static/openapi.json"
    assert documented - served == set(), "documented routes the server does not have"


def test_every_path_parameter_is_documented() -> None:
    for path, ops in _openapi_paths().items():
        for method, op in ops.items():
            assert isinstance(op, dict)
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), f"{method.upper()} {path}"
