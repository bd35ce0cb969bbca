"""Pick the backend for a configuration: the profile says where actions go, the URL says what the store is."""

from __future__ import annotations

from reaper.backends.base import Backend
from reaper.backends.keycloak import KeycloakBackend
from reaper.backends.sql import SqlBackend
from reaper.config import Config
from reaper.profiles import BoundProfile, bind_profile


def open_backend(config: Config, profile: BoundProfile | None = None) -> Backend:
    """The backend for this configuration (nothing is connected yet)."""
    bound = profile or bind_profile(config)
    if bound.profile.api is not None:
        return KeycloakBackend(config, bound)
    return SqlBackend(config, bound)
