"""A stand-in for Keycloak's HTTP API, following its documented contract, backed by the test's Keycloak tables
(it is "Keycloak": it alone writes them, as the real server would). No Keycloak runs in these tests.

- POST /realms/{realm}/protocol/openid-connect/token  (client_credentials) -> {"access_token", "expires_in"}
- GET|PUT|DELETE /admin/realms/{realm}/clients/{id}, POST /admin/realms/{realm}/clients  (Bearer token)
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from server_schemas import Keycloak


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
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
