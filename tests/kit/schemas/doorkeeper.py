"""Doorkeeper (Ruby on Rails): its tables from their documented shape (see `kit.schemas.common`); `Doorkeeper`
writes rows."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from kit.schemas.common import ago, create, insert


def doorkeeper(engine: sa.Engine) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "oauth_applications",
        md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("uid", sa.String, nullable=False, unique=True),
        sa.Column("secret", sa.String, nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scopes", sa.String, nullable=False, default=""),
        sa.Column("confidential", sa.Boolean, nullable=False, default=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    sa.Table(
        "oauth_access_grants",
        md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("resource_owner_id", sa.BigInteger, nullable=False),
        sa.Column("application_id", sa.BigInteger, sa.ForeignKey("oauth_applications.id"), nullable=False),
        sa.Column("token", sa.String, nullable=False, unique=True),
        sa.Column("expires_in", sa.Integer, nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scopes", sa.String, nullable=False, default=""),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime()),
    )
    sa.Table(
        "oauth_access_tokens",
        md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("resource_owner_id", sa.BigInteger),
        sa.Column("application_id", sa.BigInteger, sa.ForeignKey("oauth_applications.id"), nullable=False),
        sa.Column("token", sa.String, nullable=False, unique=True),
        sa.Column("refresh_token", sa.String, unique=True),
        sa.Column("expires_in", sa.Integer),
        sa.Column("scopes", sa.String),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime()),
        sa.Column("previous_refresh_token", sa.String, nullable=False, default=""),
    )
    return create(engine, md)


class Doorkeeper:
    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.t = doorkeeper(engine).tables

    def application(self, name: str, redirect_uris: list[str], age: float, uid: str | None = None) -> tuple[int, str]:
        uid = uid or uuid.uuid4().hex
        with self.engine.begin() as conn:
            res = conn.execute(
                self.t["oauth_applications"]
                .insert()
                .values(
                    name=name,
                    uid=uid,
                    secret="$2a$secret",
                    redirect_uri="\n".join(redirect_uris),
                    scopes="read",
                    confidential=False,
                    created_at=ago(age),
                    updated_at=ago(age),
                )
            )
            return int(res.inserted_primary_key[0]), uid

    def token(
        self,
        app_id: int,
        age: float,
        expires_in: int | None,
        refresh: bool = False,
        revoked_in: float | None = None,
    ) -> None:
        """revoked_in: seconds from now (negative: in the past; positive: a scheduled revocation)."""
        insert(
            self.engine,
            self.t["oauth_access_tokens"],
            [
                {
                    "resource_owner_id": 1,
                    "application_id": app_id,
                    "token": uuid.uuid4().hex,
                    "refresh_token": uuid.uuid4().hex if refresh else None,
                    "expires_in": expires_in,
                    "scopes": "read",
                    "created_at": ago(age),
                    "revoked_at": None if revoked_in is None else ago(-revoked_in),
                }
            ],
        )

    def grant(self, app_id: int, age: float, expires_in: int = 600, revoked_in: float | None = None) -> None:
        insert(
            self.engine,
            self.t["oauth_access_grants"],
            [
                {
                    "resource_owner_id": 1,
                    "application_id": app_id,
                    "token": uuid.uuid4().hex,
                    "expires_in": expires_in,
                    "redirect_uri": "http://localhost/cb",
                    "scopes": "read",
                    "created_at": ago(age),
                    "revoked_at": None if revoked_in is None else ago(-revoked_in),
                }
            ],
        )
