"""Better Auth: the oauth-provider tables (or the legacy oidcProvider ones), hand-typed from its documents, in
its migrator's quoted camelCase or Drizzle's snake_case; `BetterAuth` writes rows. The real servers in
`kit/better_auth/` are to replace this."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from kit.schemas.common import ago, create, insert


def better_auth(engine: sa.Engine, legacy: bool = False, snake: bool = False) -> sa.MetaData:
    """The oauth-provider tables (or the legacy oidcProvider ones) in Better Auth's migrator's quoted
    camelCase,    or in Drizzle's snake_case. Generated foreign keys cascade on delete."""
    from reaper.profiles.names import snake_case

    def n(name: str) -> str:
        return snake_case(name) if snake else name

    def c(name: str, *args: Any, **kw: Any) -> sa.Column[Any]:
        return sa.Column(n(name), *args, key=name, **kw)

    md = sa.MetaData()
    sa.Table(n("user"), md, c("id", sa.Text, primary_key=True), c("name", sa.Text))
    user_fk = f"{n('user')}.id"
    if legacy:
        sa.Table(
            n("oauthApplication"),
            md,
            c("id", sa.Text, primary_key=True),
            c("name", sa.Text, nullable=False),
            c("icon", sa.Text),
            c("metadata", sa.Text),
            c("clientId", sa.Text, nullable=False, unique=True),
            c("clientSecret", sa.Text),
            c("redirectUrls", sa.Text, nullable=False),
            c("type", sa.Text, nullable=False),
            c("disabled", sa.Boolean),
            c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
            c("createdAt", sa.DateTime, nullable=False),
            c("updatedAt", sa.DateTime, nullable=False),
        )
        app_fk = f"{n('oauthApplication')}.clientId"  # foreign keys name columns by key
        sa.Table(
            n("oauthAccessToken"),
            md,
            c("id", sa.Text, primary_key=True),
            c("accessToken", sa.Text, nullable=False, unique=True),
            c("refreshToken", sa.Text, nullable=False, unique=True),
            c("accessTokenExpiresAt", sa.DateTime, nullable=False),
            c("refreshTokenExpiresAt", sa.DateTime, nullable=False),
            c("clientId", sa.Text, sa.ForeignKey(app_fk, ondelete="CASCADE"), nullable=False),
            c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
            c("scopes", sa.Text, nullable=False),
            c("createdAt", sa.DateTime, nullable=False),
            c("updatedAt", sa.DateTime, nullable=False),
        )
        sa.Table(
            n("oauthConsent"),
            md,
            c("id", sa.Text, primary_key=True),
            c("clientId", sa.Text, sa.ForeignKey(app_fk, ondelete="CASCADE")),
            c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
            c("scopes", sa.Text, nullable=False),
            c("createdAt", sa.DateTime, nullable=False),
            c("updatedAt", sa.DateTime, nullable=False),
            c("consentGiven", sa.Boolean, nullable=False),
        )
        return create(engine, md)
    sa.Table(
        n("oauthClient"),
        md,
        c("id", sa.Text, primary_key=True),
        c("clientId", sa.Text, nullable=False, unique=True),
        c("clientSecret", sa.Text),
        c("clientDiscoveryId", sa.Text),
        c("disabled", sa.Boolean, default=False),
        c("skipConsent", sa.Boolean),
        c("scopes", sa.Text),
        c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
        c("createdAt", sa.DateTime),
        c("updatedAt", sa.DateTime),
        c("name", sa.Text),
        c("uri", sa.Text),
        c("softwareId", sa.Text),
        c("softwareVersion", sa.Text),
        c("redirectUris", sa.Text, nullable=False),
        c("tokenEndpointAuthMethod", sa.Text),
        c("grantTypes", sa.Text),
        c("public", sa.Boolean),
        c("metadata", sa.Text),
    )
    client_fk = f"{n('oauthClient')}.clientId"  # foreign keys name columns by key
    sa.Table(
        n("oauthRefreshToken"),
        md,
        c("id", sa.Text, primary_key=True),
        c("token", sa.Text, nullable=False, unique=True),
        c("clientId", sa.Text, sa.ForeignKey(client_fk, ondelete="CASCADE"), nullable=False),
        c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE"), nullable=False),
        c("expiresAt", sa.DateTime, nullable=False),
        c("createdAt", sa.DateTime, nullable=False),
        c("revoked", sa.DateTime),
        c("rotatedAt", sa.DateTime),
        c("scopes", sa.Text, nullable=False),
    )
    sa.Table(
        n("oauthAccessToken"),
        md,
        c("id", sa.Text, primary_key=True),
        c("token", sa.Text, nullable=False, unique=True),
        c("clientId", sa.Text, sa.ForeignKey(client_fk, ondelete="CASCADE"), nullable=False),
        c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
        c("refreshId", sa.Text, sa.ForeignKey(f"{n('oauthRefreshToken')}.id", ondelete="CASCADE")),
        c("expiresAt", sa.DateTime, nullable=False),
        c("createdAt", sa.DateTime, nullable=False),
        c("revoked", sa.DateTime),
        c("scopes", sa.Text, nullable=False),
    )
    sa.Table(
        n("oauthConsent"),
        md,
        c("id", sa.Text, primary_key=True),
        c("clientId", sa.Text, sa.ForeignKey(client_fk, ondelete="CASCADE"), nullable=False),
        c("userId", sa.Text, sa.ForeignKey(user_fk, ondelete="CASCADE")),
        c("scopes", sa.Text, nullable=False),
        c("createdAt", sa.DateTime, nullable=False),
        c("updatedAt", sa.DateTime, nullable=False),
    )
    return create(engine, md)


class BetterAuth:
    """Writes rows as Better Auth does, through logical (camelCase) keys whatever the physical naming."""

    def __init__(self, engine: sa.Engine, legacy: bool = False, snake: bool = False):
        from reaper.profiles.names import snake_case

        self.engine = engine
        md = better_auth(engine, legacy, snake)
        self.t = {
            name: md.tables[snake_case(name) if snake else name]
            for name in (
                "user",
                "oauthClient",
                "oauthApplication",
                "oauthRefreshToken",
                "oauthAccessToken",
                "oauthConsent",
            )
            if (snake_case(name) if snake else name) in md.tables
        }
        insert(engine, self.t["user"], [{"id": "alice", "name": "Alice"}])

    def client(
        self,
        name: str,
        redirect_uris: list[str],
        age: float,
        discovery: str | None = None,
        disabled: bool = False,
        client_id: str | None = None,
        software_id: str | None = None,
    ) -> str:
        import json

        cid = client_id or uuid.uuid4().hex
        insert(
            self.engine,
            self.t["oauthClient"],
            [
                {
                    "id": uuid.uuid4().hex,
                    "clientId": cid,
                    "clientDiscoveryId": discovery,
                    "disabled": disabled,
                    "userId": "alice",
                    "createdAt": ago(age),
                    "updatedAt": ago(age),
                    "name": name,
                    "softwareId": software_id,
                    "redirectUris": json.dumps(redirect_uris),
                    "public": True,
                }
            ],
        )
        return cid

    def refresh(
        self,
        cid: str,
        age: float,
        ttl: float,
        revoked_age: float | None = None,
        rotated_age: float | None = None,
    ) -> str:
        rid = uuid.uuid4().hex
        insert(
            self.engine,
            self.t["oauthRefreshToken"],
            [
                {
                    "id": rid,
                    "token": uuid.uuid4().hex,
                    "clientId": cid,
                    "userId": "alice",
                    "createdAt": ago(age),
                    "expiresAt": ago(age - ttl),
                    "revoked": None if revoked_age is None else ago(revoked_age),
                    "rotatedAt": None if rotated_age is None else ago(rotated_age),
                    "scopes": "openid offline_access",
                }
            ],
        )
        return rid

    def access(self, cid: str, age: float, ttl: float, refresh_id: str | None = None) -> None:
        insert(
            self.engine,
            self.t["oauthAccessToken"],
            [
                {
                    "id": uuid.uuid4().hex,
                    "token": uuid.uuid4().hex,
                    "clientId": cid,
                    "userId": "alice",
                    "refreshId": refresh_id,
                    "createdAt": ago(age),
                    "expiresAt": ago(age - ttl),
                    "scopes": "openid",
                }
            ],
        )

    def consent(self, cid: str, age: float, **extra: Any) -> None:
        insert(
            self.engine,
            self.t["oauthConsent"],
            [
                {
                    "id": uuid.uuid4().hex,
                    "clientId": cid,
                    "userId": "alice",
                    "scopes": "openid",
                    "createdAt": ago(age),
                    "updatedAt": ago(age),
                    **extra,
                }
            ],
        )

    def application(self, name: str, redirect_uris: list[str], age: float, disabled: bool = False) -> str:
        cid = uuid.uuid4().hex
        insert(
            self.engine,
            self.t["oauthApplication"],
            [
                {
                    "id": uuid.uuid4().hex,
                    "name": name,
                    "clientId": cid,
                    "redirectUrls": ",".join(redirect_uris),
                    "type": "public",
                    "disabled": disabled,
                    "userId": "alice",
                    "createdAt": ago(age),
                    "updatedAt": ago(age),
                }
            ],
        )
        return cid

    def legacy_token(self, cid: str, age: float, access_ttl: float, refresh_ttl: float) -> None:
        insert(
            self.engine,
            self.t["oauthAccessToken"],
            [
                {
                    "id": uuid.uuid4().hex,
                    "accessToken": uuid.uuid4().hex,
                    "refreshToken": uuid.uuid4().hex,
                    "accessTokenExpiresAt": ago(age - access_ttl),
                    "refreshTokenExpiresAt": ago(age - refresh_ttl),
                    "clientId": cid,
                    "userId": "alice",
                    "scopes": "openid",
                    "createdAt": ago(age),
                    "updatedAt": ago(age),
                }
            ],
        )
