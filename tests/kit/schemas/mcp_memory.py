"""mcp-memory-service: its schema (the SQLite DDL the real server ships, `reaper.demo.SCHEMA`), a PostgreSQL
port of it, the built-in profile made to allow PostgreSQL, and row writers."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from reaper.demo import SCHEMA
from reaper.profiles import builtin_profiles


def mcp_statements(kind: str) -> list[str]:
    """mcp-memory-service's DDL, one statement each. It is a SQLite schema; the PostgreSQL port uses
    DOUBLE PRECISION for REAL (SQLite's REAL is 8 bytes, PostgreSQL's 4: too coarse for epoch seconds)
    and BOOLEAN for the 0/1 flags (the profile tests them with IS FALSE, for booleans only on PostgreSQL).
    """
    statements = [s.strip() for s in SCHEMA.split(";") if s.strip()]
    if kind == "postgresql":
        statements = [
            s.replace(" REAL", " DOUBLE PRECISION").replace("INTEGER DEFAULT 0", "BOOLEAN DEFAULT false")
            for s in statements
        ]
    return statements


def create_mcp_schema(engine: sa.Engine, kind: str) -> None:
    with engine.begin() as conn:
        for stmt in mcp_statements(kind):
            conn.execute(sa.text(stmt))


def mcp_profile(kind: str, tmp_path: Path) -> str:
    """The built-in profile on SQLite; on PostgreSQL a custom copy of it that allows PostgreSQL (the built-in
    one is SQLite-only because the real server only ships a SQLite backend)."""
    if kind == "sqlite":
        return "mcp-memory-service"
    text = builtin_profiles()["mcp-memory-service"].read_text(encoding="utf-8")
    assert 'database = ["sqlite"]' in text
    path = tmp_path / "mcp-memory-service-pg.toml"
    path.write_text(text.replace('database = ["sqlite"]', 'database = ["sqlite", "postgresql"]'), encoding="utf-8")
    return str(path)


def insert_client(
    conn: sa.Connection,
    client_id: str,
    name: str | None,
    redirect_uris: str | None,
    created_at: float | None,
    secret: str | None = None,
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO oauth_clients (client_id, client_secret, client_name, redirect_uris, response_types,"
            " grant_types, scope, token_endpoint_auth_method, created_at, metadata)"
            " VALUES (:id, :secret, :name, :uris, '[\"code\"]', '[\"authorization_code\"]', 'read', 'none',"
            " :created, NULL)"
        ),
        {"id": client_id, "secret": secret, "name": name, "uris": redirect_uris, "created": created_at},
    )


def insert_tokens(
    conn: sa.Connection,
    client_id: str,
    at: float,
    access: str,
    refresh: str,
    code: str,
    expires_in: float = 3600,
    revoked: bool = False,
) -> None:
    """An authorization code exchanged at `at`, its access token and refresh token."""
    conn.execute(
        sa.text(
            "INSERT INTO oauth_authorization_codes VALUES (:code, :cid, 'http://localhost/cb', 'read', :exp,"
            " :consumed, :at, :challenge, 'S256')"
        ),
        {
            "code": code,
            "cid": client_id,
            "exp": at + 600,
            "consumed": True,
            "at": at,
            "challenge": "CHALLENGE-" + code,
        },
    )
    conn.execute(
        sa.text("INSERT INTO oauth_access_tokens VALUES (:t, :cid, 'read', :exp, :at)"),
        {"t": access, "cid": client_id, "exp": at + expires_in, "at": at},
    )
    conn.execute(
        sa.text("INSERT INTO oauth_refresh_tokens VALUES (:t, :cid, 'read', :exp, :rev, :parent, :at)"),
        {
            "t": refresh,
            "cid": client_id,
            "exp": at + 30 * 86400,
            "rev": bool(revoked),
            "parent": None,  # a code exchange's refresh token starts a chain: the storage leaves parent_token NULL
            "at": at,
        },
    )
