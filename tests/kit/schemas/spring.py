"""Spring Authorization Server: its JDBC schema (the PostgreSQL variant: blob -> text); `Spring` writes rows."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from kit.schemas.common import ago, create, insert


def spring(engine: sa.Engine) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "oauth2_registered_client",
        md,
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("client_id", sa.String(100), nullable=False),
        sa.Column("client_id_issued_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("client_secret", sa.String(200)),
        sa.Column("client_secret_expires_at", sa.DateTime),
        sa.Column("client_name", sa.String(200), nullable=False),
        sa.Column("client_authentication_methods", sa.String(1000), nullable=False),
        sa.Column("authorization_grant_types", sa.String(1000), nullable=False),
        sa.Column("redirect_uris", sa.String(1000)),
        sa.Column("post_logout_redirect_uris", sa.String(1000)),
        sa.Column("scopes", sa.String(1000), nullable=False),
        sa.Column("client_settings", sa.String(2000), nullable=False),
        sa.Column("token_settings", sa.String(2000), nullable=False),
    )
    cols = [
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("registered_client_id", sa.String(100), nullable=False),
        sa.Column("principal_name", sa.String(200), nullable=False),
        sa.Column("authorization_grant_type", sa.String(100), nullable=False),
        sa.Column("authorized_scopes", sa.String(1000)),
        sa.Column("attributes", sa.Text),
        sa.Column("state", sa.String(500)),
    ]
    for token in ("authorization_code", "access_token", "oidc_id_token", "refresh_token"):
        cols += [
            sa.Column(f"{token}_value", sa.Text),
            sa.Column(f"{token}_issued_at", sa.DateTime),
            sa.Column(f"{token}_expires_at", sa.DateTime),
            sa.Column(f"{token}_metadata", sa.Text),
        ]
    cols += [
        sa.Column("access_token_type", sa.String(100)),
        sa.Column("access_token_scopes", sa.String(1000)),
    ]
    sa.Table("oauth2_authorization", md, *cols)
    sa.Table(
        "oauth2_authorization_consent",
        md,
        sa.Column("registered_client_id", sa.String(100), primary_key=True),
        sa.Column("principal_name", sa.String(200), primary_key=True),
        sa.Column("authorities", sa.String(1000), nullable=False),
    )
    return create(engine, md)


def spring_metadata(invalidated: bool) -> str:
    """Token metadata as Spring's Jackson mapper writes it (no spaces)."""
    return (
        '{"@class":"java.util.Collections$UnmodifiableMap","metadata.token.claims":{"@class":'
        '"java.util.Collections$UnmodifiableMap","sub":"alice"},'
        f'"metadata.token.invalidated":{"true" if invalidated else "false"}}}'
    )


class Spring:
    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.t = spring(engine).tables

    def client(self, client_id: str, name: str, redirect_uris: list[str], age: float) -> str:
        key = str(uuid.uuid4())
        insert(
            self.engine,
            self.t["oauth2_registered_client"],
            [
                {
                    "id": key,
                    "client_id": client_id,
                    "client_id_issued_at": ago(age),
                    "client_name": name,
                    "client_authentication_methods": "none",
                    "authorization_grant_types": "authorization_code,refresh_token",
                    "redirect_uris": ",".join(redirect_uris),
                    "scopes": "openid",
                    "client_settings": "{}",
                    "token_settings": "{}",
                }
            ],
        )
        return key

    def authorization(
        self,
        key: str,
        principal: str = "alice",
        grant: str = "authorization_code",
        scopes: str = "openid",
        age: float = 60,
        access_ttl: float | None = 300,
        refresh_ttl: float | None = None,
        code_ttl: float | None = None,
        invalidated: tuple[str, ...] = (),
    ) -> str:
        row: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "registered_client_id": key,
            "principal_name": principal,
            "authorization_grant_type": grant,
            "authorized_scopes": scopes,
            "attributes": "{}",
        }
        for token, ttl in (
            ("access_token", access_ttl),
            ("refresh_token", refresh_ttl),
            ("authorization_code", code_ttl),
        ):
            if ttl is not None:
                row |= {
                    f"{token}_value": uuid.uuid4().hex,
                    f"{token}_issued_at": ago(age),
                    f"{token}_expires_at": ago(age - ttl),
                    f"{token}_metadata": spring_metadata(token in invalidated),
                }
        insert(self.engine, self.t["oauth2_authorization"], [row])
        return str(row["id"])

    def consent(self, key: str, principal: str = "alice") -> None:
        insert(
            self.engine,
            self.t["oauth2_authorization_consent"],
            [{"registered_client_id": key, "principal_name": principal, "authorities": "SCOPE_openid"}],
        )
