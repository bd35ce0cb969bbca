"""An Authlib-shaped auth database for the deployment tests: the real `authlib.integrations.sqla_oauth2`
mixins on a declarative base (tables oauth2_client / oauth2_token / oauth2_code), filled the way a DCR
endpoint does.

`seed_churn` reproduces the re-auth loop of the problem statement: one family ("Claude Code
(scalarly-memory)") that registers a new client on every login, each older member holding only revoked tokens
(an orphan), the newest holding a live token; plus one unrelated, healthy client.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import sqlalchemy as sa
from authlib.integrations.sqla_oauth2 import (
    OAuth2AuthorizationCodeMixin,
    OAuth2ClientMixin,
    OAuth2TokenMixin,
)
from sqlalchemy import Column, Integer
from sqlalchemy.orm import DeclarativeBase, Session

HOUR = 3600
LOOP_NAME = "Claude Code (scalarly-memory)"
LOOP_FAMILY_LABEL = "claude code (scalarly-memory)"  # the normalized name, as metrics label it


class Base(DeclarativeBase):
    pass


class Client(Base, OAuth2ClientMixin):
    __tablename__ = "oauth2_client"
    id = Column(Integer, primary_key=True)


class Token(Base, OAuth2TokenMixin):
    __tablename__ = "oauth2_token"
    id = Column(Integer, primary_key=True)
    user_id = Column(Integer)


class AuthorizationCode(Base, OAuth2AuthorizationCodeMixin):
    __tablename__ = "oauth2_code"
    id = Column(Integer, primary_key=True)
    user_id = Column(Integer)


_serial = itertools.count(1)


def create_schema(engine: sa.Engine) -> None:
    """The three tables, exactly as the Authlib mixins declare them."""
    Base.metadata.create_all(engine)


def register(session: Session, name: str, port: int, issued_at: float) -> Client:
    """A client as Authlib's registration endpoint stores it (client_id_issued_at > 0 marks it dynamic)."""
    n = next(_serial)
    client = Client(client_id=f"dcr-{n:05d}-{time.time_ns() % 10**9:09d}", client_id_issued_at=int(issued_at))
    client.set_client_metadata(
        {
            "client_name": name,
            "redirect_uris": [f"http://localhost:{port}/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
    )
    session.add(client)
    return client


def token(session: Session, client: Client, issued_at: float, expires_in: int, revoked: bool = False) -> Token:
    """An access + refresh token pair; `revoked` marks both revoked (refresh rotation left it behind)."""
    n = next(_serial)
    revoked_at = int(issued_at + 60) if revoked else 0
    tok = Token(
        client_id=client.client_id,
        token_type="Bearer",
        access_token=f"at-{n}",
        refresh_token=f"rt-{n}",
        scope="openid",
        issued_at=int(issued_at),
        expires_in=expires_in,
        access_token_revoked_at=revoked_at,
        refresh_token_revoked_at=revoked_at,
        user_id=42,
    )
    session.add(tok)
    return tok


def seed_churn(engine: sa.Engine, loop_members: int = 8, now: float | None = None) -> dict[str, Any]:
    """The churning family (orphans + one live member) and one healthy client. Returns the expected counts."""
    now = time.time() if now is None else now
    with Session(engine) as session:
        # One registration every two hours, oldest first; every older member's tokens are revoked.
        members = []
        for i in range(loop_members):
            issued = now - (loop_members - i) * 2 * HOUR
            client = register(session, LOOP_NAME, 50000 + i, issued)
            members.append(client)
            token(session, client, issued + 30, expires_in=HOUR, revoked=i < loop_members - 1)
        session.flush()
        # The newest member's token is still live: it is the family's survivor.
        token(session, members[-1], now - 60, expires_in=HOUR)
        healthy = register(session, "Cursor", 41000, now - 30 * HOUR)
        token(session, healthy, now - 120, expires_in=HOUR)
        session.commit()
    return {"orphans": loop_members - 1, "live": 2, "clients": loop_members + 1}


def register_more(engine: sa.Engine, count: int, now: float | None = None) -> None:
    """More registrations of the looping client, just now (each a fresh loopback port, no token yet)."""
    now = time.time() if now is None else now
    with Session(engine) as session:
        for i in range(count):
            register(session, LOOP_NAME, 52000 + next(_serial) % 10000, now - i)
        session.commit()
