"""The REST API's bearer tokens: a file of "TOKEN ROLE" lines, roles read-only or admin.

    tokens = load_tokens(Path("/etc/vmha/api-tokens"))   # TokenError naming the line at fault
    tokens.role("Bearer ...")                               # Role, or None for an unknown token

The file holds secrets: it is refused unless only its owner can read or write it (mode 600 or 400).
Blank lines and lines starting with '#' are skipped. A token is at least 16 printable characters.
"""

from __future__ import annotations

import hmac
import stat
from enum import StrEnum
from pathlib import Path

MIN_TOKEN = 16
MAX_FILE = 1 << 20


class Role(StrEnum):
    READ_ONLY = "read-only"
    ADMIN = "admin"


class TokenError(Exception):
    """The token file is refused; str() names the file and the fault (never a token)."""


class Tokens:
    def __init__(self, roles: dict[str, Role]) -> None:
        self._roles = roles

    def role(self, authorization: str | None) -> Role | None:
        """The role of an "Authorization: Bearer TOKEN" header, None if absent or unknown. Every
        token is compared in constant time, so the answer's timing tells nothing of a prefix."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization.removeprefix("Bearer ").strip().encode()
        found: Role | None = None
        for token, role in self._roles.items():
            if hmac.compare_digest(token.encode(), given):
                found = role
        return found

    def __len__(self) -> int:
        return len(self._roles)


def load_tokens(path: Path) -> Tokens:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise TokenError(f"{path}: group or others may access it (mode {stat.S_IMODE(st.st_mode):o}); "
                             "it holds secrets: chmod 600 it")
        if st.st_size > MAX_FILE:
            raise TokenError(f"{path}: larger than {MAX_FILE} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenError(f"{path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TokenError(f"{path}: not UTF-8 text") from None
    roles: dict[str, Role] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise TokenError(f"{path} line {n}: expected 'TOKEN ROLE', got {len(fields)} field(s)")
        token, role = fields
        if len(token) < MIN_TOKEN or not token.isprintable():
            raise TokenError(f"{path} line {n}: a token must be at least {MIN_TOKEN} printable characters")
        if role not in (Role.READ_ONLY.value, Role.ADMIN.value):
            raise TokenError(f"{path} line {n}: role {role[:40]!r} is neither read-only nor admin")
        if token in roles:
            raise TokenError(f"{path} line {n}: the token of an earlier line again")
        roles[token] = Role(role)
    if not roles:
        raise TokenError(f"{path}: no token (the API would refuse everyone)")
    return Tokens(roles)


__all__ = ["Role", "TokenError", "Tokens", "load_tokens"]
