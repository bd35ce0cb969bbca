"""Keycloak: its JPA tables (the columns the profile reads, plus keys), upper-case columns on MariaDB as
Keycloak's Liquibase changelogs make them; `Keycloak` writes rows the way its store does.

`KeycloakStandIn` stands in for Keycloak's HTTP API, following its documented contract, backed by these tables
(it is "Keycloak": it alone writes them, as the real server would). No Keycloak runs in these tests.

- POST /realms/{realm}/protocol/openid-connect/token  (client_credentials) -> {"access_token", "expires_in"}
- GET|PUT|DELETE /admin/realms/{realm}/clients/{id}, POST /admin/realms/{realm}/clients  (Bearer token)
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
import uuid
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa

from kit.schemas.common import LongText, create, insert, utcnow


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


# --- a stand-in for its Admin REST API ------------------------------------------------------------------


class KeycloakStandIn:
    def __init__(self, kc: Keycloak, client_id: str = "dcr-reaper", secret: str = "s3cret-kc"):
        self.kc = kc
        self.client_id, self.secret = client_id, secret
        self.tokens: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail_next: dict[str, int] = {}  # method -> HTTP status to answer once
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, doc: Any = None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                if body:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self, method: str) -> None:
                path = urllib.parse.urlsplit(self.path).path
                outer.calls.append((method, path))
                parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
                body = self._body()
                if (
                    method == "POST"
                    and parts[:1] == ["realms"]
                    and parts[2:] == ["protocol", "openid-connect", "token"]
                ):
                    form = urllib.parse.parse_qs(body.decode())
                    if (
                        form.get("grant_type") == ["client_credentials"]
                        and form.get("client_id") == [outer.client_id]
                        and form.get("client_secret") == [outer.secret]
                    ):
                        token = secrets.token_urlsafe(16)
                        outer.tokens.add(token)
                        return self._reply(200, {"access_token": token, "expires_in": 300, "token_type": "Bearer"})
                    return self._reply(401, {"error": "unauthorized_client", "error_description": "Invalid client"})
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or auth[7:] not in outer.tokens:
                    return self._reply(401, {"error": "HTTP 401 Unauthorized"})
                if parts[:2] != ["admin", "realms"] or len(parts) < 4 or parts[3] != "clients":
                    return self._reply(404, {"error": "not found"})
                if method in outer.fail_next:
                    return self._reply(outer.fail_next.pop(method), {"errorMessage": "injected failure"})
                realm = outer.realm_id(parts[2])
                if realm is None:
                    return self._reply(404, {"error": "Realm not found."})
                if len(parts) == 4 and method == "POST":
                    return self._reply(*outer.create(realm, json.loads(body)))
                if len(parts) != 5:
                    return self._reply(405)
                key = parts[4]
                if method == "GET":
                    rep = outer.representation(realm, key)
                    return self._reply(200, rep) if rep else self._reply(404, {"error": "Could not find client"})
                if outer.representation(realm, key) is None:
                    return self._reply(404, {"error": "Could not find client"})
                if method == "DELETE":
                    outer.kc.delete_client(key)
                    return self._reply(204)
                if method == "PUT":
                    outer.update(key, json.loads(body))
                    return self._reply(204)
                return self._reply(405)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: shutdown() waits for the serving loop to notice (0.5 s by default).
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> KeycloakStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    # -- Keycloak's store ------------------------------------------------------------------------------------

    def realm_id(self, name: str) -> str | None:
        t = self.kc.t["realm"]
        with self.kc.engine.connect() as conn:
            return conn.execute(sa.select(t.c.id).where(t.c.name == name)).scalar()

    def representation(self, realm: str, key: str) -> dict[str, Any] | None:
        c, r = self.kc.t["client"], self.kc.t["redirect_uris"]
        with self.kc.engine.connect() as conn:
            row = conn.execute(sa.select(c).where(c.c.id == key, c.c.realm_id == realm)).mappings().first()
            if row is None:
                return None
            uris = sorted(x for (x,) in conn.execute(sa.select(r.c.value).where(r.c.client_id == key)))
        v = {col.key: row[col] for col in c.columns}  # by key: on MySQL the column names are upper case
        return {
            "id": v["id"],
            "clientId": v["client_id"],
            "name": v["name"],
            "enabled": bool(v["enabled"]),
            "publicClient": bool(v["public_client"]),
            "protocol": v["protocol"],
            "consentRequired": bool(v["consent_required"]),
            "redirectUris": uris,
            "registrationAccessToken": v["registration_token"],
            "attributes": {},
        }

    def update(self, key: str, rep: dict[str, Any]) -> None:
        c = self.kc.t["client"]
        with self.kc.engine.begin() as conn:
            conn.execute(c.update().where(c.c.id == key).values(enabled=bool(rep["enabled"]), name=rep.get("name")))

    def create(self, realm: str, rep: dict[str, Any]) -> tuple[int, Any]:
        c, r = self.kc.t["client"], self.kc.t["redirect_uris"]
        with self.kc.engine.begin() as conn:
            taken = conn.execute(sa.select(c.c.id).where(c.c.realm_id == realm, c.c.client_id == rep["clientId"]))
            if taken.first() is not None:
                return 409, {"errorMessage": f"Client {rep['clientId']} already exists"}
            key = rep.get("id") or secrets.token_hex(16)
            conn.execute(
                c.insert().values(
                    id=key,
                    client_id=rep["clientId"],
                    name=rep.get("name"),
                    realm_id=realm,
                    enabled=rep.get("enabled", True),
                    public_client=rep.get("publicClient", True),
                    protocol=rep.get("protocol"),
                    consent_required=rep.get("consentRequired", False),
                    registration_token=rep.get("registrationAccessToken"),
                )
            )
            for uri in rep.get("redirectUris", []):
                conn.execute(r.insert().values(client_id=key, value=uri))
        return 201, None
