"""A minimal, real OAuth 2.1 authorization server on Authlib + Flask: the *upstream* IdP that FastMCP's
`OAuthProxy` fronts (the proxy answers DCR itself; this server has no DCR at all, exactly like GitHub/Google).

- one pre-registered confidential client (the proxy), client_secret_basic / client_secret_post;
- authorization code + PKCE (S256 only, required on every authorization request);
- the fixed test user is auto-approved: GET /authorize answers 302 straight to the redirect_uri;
- refresh tokens with rotation (old pair revoked on use; replay of a rotated refresh token -> invalid_grant);
  with `refresh_ttl`, token responses carry `refresh_expires_in` (as Keycloak's do), which FastMCP's proxy
  adopts as its own refresh tokens' lifetime;
- RFC 7662 introspection (the proxy's `IntrospectionTokenVerifier` validates upstream access tokens with it);
- RFC 7009 revocation;
- storage is in memory (dicts behind one lock); served by werkzeug on 127.0.0.1 in a background thread.

Run standalone:  python upstream.py --port 0 --redirect-uri http://127.0.0.1:8123/auth/callback
(prints one JSON line {"url": ..., "client_id": ..., "client_secret": ...} once it listens).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin, InvalidRequestError, TokenMixin, grants
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

DEFAULT_CLIENT_ID = "fastmcp-oauth-proxy"
DEFAULT_CLIENT_SECRET = "upstream-secret-for-the-proxy-0123456789abcdef"
DEFAULT_SCOPES = ("openid", "profile", "read")
TEST_USER = "test-user-42"
CODE_LIFETIME = 300
AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


@dataclass
class UpstreamClient(ClientMixin):
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        return " ".join(s for s in scope.split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Token(TokenMixin):
    client_id: str
    user: str
    access_token: str
    refresh_token: str | None
    scope: str
    expires_in: int
    issued_at: float
    revoked: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check_client(self, client: UpstreamClient) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> str:
        return self.user

    def get_client(self) -> UpstreamClient:  # pragma: no cover - not used by the endpoints here
        raise NotImplementedError


class Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[str, UpstreamClient] = {}
        self.codes: dict[str, Code] = {}
        self.by_access: dict[str, Token] = {}
        self.by_refresh: dict[str, Token] = {}
        self.counters = {"authorize": 0, "code_exchange": 0, "refresh": 0, "introspect": 0, "revoke": 0}


def create_app(store: Store, *, access_ttl: int, refresh_ttl: int | None = None) -> Flask:
    app = Flask("dcr-reaper-fastmcp-upstream")
    app.config.update(
        OAUTH2_REFRESH_TOKEN_GENERATOR=True,
        OAUTH2_TOKEN_EXPIRES_IN={"authorization_code": access_ttl, "refresh_token": access_ttl},
    )

    def query_client(client_id: str) -> UpstreamClient | None:
        return store.clients.get(client_id)

    def save_token(token: dict[str, Any], req: Any) -> None:
        item = Token(
            client_id=req.client.client_id,
            user=req.user if isinstance(req.user, str) else TEST_USER,
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            scope=token.get("scope", ""),
            expires_in=int(token.get("expires_in", access_ttl)),
            issued_at=time.time(),
        )
        with store.lock:
            store.by_access[item.access_token] = item
            if item.refresh_token:
                store.by_refresh[item.refresh_token] = item

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    if refresh_ttl:
        plain_generate_token = server.generate_token

        def generate_token(*args: Any, **kwargs: Any) -> dict[str, Any]:
            token = dict(plain_generate_token(*args, **kwargs))
            if token.get("refresh_token"):
                token["refresh_expires_in"] = refresh_ttl
            return token

        server.generate_token = generate_token  # type: ignore[method-assign]

    class S256Only(CodeChallenge):
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
        TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

        def save_authorization_code(self, code: str, req: Any) -> Code:
            item = Code(
                code=code,
                client_id=req.client.client_id,
                redirect_uri=req.payload.redirect_uri,
                scope=req.payload.scope or "",
                user=TEST_USER,
                code_challenge=req.payload.data.get("code_challenge"),
                code_challenge_method=req.payload.data.get("code_challenge_method"),
                auth_time=time.time(),
            )
            with store.lock:
                store.codes[code] = item
                store.counters["authorize"] += 1
            return item

        def query_authorization_code(self, code: str, client: UpstreamClient) -> Code | None:
            item = store.codes.get(code)
            if item and item.client_id == client.client_id and item.auth_time + CODE_LIFETIME >= time.time():
                return item
            return None

        def delete_authorization_code(self, item: Code) -> None:
            with store.lock:
                store.codes.pop(item.code, None)
                store.counters["code_exchange"] += 1

        def authenticate_user(self, item: Code) -> str:
            return item.user

    class RefreshTokenGrant(grants.RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
        INCLUDE_NEW_REFRESH_TOKEN = True  # rotation

        def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
            item = store.by_refresh.get(refresh_token)
            if item is None or item.revoked:
                return None  # -> invalid_grant
            return item

        def authenticate_user(self, item: Token) -> str:
            return item.user

        def revoke_old_credential(self, item: Token) -> None:
            with store.lock:
                item.revoked = True
                store.counters["refresh"] += 1

    def _query_token(token_string: str, hint: str | None) -> Token | None:
        if hint == "refresh_token":
            return store.by_refresh.get(token_string) or store.by_access.get(token_string)
        return store.by_access.get(token_string) or store.by_refresh.get(token_string)

    class Introspection(IntrospectionEndpoint):
        CLIENT_AUTH_METHODS = AUTH_METHODS

        def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
            store.counters["introspect"] += 1
            return _query_token(token_string, token_type_hint)

        def check_permission(self, token: Token, client: UpstreamClient, req: Any) -> bool:
            return True  # the proxy is the only client

        def introspect_token(self, token: Token) -> dict[str, Any]:
            return {
                "active": True,
                "client_id": token.client_id,
                "token_type": "Bearer",
                "username": token.user,
                "sub": token.user,
                "scope": token.scope,
                "iat": int(token.issued_at),
                "exp": int(token.issued_at + token.expires_in),
            }

    class Revocation(RevocationEndpoint):
        CLIENT_AUTH_METHODS = AUTH_METHODS

        def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
            return _query_token(token_string, token_type_hint)

        def revoke_token(self, token: Token, req: Any) -> None:
            with store.lock:
                token.revoked = True
                store.counters["revoke"] += 1

    server.register_grant(AuthorizationCodeGrant, [S256Only(required=True)])
    server.register_grant(RefreshTokenGrant)
    server.register_endpoint(Introspection)
    server.register_endpoint(Revocation)

    @app.get("/.well-known/oauth-authorization-server")
    def _metadata() -> Any:
        base = request.host_url.rstrip("/")
        return jsonify(
            {
                "issuer": base,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "introspection_endpoint": f"{base}/introspect",
                "revocation_endpoint": f"{base}/revoke",
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "response_types_supported": ["code"],
                "token_endpoint_auth_methods_supported": AUTH_METHODS,
                "code_challenge_methods_supported": ["S256"],
                "scopes_supported": list(DEFAULT_SCOPES),
            }
        )

    @app.get("/authorize")
    def _authorize() -> Any:
        try:
            grant = server.get_consent_grant(end_user=TEST_USER)  # validates client, redirect URI, PKCE
        except OAuth2Error as error:
            return server.handle_error_response(None, error)
        return server.create_authorization_response(grant_user=TEST_USER, grant=grant)  # auto-approved

    @app.post("/token")
    def _token() -> Any:
        return server.create_token_response()

    @app.post("/introspect")
    def _introspect() -> Any:
        return server.create_endpoint_response("introspection")

    @app.post("/revoke")
    def _revoke() -> Any:
        return server.create_endpoint_response("revocation")

    @app.get("/_stats")
    def _stats() -> Any:
        with store.lock:
            return jsonify(
                {
                    **store.counters,
                    "live_access_tokens": sum(1 for t in store.by_access.values() if not t.revoked),
                    "codes_pending": len(store.codes),
                }
            )

    return app


class RunningUpstream:
    """The app on 127.0.0.1 in a background thread; `close()` stops it."""

    def __init__(
        self,
        *,
        redirect_uris: list[str],
        port: int = 0,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        access_ttl: int = 3600,
        refresh_ttl: int | None = None,
    ) -> None:
        self.store = Store()
        self.client_id = client_id
        self.client_secret = client_secret
        self.store.clients[client_id] = UpstreamClient(client_id, client_secret, list(redirect_uris))
        self.app = create_app(self.store, access_ttl=access_ttl, refresh_ttl=refresh_ttl)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.httpd = make_server("127.0.0.1", port, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fastmcp-upstream", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> RunningUpstream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--redirect-uri", action="append", required=True, help="the proxy's /auth/callback URL")
    p.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    p.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    p.add_argument("--access-ttl", type=int, default=3600, help="upstream access-token lifetime, seconds")
    args = p.parse_args(argv)
    up = RunningUpstream(
        redirect_uris=args.redirect_uri,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        access_ttl=args.access_ttl,
    )
    print(json.dumps({"url": up.url, "client_id": up.client_id, "client_secret": up.client_secret}), flush=True)
    try:
        up.thread.join()
    except KeyboardInterrupt:
        up.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
