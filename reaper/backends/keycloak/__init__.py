"""Keycloak: its database scanned read-only, its clients changed only through the Admin REST API."""

from reaper.backends.keycloak.admin import AdminClient, KeycloakError
from reaper.backends.keycloak.backend import KeycloakActor, KeycloakBackend, admin_client

__all__ = ["AdminClient", "KeycloakActor", "KeycloakBackend", "KeycloakError", "admin_client"]
