"""The proving-ground server behaves like a real one: PKCE S256 required, rotation, replay revokes the chain,
revocation, clean errors for unknown clients; and it stores rows exactly as Authlib's mixins define them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from .clients import CHURNER_IP, OAuthHTTP, pkce_pair
from .server import Client, RunningServer, SimClock, Token, create_schema

REDIRECT = "http://localhost:51234/callback"


@pytest.fixture
def http(db) -> Iterator[OAuthHTTP]:
    create_schema(db.engine)
    clock = SimClock(time.time() - 86400)
    with RunningServer(db.engine, clock) as server:
        client = OAuthHTTP(server.url, CHURNER_IP, clock)
        try:
            yield client
        finally:
            client.close()


def _tokens(db, client_id: str) -> list[Token]:
    with Session(db.engine) as s:
        return list(s.execute(sa.select(Token).where(Token.client_id == client_id).order_by(Token.id)).scalars())


def test_registration_is_rfc7591_and_stored_by_the_mixins(db, http: OAuthHTTP):
    body = http.register("Some CLI", REDIRECT)
    assert body["client_name"] == "Some CLI" and body["redirect_uris"] == [REDIRECT]
    assert body["client_id_issued_at"] == int(http.clock.now()), "registration time is the simulated clock's"
    with Session(db.engine) as s:
        row = s.execute(sa.select(Client).where(Client.client_id == body["client_id"])).scalar_one()
    assert row.client_metadata["client_name"] == "Some CLI"
    assert row.client_metadata["registrant_ip"] == CHURNER_IP
    assert row.token_endpoint_auth_method == "none"


def test_pkce_s256_is_required(http: OAuthHTTP):
    cid = http.register("Some CLI", REDIRECT)["client_id"]
    no_pkce = http.authorize(cid, REDIRECT)
    plain = http.authorize(cid, REDIRECT, code_challenge="a" * 43, code_challenge_method="plain")
    for r in (no_pkce, plain):
        assert r.status_code == 302 and "error=invalid_request" in r.headers["Location"]
        assert "code=" not in r.headers["Location"]
    verifier, challenge = pkce_pair()
    r = http.authorize(cid, REDIRECT, code_challenge=challenge, code_challenge_method="S256")
    code = r.headers["Location"].split("code=")[1].split("&")[0]
    bad = http.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": cid,
            "code_verifier": pkce_pair()[0],
        }
    )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"


def test_rotation_then_replay_revokes_the_chain(db, http: OAuthHTTP):
    cid = http.register("Some CLI", REDIRECT)["client_id"]
    first = http.login(cid, REDIRECT)
    http.clock.advance(7200)
    r = http.refresh(cid, first["refresh_token"])
    assert r.status_code == 200
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    old, new = _tokens(db, cid)
    assert old.refresh_token_revoked_at == int(http.clock.now()) and new.refresh_token_revoked_at == 0
    assert old.grant_chain == new.grant_chain

    http.clock.advance(7200)
    replay = http.refresh(cid, first["refresh_token"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    old, new = _tokens(db, cid)
    assert new.refresh_token_revoked_at == int(http.clock.now()), "the whole chain is revoked"
    assert http.refresh(cid, second["refresh_token"]).json()["error"] == "invalid_grant"


def test_revocation_endpoint(db, http: OAuthHTTP):
    cid = http.register("Some CLI", REDIRECT)["client_id"]
    tokens = http.login(cid, REDIRECT)
    assert http.revoke(cid, tokens["refresh_token"]).status_code == 200
    [row] = _tokens(db, cid)
    assert row.refresh_token_revoked_at > 0 and row.access_token_revoked_at > 0
    assert http.refresh(cid, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_unknown_client_is_a_clean_401(http: OAuthHTTP):
    r = http.refresh("no-such-client", "whatever")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = http.token(
        {
            "grant_type": "authorization_code",
            "code": "x",
            "client_id": "no-such-client",
            "redirect_uri": REDIRECT,
            "code_verifier": "v" * 43,
        }
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
