"""Schemas of the servers that do not install from PyPI (Hydra, Keycloak, Spring Authorization Server,
Doorkeeper, Better Auth), built from the shapes documented in shared/docs/AUTH-SERVERS.md with the types each
server uses per database, plus small row writers. Only the columns the documents name (and the ones a server
needs to work: keys, secrets, foreign keys) are created.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

Json = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Uuid = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")


def utcnow() -> datetime:
    """Naive UTC, the way these servers store `timestamp` columns."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def create(engine: sa.Engine, md: sa.MetaData) -> sa.MetaData:
    md.create_all(engine)
    return md


def insert(engine: sa.Engine, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)


# --- Ory Hydra v2 ---------------------------------------------------------------------------------------


def hydra(engine: sa.Engine) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table("networks", md, sa.Column("id", Uuid, primary_key=True), sa.Column("created_at", sa.DateTime))
    sa.Table(
        "hydra_client",
        md,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("nid", Uuid, sa.ForeignKey("networks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("client_name", sa.Text, nullable=False, default=""),
        sa.Column("client_secret", sa.Text, nullable=False, default=""),
        sa.Column("redirect_uris", Json, nullable=False),
        sa.Column("owner", sa.Text, nullable=False, default=""),
        sa.Column("metadata", Json),
        sa.Column("token_endpoint_auth_method", sa.String(25), nullable=False, default="none"),
        sa.Column("registration_access_token_signature", sa.String(128), nullable=False, default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    for name in ("hydra_oauth2_access", "hydra_oauth2_refresh", "hydra_oauth2_code"):
        cols = [
            sa.Column("signature", sa.String(255), primary_key=True),
            sa.Column("request_id", sa.String(40), nullable=False),
            sa.Column("requested_at", sa.DateTime, nullable=False),
            sa.Column("client_id", sa.String(255), nullable=False),
            sa.Column("nid", Uuid, nullable=False),
            sa.Column("subject", sa.String(255), nullable=False, default=""),
            sa.Column("active", sa.Boolean, nullable=False, default=True),
            sa.Column("expires_at", sa.DateTime, nullable=True),
            sa.Column("session_data", sa.Text, nullable=False, default=""),
        ]
        if name == "hydra_oauth2_refresh":
            cols += [sa.Column("first_used_at", sa.DateTime), sa.Column("used_times", sa.Integer)]
        sa.Table(
            name,
            md,
            *cols,
            sa.ForeignKeyConstraint(["client_id", "nid"], ["hydra_client.id", "hydra_client.nid"], ondelete="CASCADE"),
        )
    sa.Table(
        "hydra_oauth2_flow",
        md,
        sa.Column("login_challenge", sa.String(40), primary_key=True),
        sa.Column("nid", Uuid, nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("consent_remember", sa.Boolean, nullable=False, default=False),
        sa.Column("consent_handled_at", sa.DateTime),
        sa.ForeignKeyConstraint(["client_id", "nid"], ["hydra_client.id", "hydra_client.nid"], ondelete="CASCADE"),
    )
    return create(engine, md)


class Hydra:
    """Writes Hydra rows: clients per network, tokens, flows."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.md = hydra(engine)
        self.t = self.md.tables

    def network(self) -> str:
        nid = str(uuid.uuid4())
        insert(self.engine, self.t["networks"], [{"id": nid, "created_at": utcnow()}])
        return nid

    def client(self, nid: str, name: str, redirect_uris: list[str], age: float, client_id: str | None = None) -> str:
        import json

        cid = client_id or str(uuid.uuid4())
        insert(
            self.engine,
            self.t["hydra_client"],
            [
                {
                    "id": cid,
                    "nid": nid,
                    "client_name": name,
                    "client_secret": "$pbkdf2-sha256$secret",
                    "redirect_uris": json.dumps(redirect_uris)
                    if self.engine.dialect.name != "postgresql"
                    else redirect_uris,
                    "created_at": ago(age),
                    "updated_at": ago(age),
                }
            ],
        )
        return cid

    def token(
        self, table: str, nid: str, client_id: str, age: float, expires_in: float | None, active: bool = True
    ) -> str:
        sig = uuid.uuid4().hex
        row = {
            "signature": sig,
            "request_id": uuid.uuid4().hex,
            "requested_at": ago(age),
            "client_id": client_id,
            "nid": nid,
            "subject": "alice",
            "active": active,
            "expires_at": None if expires_in is None else ago(age - expires_in),
        }
        if table == "hydra_oauth2_refresh":
            row |= {"first_used_at": None, "used_times": 0}
        insert(self.engine, self.t[table], [row])
        return sig

    def flow(self, nid: str, client_id: str, age: float, remember: bool = True) -> None:
        insert(
            self.engine,
            self.t["hydra_oauth2_flow"],
            [
                {
                    "login_challenge": uuid.uuid4().hex,
                    "nid": nid,
                    "client_id": client_id,
                    "subject": "alice",
                    "requested_at": ago(age),
                    "consent_remember": remember,
                    "consent_handled_at": ago(age),
                }
            ],
        )


# --- Keycloak -------------------------------------------------------------------------------------------


def keycloak(engine: sa.Engine, upper: bool = False) -> sa.MetaData:
    """Keycloak's JPA tables (the columns the profile reads, plus keys). `upper`: column names in upper case,
    as    Keycloak's Liquibase changelogs create them on MySQL/MariaDB."""

    def c(name: str, *args: Any, **kw: Any) -> sa.Column[Any]:
        return sa.Column(name.upper() if upper else name, *args, key=name, **kw)

    md = sa.MetaData()
    sa.Table("realm", md, c("id", sa.String(36), primary_key=True), c("name", sa.String(255), unique=True))
    sa.Table(
        "client",
        md,
        c("id", sa.String(36), primary_key=True),
        c("enabled", sa.Boolean, nullable=False, default=True),
        c("client_id", sa.String(255)),
        c("name", sa.String(255)),
        c("realm_id", sa.String(36)),
        c("secret", sa.String(255)),
        c("public_client", sa.Boolean, nullable=False, default=True),
        c("protocol", sa.String(255), default="openid-connect"),
        c("consent_required", sa.Boolean, nullable=False, default=True),
        c("registration_token", sa.String(255)),
        sa.UniqueConstraint("realm_id", "client_id"),
    )
    sa.Table(
        "redirect_uris",
        md,
        c("client_id", sa.String(36), sa.ForeignKey("client.id"), primary_key=True),
        c("value", sa.String(255), primary_key=True),
    )
    sa.Table(
        "offline_user_session",
        md,
        c("user_session_id", sa.String(36), primary_key=True),
        c("user_id", sa.String(255)),
        c("realm_id", sa.String(36), nullable=False),
        c("created_on", sa.Integer, nullable=False),
        c("offline_flag", sa.String(4), primary_key=True),
        c("data", LongText),
        c("last_session_refresh", sa.Integer, nullable=False, default=0),
    )
    sa.Table(
        "offline_client_session",
        md,
        c("user_session_id", sa.String(36), primary_key=True),
        c("client_id", sa.String(255), primary_key=True),
        c("offline_flag", sa.String(4), primary_key=True),
        c("timestamp", sa.Integer),
        c("data", LongText),
        c("client_storage_provider", sa.String(36), primary_key=True, default="local"),
        c("external_client_id", sa.String(255), primary_key=True, default="local"),
    )
    sa.Table(
        "user_consent",
        md,
        c("id", sa.String(36), primary_key=True),
        c("client_id", sa.String(255)),
        c("user_id", sa.String(36), nullable=False),
        c("created_date", sa.BigInteger),
        c("last_updated_date", sa.BigInteger),
    )
    sa.Table(
        "event_entity",
        md,
        c("id", sa.String(36), primary_key=True),
        c("client_id", sa.String(255)),
        c("details_json", sa.String(2550)),
        c("error", sa.String(255)),
        c("ip_address", sa.String(255)),
        c("realm_id", sa.String(255)),
        c("session_id", sa.String(255)),
        c("event_time", sa.BigInteger),
        c("type", sa.String(255)),
        c("user_id", sa.String(255)),
    )
    return create(engine, md)


class Keycloak:
    """Writes Keycloak rows the way its JPA store does."""

    def __init__(self, engine: sa.Engine, upper: bool = False):
        self.engine = engine
        self.md = keycloak(engine, upper)
        self.t = self.md.tables
        self.now = utcnow().replace(tzinfo=UTC).timestamp()

    def realm(self, name: str) -> str:
        rid = str(uuid.uuid4())
        insert(self.engine, self.t["realm"], [{"id": rid, "name": name}])
        return rid

    def client(
        self,
        realm_id: str,
        client_id: str,
        name: str | None,
        redirect_uris: list[str],
        dynamic: bool = True,
        enabled: bool = True,
        registered_age: float | None = None,
        ip: str | None = None,
    ) -> str:
        cid = str(uuid.uuid4())
        insert(
            self.engine,
            self.t["client"],
            [
                {
                    "id": cid,
                    "enabled": enabled,
                    "client_id": client_id,
                    "name": name,
                    "realm_id": realm_id,
                    "secret": "**********" if not dynamic else None,
                    "public_client": True,
                    "registration_token": uuid.uuid4().hex if dynamic else None,
                }
            ],
        )
        insert(self.engine, self.t["redirect_uris"], [{"client_id": cid, "value": u} for u in redirect_uris])
        if registered_age is not None:
            self.event(realm_id, client_id, "CLIENT_REGISTER", registered_age, ip)
        return cid

    def event(self, realm_id: str, client_id: str, type_: str, age: float, ip: str | None) -> None:
        insert(
            self.engine,
            self.t["event_entity"],
            [
                {
                    "id": str(uuid.uuid4()),
                    "client_id": client_id,
                    "realm_id": realm_id,
                    "type": type_,
                    "ip_address": ip,
                    "event_time": int((self.now - age) * 1000),
                    "details_json": "{}",
                }
            ],
        )

    def session(self, realm_id: str, client_pk: str, offline: bool, refreshed_age: float) -> str:
        sid = str(uuid.uuid4())
        flag = "1" if offline else "0"
        ts = int(self.now - refreshed_age)
        insert(
            self.engine,
            self.t["offline_user_session"],
            [
                {
                    "user_session_id": sid,
                    "user_id": "alice",
                    "realm_id": realm_id,
                    "created_on": ts,
                    "offline_flag": flag,
                    "data": "{}",
                    "last_session_refresh": ts,
                }
            ],
        )
        insert(
            self.engine,
            self.t["offline_client_session"],
            [
                {
                    "user_session_id": sid,
                    "client_id": client_pk,
                    "offline_flag": flag,
                    "timestamp": ts,
                    "data": "{}",
                    "client_storage_provider": "local",
                    "external_client_id": "local",
                }
            ],
        )
        return sid

    def consent(self, client_pk: str, updated_age: float) -> None:
        ms = int((self.now - updated_age) * 1000)
        insert(
            self.engine,
            self.t["user_consent"],
            [
                {
                    "id": str(uuid.uuid4()),
                    "client_id": client_pk,
                    "user_id": "alice",
                    "created_date": ms,
                    "last_updated_date": ms,
                }
            ],
        )

    def delete_client(self, client_pk: str) -> None:
        """What Keycloak itself does on DELETE /admin/realms/{realm}/clients/{id}."""
        with self.engine.begin() as conn:
            for name in ("redirect_uris", "offline_client_session", "user_consent"):
                t = self.t[name]
                conn.execute(t.delete().where(t.c.client_id == client_pk))
            conn.execute(self.t["client"].delete().where(self.t["client"].c.id == client_pk))


# --- Spring Authorization Server (JDBC schema, PostgreSQL variant: blob -> text) -------------------------


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


# --- Doorkeeper -----------------------------------------------------------------------------------------


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


# --- Better Auth ----------------------------------------------------------------------------------------


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
