"""A minimal client of Keycloak's Admin REST API. Contract (Keycloak's documented API):

- token: `POST {url}/realms/{token_realm}/protocol/openid-connect/token`, client credentials grant;
- before acting: `GET /admin/realms/{realm}/clients/{id}` -> the representation, kept as the tombstone;
- delete: `DELETE /admin/realms/{realm}/clients/{id}`;
  disable: `PUT` of the representation with `enabled: false`;
- restore: `POST /admin/realms/{realm}/clients` with the kept representation (same id), or `PUT` it back.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from reaper.errors import ApiError

API = "keycloak"


class KeycloakError(ApiError):
    """Keycloak's Admin API refused or failed (exit 1)."""


class AdminClient:
    """A minimal Keycloak Admin REST client on the standard library; the token is never logged or shown."""

    def __init__(
        self,
        url: str,
        realm: str,
        client_id: str,
        client_secret: str,
        token_realm: str | None = None,
        timeout: float = 10.0,
        ca_file: str | None = None,
    ):
        self.base = url.rstrip("/")
        self.realm = realm
        self._client_id = client_id
        self._secret = client_secret
        self.token_realm = token_realm or realm
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._token: str | None = None
        self._token_expires = 0.0

    # -- transport -------------------------------------------------------------------------------------------

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as res:  # noqa: S310
                return res.status, res.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KeycloakError(f"Keycloak at {self.base} unreachable: {reason}") from None

    def token(self) -> str:
        """A service-account access token (client credentials grant), reused until shortly before expiry."""
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        url = f"{self.base}/realms/{urllib.parse.quote(self.token_realm)}/protocol/openid-connect/token"
        form = urllib.parse.urlencode(
            {"grant_type": "client_credentials", "client_id": self._client_id, "client_secret": self._secret}
        ).encode()
        status, body = self._send("POST", url, form, {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise KeycloakError(
                f"Keycloak refused the service account '{self._client_id}' a token (HTTP {status}{_error_of(body)})"
            )
        doc = json.loads(body)
        self._token = str(doc["access_token"])
        self._token_expires = time.monotonic() + max(5.0, float(doc.get("expires_in", 60)) - 30)
        return self._token

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One Admin API call; a 401 (token expired early) gets one retry with a fresh token."""
        url = f"{self.base}/admin/realms/{urllib.parse.quote(self.realm)}{path}"
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            status, raw = self._send(method, url, body, headers)
            if status == 401 and attempt == 1:
                self._token = None
                continue
            return status, (json.loads(raw) if raw.strip() else None)
        raise AssertionError("unreachable")

    # -- clients ---------------------------------------------------------------------------------------------

    def get_client(self, key: str) -> dict[str, Any] | None:
        status, doc = self.call("GET", f"/clients/{urllib.parse.quote(key)}")
        if status == 404:
            return None
        _expect(status, 200, "GET", key)
        return dict(doc)

    def delete_client(self, key: str) -> bool:
        status, _ = self.call("DELETE", f"/clients/{urllib.parse.quote(key)}")
        if status == 404:
            return False
        _expect(status, 204, "DELETE", key)
        return True

    def update_client(self, key: str, representation: dict[str, Any]) -> None:
        status, _ = self.call("PUT", f"/clients/{urllib.parse.quote(key)}", representation)
        _expect(status, 204, "PUT", key)

    def create_client(self, representation: dict[str, Any]) -> None:
        status, _ = self.call("POST", "/clients", representation)
        if status == 409:
            raise KeycloakError(
                f"client {representation.get('clientId')!r} exists again in realm {self.realm}; not restored"
            )
        _expect(status, 201, "POST", str(representation.get("id")))


def _error_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    msg = doc.get("error_description") or doc.get("errorMessage") or doc.get("error") if isinstance(doc, dict) else ""
    return f": {msg}" if msg else ""


def _expect(status: int, want: int, method: str, key: str) -> None:
    if status != want:
        raise KeycloakError(f"Keycloak answered HTTP {status} to {method} of client {key} (expected {want})")
