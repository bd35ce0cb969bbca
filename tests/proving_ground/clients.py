"""Clients that behave like real ones against the proving-ground server, over many simulated sessions.

- `Churner`: the original report's client. It registers a new client on every authentication (never reusing
  its client_id; `client_name "Claude Code (proving-ground)"`, `http://localhost:<random port>/callback`),
  and it loses rotated refresh tokens: session N authenticates, session N+1 refreshes once without saving the
  new refresh token, session N+2 presents the old one, gets invalid_grant (the server revokes the chain) and
  registers again.
- `WellBehaved`: registers once, reuses its client_id, saves every rotated refresh token; it re-registers only
  on invalid_client (the client-side fix).
- `flood`: many registrations from one address within seconds, never used.

All HTTP goes to the server on 127.0.0.1 with bounded timeouts. The registrant addresses are documentation
ranges (RFC 5737) sent only as an X-Forwarded-For header value, never contacted.
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from .server import ACCESS_LIFETIME, RunningServer, SimClock

TIMEOUT = 10  # seconds per request: a hang is a failure, not a wait
CHURNER_NAME = "Claude Code (proving-ground)"
GOOD_NAME = "Zed (proving-ground)"
FLOOD_NAME = "Free MCP Scanner"
CHURNER_IP, GOOD_IP, FLOOD_IP = "198.51.100.23", "192.0.2.50", "203.0.113.7"
HOUR = 3600.0


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class OAuthHTTP:
    """What a native OAuth client sends, over requests, from one (forwarded) address."""

    def __init__(self, base_url: str, ip: str, clock: SimClock):
        self.base = base_url
        self.clock = clock
        self.http = requests.Session()
        self.http.headers.update({"X-Forwarded-For": ip, "User-Agent": "proving-ground/1"})

    def close(self) -> None:
        self.http.close()

    def register(self, name: str, redirect_uri: str) -> dict[str, Any]:
        r = self.http.post(
            f"{self.base}/register",
            timeout=TIMEOUT,
            json={
                "client_name": name,
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            },
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return r.json()

    def authorize(self, client_id: str, redirect_uri: str, **extra: str) -> requests.Response:
        """The browser leg; returns the raw response (a 302 to the callback on success)."""
        return self.http.get(
            f"{self.base}/authorize",
            timeout=TIMEOUT,
            allow_redirects=False,
            params={
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": redirect_uri,
                "state": "s",
                **extra,
            },
        )

    def login(self, client_id: str, redirect_uri: str) -> dict[str, Any]:
        """Authorization code + PKCE (S256) to tokens; the user takes a few (simulated) seconds to log in."""
        verifier, challenge = pkce_pair()
        r = self.authorize(client_id, redirect_uri, code_challenge=challenge, code_challenge_method="S256")
        assert r.status_code == 302, (r.status_code, r.text)
        location = urlsplit(r.headers["Location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == redirect_uri
        code = parse_qs(location.query)["code"][0]
        self.clock.advance(3)
        t = self.token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": client_id,
                "code_verifier": verifier,
            }
        )
        assert t.status_code == 200, (t.status_code, t.text)
        return t.json()

    def token(self, form: dict[str, str]) -> requests.Response:
        return self.http.post(f"{self.base}/token", data=form, timeout=TIMEOUT)

    def refresh(self, client_id: str, refresh_token: str) -> requests.Response:
        return self.token({"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id})

    def revoke(self, client_id: str, token: str, hint: str = "refresh_token") -> requests.Response:
        return self.http.post(
            f"{self.base}/revoke",
            timeout=TIMEOUT,
            data={"token": token, "token_type_hint": hint, "client_id": client_id},
        )


@dataclass
class Churner:
    """Registers anew on every authentication and never saves a rotated refresh token."""

    http: OAuthHTTP
    rng: random.Random
    client_id: str | None = None
    refresh_token: str | None = None
    registered: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # client_id -> the refresh token it kept presenting
    errors: list[str] = field(default_factory=list)

    def session(self) -> str:
        if self.client_id and self.refresh_token:
            r = self.http.refresh(self.client_id, self.refresh_token)
            if r.status_code == 200:
                return "refreshed"  # the bug: r.json()["refresh_token"] (the rotated one) is dropped
            self.errors.append(r.json()["error"])
            self.http.clock.advance(2)  # the browser opens for a login from scratch
        self.authenticate()
        return "registered"

    def authenticate(self) -> None:
        """From scratch: DCR again (the other bug: the stored client_id is not reused), then log in."""
        redirect = f"http://localhost:{self.rng.randint(49152, 65535)}/callback"
        client_id = self.http.register(CHURNER_NAME, redirect)["client_id"]
        self.http.clock.advance(2)
        tokens = self.http.login(client_id, redirect)
        self.client_id, self.refresh_token = client_id, tokens["refresh_token"]
        self.registered.append(client_id)
        self.held[client_id] = tokens["refresh_token"]


@dataclass
class WellBehaved:
    """Reuses its client_id and saves every rotated refresh token."""

    http: OAuthHTTP
    port: int = 33418
    client_id: str | None = None
    refresh_token: str | None = None
    access_expires_at: float = 0.0
    registrations: int = 0
    refreshes: int = 0

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    def session(self) -> str:
        if self.client_id is None:
            self._register()
            self._login()
            return "registered"
        if self.http.clock.now() < self.access_expires_at:
            return "cached"
        assert self.refresh_token
        r = self.http.refresh(self.client_id, self.refresh_token)
        if r.status_code == 200:
            self._save(r.json())
            self.refreshes += 1
            return "refreshed"
        error = r.json()["error"]
        if error == "invalid_client":  # the only reason to register again
            self._register()
        self._login()
        return f"relogin after {error}"

    def _register(self) -> None:
        self.client_id = self.http.register(GOOD_NAME, self.redirect_uri)["client_id"]
        self.registrations += 1
        self.http.clock.advance(2)

    def _login(self) -> None:
        assert self.client_id
        self._save(self.http.login(self.client_id, self.redirect_uri))

    def _save(self, tokens: dict[str, Any]) -> None:
        self.refresh_token = tokens["refresh_token"]
        self.access_expires_at = self.http.clock.now() + tokens.get("expires_in", ACCESS_LIFETIME)


def flood(http: OAuthHTTP, count: int, spacing: float = 0.25, rng: random.Random | None = None) -> list[str]:
    """`count` registrations from one address, `spacing` simulated seconds apart, never used."""
    rng = rng or random.Random(7)
    ids = []
    for _ in range(count):
        ids.append(http.register(FLOOD_NAME, f"http://localhost:{rng.randint(1024, 65535)}/cb")["client_id"])
        http.clock.advance(spacing)
    return ids


@dataclass
class Scenario:
    """Everything one simulated run left behind."""

    server: RunningServer
    clock: SimClock
    churner: Churner
    good: WellBehaved
    flood_ids: list[str]
    outcomes: list[str]

    def close(self) -> None:
        for c in (self.churner.http, self.good.http):
            c.close()
        self.server.close()


def run_scenario(
    server: RunningServer,
    sessions: int = 18,
    gap: float = 2 * HOUR,
    flood_at: int = 8,
    flood_count: int = 30,
    seed: int = 1,
) -> Scenario:
    """`sessions` sessions of the churner and the well-behaved client, `gap` apart; a flood after `flood_at`."""
    assert sessions <= 100 and flood_count <= 1000  # bounded
    clock = server.clock
    rng = random.Random(seed)
    churner = Churner(OAuthHTTP(server.url, CHURNER_IP, clock), rng)
    good = WellBehaved(OAuthHTTP(server.url, GOOD_IP, clock))
    flood_ids: list[str] = []
    outcomes = []
    for i in range(sessions):
        if i:
            clock.advance(gap)
        outcomes.append(churner.session())
        clock.advance(60)
        good.session()
        if i == flood_at:
            clock.advance(30 * 60)
            flooder = OAuthHTTP(server.url, FLOOD_IP, clock)
            try:
                flood_ids = flood(flooder, flood_count)
            finally:
                flooder.close()
    return Scenario(server, clock, churner, good, flood_ids, outcomes)
