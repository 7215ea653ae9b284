"""LAB / TEST ONLY: the rig's stand-in for Keystone's auth_token middleware in nova-api.

Nova 34 dropped `auth_strategy = noauth2`; instead of running Keystone, the rig's api-paste.ini
replaces the `authtoken` filter with this one. It trusts the token completely: the token is
"user:project[:role,role]" and becomes the X-User-Id / X-Project-Id / X-Roles headers that
keystonemiddleware would set after validating a real token. Without roles: "admin" gets
admin,member,reader (Keystone's implied roles), anybody else member,reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]

# Identity headers a client must never be able to set itself (keystonemiddleware strips them too).
_IDENTITY = ("HTTP_X_IDENTITY_STATUS", "HTTP_X_USER_ID", "HTTP_X_PROJECT_ID", "HTTP_X_TENANT_ID", "HTTP_X_ROLES")


def parse_token(token: str) -> tuple[str, str, list[str]] | None:
    """(user, project, roles) from "user:project[:roles]", or None if malformed."""
    parts = token.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        return None
    user, project = parts[0], parts[1]
    if len(parts) == 3 and parts[2]:
        roles = [r for r in parts[2].split(",") if r]
    else:
        roles = ["admin", "member", "reader"] if user == "admin" else ["member", "reader"]
    return user, project, roles


class TokenHeaders:
    def __init__(self, app: App) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        for key in _IDENTITY:
            environ.pop(key, None)
        parsed = parse_token(environ.get("HTTP_X_AUTH_TOKEN", ""))
        if parsed is None:
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b'rig auth: send X-Auth-Token "user:project[:roles]"\n']
        user, project, roles = parsed
        environ["HTTP_X_IDENTITY_STATUS"] = "Confirmed"
        environ["HTTP_X_USER_ID"] = user
        environ["HTTP_X_PROJECT_ID"] = project
        environ["HTTP_X_ROLES"] = ",".join(roles)
        return self.app(environ, start_response)


def filter_factory(global_conf: dict[str, str], **local_conf: str) -> Callable[[App], TokenHeaders]:
    """paste.filter_factory entry point (api-paste.ini: [filter:authtoken])."""
    return TokenHeaders
