"""LAB / TEST ONLY: the keystoneauth plugin Masakari's engine uses to reach the rig's Nova.

Masakari builds its Nova client from `[keystone_authtoken] auth_type` and its privileged user
(`os_privileged_user_name/password/tenant/auth_url`), always through a Keystone password flow. The
rig runs no Keystone: nova-api trusts a token "user:project" (vmha.lab.nova.auth). This loader,
registered as auth_type `vmha_rig` (an entry point the Masakari runner writes, vmha.lab.nova.masakari),
takes those same options and answers with a fixed token "user:project" for the endpoint given as
auth_url (the rig's Nova URL): Masakari's own code runs unchanged, only the Keystone round trip is gone.
Runs in the rig's venv, inside masakari-engine.
"""

from __future__ import annotations

from typing import Any

from keystoneauth1 import loading, token_endpoint

ENTRY_POINT = "vmha_rig = vmha.lab.nova.masakari_auth:RigToken"


class RigToken(loading.BaseLoader[token_endpoint.Token]):
    """auth_url is Nova's endpoint; username and project_name make the rig's token."""

    @property
    def plugin_class(self) -> type[token_endpoint.Token]:
        return token_endpoint.Token

    def get_options(self) -> list[loading.Opt]:
        return [
            *super().get_options(),
            loading.Opt("auth-url", help="the rig's Nova endpoint"),
            loading.Opt("username"),
            loading.Opt("password", secret=True, help="ignored: the rig trusts the token"),
            loading.Opt("project-name"),
            loading.Opt("user-domain-name", help="ignored"),
            loading.Opt("project-domain-name", help="ignored"),
            loading.Opt("system-scope", help="ignored"),
        ]

    def create_plugin(self, **kwargs: Any) -> token_endpoint.Token:
        missing = [k for k in ("auth_url", "username", "project_name") if not kwargs.get(k)]
        if missing:
            raise ValueError(f"vmha_rig auth: {', '.join(missing)} must be set (os_privileged_user_*)")
        return token_endpoint.Token(endpoint=kwargs["auth_url"], token=f"{kwargs['username']}:{kwargs['project_name']}")
