"""Authlib: the ONE definition of an Authlib application's models, on the real `authlib.integrations.sqla_oauth2`
mixins, and the ways tests fill them.

The models are what Authlib's documentation shows: the three mixins, an integer `id` primary key each, and
the application's `user_id` on tokens and codes. `make_models` builds them on a fresh declarative base, under
other table names when a test needs them (Flask-style `client` / `token` / `code`); `Base`, `Client`, `Token`
and `AuthorizationCode` are the usual ones (oauth2_client / oauth2_token / oauth2_code).

Writers:
- through the models, as Authlib's endpoints store rows: `register`, `token`, `seed_churn`, `register_more`;
- in bulk, through SQLAlchemy Core, the same rows faster: `AuthlibDB` (families of orphans and a live
  survivor, dead credential histories) and `fill_churning` (many families, one dead token and code per
  orphan), both built on `client_row`, `token_row` and `code_row`.
`usable` asks Authlib's own TokenMixin whether a token is neither revoked nor expired.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
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
DAY = 86400
TABLES = ("oauth2_client", "oauth2_token", "oauth2_code")
CHILD_TABLES = ("oauth2_token", "oauth2_code")
PK = {"oauth2_client": "id", "oauth2_token": "id", "oauth2_code": "id"}
LOOP_NAME = "Claude Code (scalarly-memory)"
LOOP_FAMILY_LABEL = "claude code (scalarly-memory)"  # the normalized name, as metrics label it


# --- the models -------------------------------------------------------------------------------------------


@dataclass
class Models:
    """One application's models (and their declarative base)."""

    base: type[DeclarativeBase]
    Client: Any
    Token: Any
    Code: Any

    @property
    def metadata(self) -> sa.MetaData:
        return self.base.metadata

    def create_all(self, engine: sa.Engine) -> None:
        self.metadata.create_all(engine)


def make_models(client: str = "oauth2_client", token: str = "oauth2_token", code: str = "oauth2_code") -> Models:
    """An app's models: Authlib's mixins, an id primary key on each, an app-added user_id on tokens and codes."""

    class Base(DeclarativeBase):
        pass

    class Client(Base, OAuth2ClientMixin):
        __tablename__ = client
        id = Column(Integer, primary_key=True)

    class Token(Base, OAuth2TokenMixin):
        __tablename__ = token
        id = Column(Integer, primary_key=True)
        user_id = Column(Integer)

    class AuthorizationCode(Base, OAuth2AuthorizationCodeMixin):
        __tablename__ = code
        id = Column(Integer, primary_key=True)
        user_id = Column(Integer)

    return Models(Base, Client, Token, AuthorizationCode)


MODELS = make_models()
Base = MODELS.base
Client = MODELS.Client
Token = MODELS.Token
AuthorizationCode = MODELS.Code


def create_schema(engine: sa.Engine) -> None:
    """The three tables, exactly as the Authlib mixins declare them."""
    MODELS.create_all(engine)


def usable(token: Any) -> bool:
    """What Authlib's resource protector checks for a token: neither revoked nor expired."""
    return not token.is_revoked() and not token.is_expired()


def authlib_usable(row: dict[str, Any]) -> bool:
    """`usable` for a token row (a dict of columns)."""
    return usable(Token(**row))


# --- through the models, as Authlib's endpoints do --------------------------------------------------------

_serial = itertools.count(1)


def register(session: Session, name: str, port: int, issued_at: float) -> Any:
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


def token(session: Session, client: Any, issued_at: float, expires_in: int, revoked: bool = False) -> Any:
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
    """The re-auth loop of the problem statement: one family (LOOP_NAME) that registers a new client on every
    login, each older member holding only revoked tokens (an orphan), the newest a live one; plus one healthy
    client. Returns the expected counts."""
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


# --- rows, for bulk inserts ---------------------------------------------------------------------------------


def client_row(
    client_id: str,
    name: str | None,
    redirect_uris: list[str],
    issued_at: int,
    secret: str | None = None,
    auth_method: str = "none",
    **metadata: Any,
) -> dict[str, Any]:
    """An oauth2_client row as Authlib's registration endpoint stores it (metadata as JSON)."""
    meta = {
        "redirect_uris": redirect_uris,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": auth_method,
        **metadata,
    }
    if name is not None:
        meta["client_name"] = name
    return {
        "client_id": client_id,
        "client_secret": secret,
        "client_id_issued_at": issued_at,
        "client_secret_expires_at": 0,
        "client_metadata": json.dumps(meta, ensure_ascii=False),
    }


def token_row(
    client_id: str,
    n: int,
    issued_at: int,
    expires_in: int,
    refresh: bool = False,
    access_revoked: int = 0,
    refresh_revoked: int = 0,
    scope: str = "openid",
    user_id: int | None = 42,
) -> dict[str, Any]:
    """An oauth2_token row; the token values are unique (`n` and random bits)."""
    return {
        "client_id": client_id,
        "token_type": "Bearer",
        "access_token": f"at-{n}-{random.getrandbits(64):016x}",
        "refresh_token": f"rt-{n}-{random.getrandbits(64):016x}" if refresh else None,
        "scope": scope,
        "issued_at": issued_at,
        "access_token_revoked_at": access_revoked,
        "refresh_token_revoked_at": refresh_revoked,
        "expires_in": expires_in,
        "user_id": user_id,
    }


def code_row(
    client_id: str,
    n: int,
    auth_time: int,
    redirect_uri: str = "http://localhost/callback",
    scope: str = "openid",
    user_id: int | None = 42,
    **extra: Any,
) -> dict[str, Any]:
    """An oauth2_code row (Authlib's codes expire 300 s after auth_time)."""
    return {
        "code": f"code-{n}-{random.getrandbits(64):016x}",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": scope,
        "auth_time": auth_time,
        "user_id": user_id,
        **extra,
    }


@dataclass
class Family:
    name: str
    survivor: str | None
    orphans: list[str] = field(default_factory=list)


class AuthlibDB:
    """Writes an Authlib schema's rows in bulk; `flush()` inserts everything queued in one transaction."""

    def __init__(self, engine: sa.Engine, create: bool = True):
        self.engine = engine
        self.metadata = MODELS.metadata
        if create:
            create_schema(engine)
        self.now = int(time.time())
        self._n = 0
        self._rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.token_rows: dict[str, dict[str, Any]] = {}  # access_token -> row, everything ever queued

    def _next(self) -> int:
        self._n += 1
        return self._n

    def client(
        self, client_id: str, name: str | None, redirect_uris: list[str], issued_at: int, **metadata: Any
    ) -> str:
        secret = f"s3cr3t-{self._next()}-ünïcode-{random.getrandbits(48):x}"
        self._rows["oauth2_client"].append(
            client_row(
                client_id, name, redirect_uris, issued_at, secret=secret, auth_method="client_secret_basic", **metadata
            )
        )
        return client_id

    def token(
        self,
        client_id: str,
        issued_at: int,
        expires_in: int,
        refresh: bool = False,
        access_revoked: int = 0,
        refresh_revoked: int = 0,
    ) -> str:
        row = token_row(
            client_id,
            self._next(),
            issued_at,
            expires_in,
            refresh=refresh,
            access_revoked=access_revoked,
            refresh_revoked=refresh_revoked,
            scope="openid profile",
            user_id=None,
        )
        self._rows["oauth2_token"].append(row)
        self.token_rows[row["access_token"]] = row
        return str(row["access_token"])

    def code(self, client_id: str, auth_time: int, nonce: str | None = None) -> str:
        n = self._next()
        row = code_row(
            client_id,
            n,
            auth_time,
            redirect_uri="http://localhost:1234/callback",
            user_id=None,
            nonce=nonce,
            code_challenge=f"chal-{n}",
            code_challenge_method="S256",
        )
        self._rows["oauth2_code"].append(row)
        return str(row["code"])

    def dead_history(self, client_id: str, at: int, variant: int) -> None:
        """Credentials a superseded registration leaves behind, none of them usable any more."""
        kind = variant % 3
        if kind == 0:  # access token expired long ago, no refresh token
            self.token(client_id, at + 30, HOUR)
        elif kind == 1:  # both revoked (Authlib revokes the pair)
            self.token(client_id, at + 30, HOUR, refresh=True, access_revoked=at + 600, refresh_revoked=at + 600)
        else:  # refresh token revoked by rotation, access expired
            self.token(client_id, at + 30, HOUR, refresh=True, refresh_revoked=at + 900)
        self.code(client_id, at + 20, nonce=None if variant % 2 else f"n-{variant}")

    def live_token(self, client_id: str) -> str:
        return self.token(client_id, self.now - 60, HOUR, refresh=True)

    def family(
        self,
        name: str,
        orphans: int,
        rng: random.Random,
        first_age: float = 30 * DAY,
        last_orphan_age: float = 2 * DAY,
        survivor: bool = True,
        prefix: str = "dcr",
    ) -> Family:
        """`orphans` dead registrations of one app (random loopback ports), then a newer live one."""
        fam = Family(name, None)
        ages = [first_age - i * (first_age - last_orphan_age) / max(orphans - 1, 1) for i in range(orphans)]
        for i, age in enumerate(ages):
            cid = f"{prefix}-{self._next():05d}-{rng.getrandbits(40):010x}"
            at = int(self.now - age)
            self.client(cid, name, [f"http://localhost:{rng.randint(49152, 65535)}/callback"], at)
            self.dead_history(cid, at, i)
            fam.orphans.append(cid)
        if survivor:
            cid = f"{prefix}-{self._next():05d}-{rng.getrandbits(40):010x}"
            port = rng.randint(49152, 65535)
            self.client(cid, name, [f"http://localhost:{port}/callback"], self.now - 2 * HOUR)
            self.dead_history(cid, self.now - 2 * HOUR, 0)
            self.live_token(cid)
            fam.survivor = cid
        return fam

    def flush(self) -> None:
        with self.engine.begin() as conn:
            for name in TABLES:
                rows = self._rows[name]
                if rows:
                    conn.execute(self.metadata.tables[name].insert(), rows)
                self._rows[name] = []


def reissue_client_id(engine: sa.Engine, client_id: str) -> None:
    """The auth server hands out a reaped client's client_id again: a new client row holding it (secret 'new')."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_client (client_id, client_secret, client_id_issued_at,"
                " client_secret_expires_at, client_metadata) VALUES (:c, 'new', :t, 0, '{}')"
            ),
            {"c": client_id, "t": int(time.time())},
        )


def fill_families(adb: AuthlibDB, families: int, orphans_each: int, seed: int) -> list[Family]:
    rng = random.Random(seed)
    fams = [adb.family(f"Claude Code (proj-{f:03d})", orphans_each, rng) for f in range(families)]
    adb.flush()
    return fams


@dataclass
class ChurnData:
    """What fill_churning() wrote: orphans (client_id -> (tokens, codes)) and the live survivors."""

    orphans: dict[str, tuple[int, int]]
    survivors: list[str]
    now: int


def fill_churning(
    engine: sa.Engine, families: int, orphans_per_family: int, name: str = "Claude Code #{f}", chunk: int = 5000
) -> ChurnData:
    """Authlib schema; per family `orphans_per_family` old clients with one dead token and one expired code
    each (orphans), and one newer member with a live token (the survivor). Loopback ports differ."""
    create_schema(engine)
    now = int(time.time())
    rng = random.Random(11)
    clients, tokens, codes = [], [], []
    orphans: dict[str, tuple[int, int]] = {}
    survivors = []
    n = 0

    def loopback() -> list[str]:
        return [f"http://localhost:{rng.randint(49152, 65535)}/callback"]

    for f in range(families):
        fam_name = name.format(f=f)
        for m in range(orphans_per_family + 1):
            n += 1
            cid = f"dcr-{f:04d}-{m:05d}"
            if m == orphans_per_family:  # the newest member, live
                clients.append(client_row(cid, fam_name, loopback(), now - 2 * HOUR))
                tokens.append(token_row(cid, n, now - 60, HOUR, refresh=True))
                survivors.append(cid)
            else:
                born = now - 2 * DAY - (orphans_per_family - m) * 60
                clients.append(client_row(cid, fam_name, loopback(), born))
                tokens.append(token_row(cid, n, born + 30, HOUR))  # expired an hour later, no refresh token
                codes.append(code_row(cid, n, born + 20))  # expired after 300 s
                orphans[cid] = (1, 1)
    tables = MODELS.metadata.tables
    with engine.begin() as conn:
        for rows, table in ((clients, "oauth2_client"), (tokens, "oauth2_token"), (codes, "oauth2_code")):
            for i in range(0, len(rows), chunk):
                conn.execute(tables[table].insert(), rows[i : i + chunk])
    return ChurnData(orphans, survivors, now)
