"""Pick the backend for a configuration: the profile says what kind of store it reads and where actions go,
the URL says which store."""

from __future__ import annotations

import urllib.parse

from reaper.backends.base import Backend
from reaper.backends.keycloak import KeycloakBackend
from reaper.backends.sql import SqlBackend
from reaper.config import Config
from reaper.errors import ConfigError
from reaper.profiles import BoundProfile, bind_profile

KV_SCHEMES = ("redis", "rediss", "unix", "file")


def open_backend(config: Config, profile: BoundProfile | None = None) -> Backend:
    """The backend for this configuration (nothing is connected yet)."""
    bound = profile or bind_profile(config)
    if bound.profile.store.kind == "kv":
        # Imported here: the key-value libraries load only for the profiles that read such a store.
        from reaper.backends.kv import KvBackend

        return KvBackend(config, bound)
    scheme = urllib.parse.urlsplit(config.database_url or "").scheme.split("+")[0]
    if scheme in KV_SCHEMES:
        raise ConfigError(
            f"profile '{bound.name}' reads a SQL database, and {scheme}:// is a key-value store "
            "(FastMCP's OAuthProxy store: --profile fastmcp-oauth-proxy)"
        )
    if bound.profile.api is not None:
        return KeycloakBackend(config, bound)
    return SqlBackend(config, bound)
