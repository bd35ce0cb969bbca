"""A real OAuth 2.1 authorization server for the proving ground, built on the real `authlib` package.

- RFC 7591 dynamic registration (authlib.oauth2.rfc7591.ClientRegistrationEndpoint), open, as MCP servers
  run it;
- authorization code with PKCE (S256 only, required), consent auto-approved for one test user;
- refresh tokens with rotation: the old token is revoked, a new one issued; replaying a revoked refresh token
  revokes the whole grant chain and answers invalid_grant (RFC 9700 §4.14.2), like real servers;
- RFC 7009 revocation endpoint;
- storage: authlib.integrations.sqla_oauth2 mixins on SQLAlchemy, tables oauth2_client / oauth2_token /
  oauth2_code, on PostgreSQL or SQLite; a Flask app served by werkzeug on 127.0.0.1 in a background thread.

Time is simulated: every time the server stores or checks (client_id_issued_at, auth_time, issued_at, revoked
times, code and token expiry) comes from a `SimClock`, so a test can replay two days of sessions in a second
and leave rows that look exactly like two days of real use.

Unknown clients get `invalid_client` with HTTP 401 at the token endpoint (a registered "none" authentication
that answers 401, as RFC 6749 §5.2 allows; stock Authlib answers 400 for public clients).
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.sqla_oauth2 import (
    OAuth2AuthorizationCodeMixin,
    OAuth2ClientMixin,
    OAuth2TokenMixin,
)
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import InvalidClientError, InvalidRequestError, grants
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, g, jsonify, request
from sqlalchemy import Column, Integer, String
from sqlalchemy.orm import DeclarativeBase, Session
from werkzeug.serving import make_server

ACCESS_LIFETIME = 3600
CODE_LIFETIME = 300
TEST_USER_ID = 42
REGISTRANT_IP_FIELD = "registrant_ip"  # where this server records who registered (a custom profile can read it)
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]


class SimClock:
    """Simulated seconds since the epoch; only ever moves forward."""

    def __init__(self, start: float):
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> float:
        assert seconds >= 0
        with self._lock:
            self._t += seconds
            return self._t


class Base(DeclarativeBase):
    pass


class Client(Base, OAuth2ClientMixin):
    __tablename__ = "oauth2_client"
    id = Column(Integer, primary_key=True)


class Token(Base, OAuth2TokenMixin):
    __tablename__ = "oauth2_token"
    id = Column(Integer, primary_key=True)
    user_id = Column(Integer)
    grant_chain = Column(String(36), index=True)  # every token descended from one authorization code


class AuthorizationCode(Base, OAuth2AuthorizationCodeMixin):
    __tablename__ = "oauth2_code"
    id = Column(Integer, primary_key=True)
    user_id = Column(Integer)


def create_schema(engine: sa.Engine) -> None:
    """The three tables as the Authlib mixins declare them (plus this app's user_id and grant_chain)."""
    Base.metadata.create_all(engine)


@dataclass
class User:
    id: int = TEST_USER_ID

    def get_user_id(self) -> int:
        return self.id


USER = User()


def _db() -> Session:
    return g.db


def _client_ip() -> str:
    # Behind a reverse proxy the registrant's address comes in X-Forwarded-For (first hop).
    forwarded = request.headers.get("X-Forwarded-For", "")
    return forwarded.split(",")[0].strip() or (request.remote_addr or "")


def create_app(engine: sa.Engine, clock: SimClock) -> Flask:
    """The Flask app: /.well-known/oauth-authorization-server, /register, /authorize, /token, /revoke."""
    app = Flask("proving-ground")
    app.config.update(
        OAUTH2_REFRESH_TOKEN_GENERATOR=True,
        OAUTH2_TOKEN_EXPIRES_IN={"authorization_code": ACCESS_LIFETIME, "refresh_token": ACCESS_LIFETIME},
    )

    def now() -> int:
        return int(clock.now())

    def query_client(client_id: str) -> Client | None:
        return _db().execute(sa.select(Client).where(Client.client_id == client_id)).scalars().first()

    def save_token(token: dict[str, Any], req: Any) -> None:
        parent = getattr(req, "refresh_token", None)
        chain = parent.grant_chain if parent is not None and parent.grant_chain else str(uuid.uuid4())
        item = Token(
            client_id=req.client.client_id,
            user_id=req.user.get_user_id() if req.user else None,
            issued_at=now(),
            grant_chain=chain,
            access_token_revoked_at=0,
            refresh_token_revoked_at=0,
            **{
                k: v
                for k, v in token.items()
                if k in ("token_type", "access_token", "refresh_token", "scope", "expires_in")
            },
        )
        _db().add(item)
        _db().commit()

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)

    def authenticate_none_401(query: Any, req: Any) -> Client | None:
        # Authlib's own "none" method, except that an unknown client_id is a 401 (RFC 6749 §5.2 allows it).
        client_id = req.payload.client_id
        if client_id and not req.payload.data.get("client_secret"):
            client = query(client_id)
            if client is None:
                raise InvalidClientError(status_code=401, description="The client does not exist on this server.")
            return client
        return None

    server.register_client_auth_method("none", authenticate_none_401)

    class S256Only(CodeChallenge):
        """PKCE as OAuth 2.1 and MCP require it: a challenge on every authorization request, S256 only
        (Authlib alone enforces `required` only at the token endpoint)."""

        SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
        DEFAULT_CODE_CHALLENGE_METHOD = "S256"

        def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
            data = grant.request.payload.data
            if not data.get("code_challenge"):
                raise InvalidRequestError("Missing 'code_challenge': PKCE is required", redirect_uri=redirect_uri)
            if data.get("code_challenge_method") != "S256":
                raise InvalidRequestError("'code_challenge_method' must be S256", redirect_uri=redirect_uri)
            super().validate_code_challenge(grant, redirect_uri)

    class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

        def save_authorization_code(self, code: str, req: Any) -> AuthorizationCode:
            item = AuthorizationCode(
                code=code,
                client_id=req.client.client_id,
                redirect_uri=req.payload.redirect_uri,
                scope=req.payload.scope,
                user_id=req.user.get_user_id(),
                auth_time=now(),
                code_challenge=req.payload.data.get("code_challenge"),
                code_challenge_method=req.payload.data.get("code_challenge_method"),
            )
            _db().add(item)
            _db().commit()
            return item

        def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
            item = (
                _db()
                .execute(
                    sa.select(AuthorizationCode).where(
                        AuthorizationCode.code == code, AuthorizationCode.client_id == client.client_id
                    )
                )
                .scalars()
                .first()
            )
            if item is not None and item.auth_time + CODE_LIFETIME >= now():
                return item
            return None

        def delete_authorization_code(self, item: AuthorizationCode) -> None:
            _db().delete(item)
            _db().commit()

        def authenticate_user(self, item: AuthorizationCode) -> User:
            return USER

    class RefreshTokenGrant(grants.RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
        INCLUDE_NEW_REFRESH_TOKEN = True  # rotation

        def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
            item = _db().execute(sa.select(Token).where(Token.refresh_token == refresh_token)).scalars().first()
            if item is None:
                return None
            if item.refresh_token_revoked_at or item.access_token_revoked_at:
                # Replay of a rotated (or revoked) refresh token: someone holds a copy. Revoke the chain.
                at = now()
                _db().execute(
                    sa.update(Token)
                    .where(Token.grant_chain == item.grant_chain, Token.refresh_token_revoked_at == 0)
                    .values(refresh_token_revoked_at=at)
                )
                _db().execute(
                    sa.update(Token)
                    .where(Token.grant_chain == item.grant_chain, Token.access_token_revoked_at == 0)
                    .values(access_token_revoked_at=at)
                )
                _db().commit()
                return None  # -> invalid_grant
            return item

        def authenticate_user(self, item: Token) -> User:
            return USER

        def revoke_old_credential(self, item: Token) -> None:
            at = now()
            item.access_token_revoked_at = at
            item.refresh_token_revoked_at = at
            _db().add(item)
            _db().commit()

    class Revocation(RevocationEndpoint):
        CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

        def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
            col = Token.access_token if token_type_hint == "access_token" else Token.refresh_token
            item = _db().execute(sa.select(Token).where(col == token_string)).scalars().first()
            if item is None and token_type_hint is None:
                item = _db().execute(sa.select(Token).where(Token.access_token == token_string)).scalars().first()
            return item

        def revoke_token(self, item: Token, req: Any) -> None:
            at = now()
            item.access_token_revoked_at = at
            if req.form.get("token_type_hint") != "access_token":
                item.refresh_token_revoked_at = at
            _db().add(item)
            _db().commit()

    metadata: dict[str, Any] = {
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "token_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
        "code_challenge_methods_supported": ["S256"],
    }

    class Registration(ClientRegistrationEndpoint):
        def authenticate_token(self, req: Any) -> bool:
            return True  # open registration, as MCP servers run it

        def resolve_public_key(self, req: Any) -> None:
            return None

        def get_server_metadata(self) -> dict[str, Any]:
            return metadata

        def generate_client_id(self, req: Any) -> str:
            return secrets.token_urlsafe(24)

        def generate_client_info(self, req: Any) -> dict[str, Any]:
            info = super().generate_client_info(req)
            info["client_id_issued_at"] = now()
            return info

        def save_client(self, client_info: dict[str, Any], client_metadata: dict[str, Any], req: Any) -> Client:
            client = Client(**client_info)
            client.set_client_metadata({**client_metadata, REGISTRANT_IP_FIELD: _client_ip()})
            _db().add(client)
            _db().commit()
            return client

    server.register_grant(AuthorizationCodeGrant, [S256Only(required=True)])
    server.register_grant(RefreshTokenGrant)
    server.register_endpoint(Revocation)
    server.register_endpoint(Registration)

    @app.before_request
    def _open_session() -> None:
        g.db = Session(engine)

    @app.teardown_request
    def _close_session(_exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.get("/.well-known/oauth-authorization-server")
    def _metadata() -> Any:
        base = request.host_url.rstrip("/")
        return jsonify(
            {
                "issuer": base,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "registration_endpoint": f"{base}/register",
                "revocation_endpoint": f"{base}/revoke",
                **metadata,
            }
        )

    @app.post("/register")
    def _register() -> Any:
        return server.create_endpoint_response("client_registration")

    @app.get("/authorize")
    def _authorize() -> Any:
        try:
            grant = server.get_consent_grant(end_user=USER)  # validates client, redirect URI, PKCE challenge
        except OAuth2Error as error:
            return server.handle_error_response(None, error)
        return server.create_authorization_response(grant_user=USER, grant=grant)  # consent auto-approved

    @app.post("/token")
    def _token() -> Any:
        return server.create_token_response()

    @app.post("/revoke")
    def _revoke() -> Any:
        return server.create_endpoint_response("revocation")

    return app


class RunningServer:
    """The app on 127.0.0.1, an ephemeral port, in a background thread; `close()` stops it."""

    def __init__(self, engine: sa.Engine, clock: SimClock):
        self.engine = engine
        self.clock = clock
        self.app = create_app(engine, clock)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.httpd = make_server("127.0.0.1", 0, self.app, threaded=False)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="proving-ground-server",
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the proving-ground server did not stop"

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
