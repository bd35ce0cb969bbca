"""Drive a real Better Auth server (1.7 oauth-provider, 1.6 mcp, 1.3 mcp) over HTTP, the way MCP clients do.

Standard library + requests only. Typical use in a test:

    from kit.better_auth.driver import BetterAuthServer   # or put this directory on sys.path

    with BetterAuthServer("1.7", database_url) as ba:      # runs Better Auth's own migrations first
        alice = ba.sign_up("alice@example.com")
        client = ba.register("Claude Code (memory)")        # anonymous RFC 7591 registration
        tokens = ba.login(alice, client)                    # authorize (PKCE S256) + consent + code exchange
        tokens = ba.refresh(client, tokens)                 # rotation on 1.7, a new row on 1.3/1.6
        ba.revoke(client, tokens.refresh_token)             # 1.7 only

`database_url` may be a SQLAlchemy URL (postgresql+psycopg://...): the driver hands node-postgres the
plain postgres:// form. The database must exist; the server creates Better Auth's tables in it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import secrets
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import sqlalchemy as sa

KIT = Path(__file__).resolve().parent
# version -> (directory, flavour). "oauth-provider": @better-auth/oauth-provider (oauthClient tables);
# "mcp": the built-in mcp plugin on the legacy oidcProvider tables (oauthApplication).
VERSIONS: dict[str, tuple[str, str]] = {"1.7": ("v17", "oauth-provider"), "1.6": ("v16", "mcp"), "1.3": ("v13", "mcp")}
DEFAULT_SCOPE = "openid profile email offline_access"
DEFAULT_PASSWORD = "correct horse battery staple"


class BetterAuthError(RuntimeError):
    """An HTTP exchange with the server did not go as the flow needs; the message carries the response."""


def _version(version: str) -> str:
    v = version.strip().lstrip("v")
    aliases = {"17": "1.7", "16": "1.6", "13": "1.3", "1.3.34": "1.3"}
    v = aliases.get(v, v)
    if v not in VERSIONS:
        for known in VERSIONS:
            if v.startswith(known + "."):
                return known
        raise ValueError(f"unknown Better Auth version {version!r}; known: {', '.join(VERSIONS)}")
    return v


def node_database_url(url: str) -> str:
    """postgresql+psycopg://u@h/db -> postgres://u@h/db (node-postgres wants no driver suffix)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"Better Auth kit runs on PostgreSQL only, got {scheme!r}")
    return "postgres://" + rest


def ensure_installed(version: str, timeout: float = 300) -> Path:
    """`npm ci` in the version's directory when its node_modules is missing; returns the directory."""
    directory = KIT / VERSIONS[_version(version)][0]
    if not (directory / "node_modules" / "better-auth" / "package.json").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            check=True,
            timeout=timeout,
        )
    return directory


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def loopback_redirect(port: int | None = None) -> str:
    """An MCP client's loopback callback: http://localhost:<random port>/callback."""
    return f"http://localhost:{port or random.randint(20000, 65000)}/callback"


@dataclass
class User:
    email: str
    password: str
    name: str
    user_id: str
    http: requests.Session  # carries the Better Auth session cookie


@dataclass
class Client:
    client_id: str
    client_name: str
    redirect_uris: list[str]
    client_secret: str | None
    registration: dict[str, Any]  # the registration response, verbatim

    @property
    def redirect_uri(self) -> str:
        return self.redirect_uris[0]


@dataclass
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_in: int | None
    scope: str | None
    id_token: str | None
    response: dict[str, Any] = field(repr=False)

    @property
    def access_is_jwt(self) -> bool:
        return self.access_token.count(".") == 2


class BetterAuthServer:
    """One Better Auth server process for one version on one database (bound to 127.0.0.1)."""

    def __init__(
        self,
        version: str,
        database_url: str,
        *,
        port: int = 0,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        install: bool = False,
    ) -> None:
        self.version = _version(version)
        self.directory = KIT / VERSIONS[self.version][0]
        self.flavour = VERSIONS[self.version][1]
        self.database_url = node_database_url(database_url)
        self.port = port
        self.timeout = timeout
        self.env = env or {}
        self.install = install
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.returncode: int | None = None
        self.consent_asked = False  # whether the last authorize() went through a consent step
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        self._sessions: list[requests.Session] = []

    # ---- process -------------------------------------------------------------------------------------------
    def start(self) -> BetterAuthServer:
        if self.install:
            ensure_installed(self.version)
        if not (self.directory / "node_modules").is_dir():
            raise BetterAuthError(f"{self.directory}/node_modules is missing: run `npm ci` there first")
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "PORT": str(self.port),
            "BETTER_AUTH_TELEMETRY": "0",
            "NODE_ENV": "test",
            **self.env,
        }
        self.proc = subprocess.Popen(
            ["node", "server.mjs"],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        self._threads = [threading.Thread(target=self._drain_stderr, daemon=True), reader]
        for thread in self._threads:
            thread.start()
        reader.join(self.timeout)
        line = ready[0] if ready else ""
        if not line.startswith("READY "):
            exited = self.proc.poll()
            self.stop()
            why = f"exited with code {exited}" if exited is not None else f"printed no READY within {self.timeout}s"
            raise BetterAuthError(f"Better Auth {self.version} server {why} (stdout {line!r}); stderr:\n{self.stderr}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        return self

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers. Returns the exit code."""
        for http in self._sessions:
            http.close()
        self._sessions.clear()
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for thread in self._threads:  # both end at EOF, now that the process is gone
            thread.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        self.returncode = proc.returncode
        return proc.returncode

    def __enter__(self) -> BetterAuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- endpoints -----------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.base_url}/api/auth{path}"

    @property
    def endpoints(self) -> dict[str, str | None]:
        """The real route paths of this version's plugin (read from its source under node_modules)."""
        if self.flavour == "oauth-provider":
            return {
                "register": "/oauth2/register",
                "authorize": "/oauth2/authorize",
                "token": "/oauth2/token",
                "consent": "/oauth2/consent",
                "revoke": "/oauth2/revoke",
            }
        return {
            "register": "/mcp/register",
            "authorize": "/mcp/authorize",
            "token": "/mcp/token",
            # 1.6's mcp plugin mounts the oidcProvider's /oauth2/consent; 1.3's mounts none.
            "consent": "/oauth2/consent" if self.version == "1.6" else None,
            "revoke": None,  # neither mcp plugin has a revocation endpoint
        }

    @property
    def mcp_resource(self) -> str:
        """The RFC 8707 resource the 1.7 server is configured with (a request naming it gets a JWT)."""
        return f"{self.base_url}/mcp"

    def _headers(self) -> dict[str, str]:
        # Better Auth checks Origin on cookie-carrying POSTs; the server's own origin is trusted. One
        # connection per request: no keep-alive connection for the server to close under a slow test.
        return {"Origin": self.base_url, "Connection": "close"}

    def _session(self) -> requests.Session:
        http = requests.Session()
        http.headers.update(self._headers())
        self._sessions.append(http)
        return http

    @staticmethod
    def _json(resp: requests.Response, what: str, ok: tuple[int, ...] = (200, 201)) -> dict[str, Any]:
        if resp.status_code not in ok:
            raise BetterAuthError(f"{what}: HTTP {resp.status_code} {resp.text[:800]}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise BetterAuthError(f"{what}: not JSON: {resp.text[:800]}") from exc
        if not isinstance(body, dict):
            raise BetterAuthError(f"{what}: unexpected body {body!r}")
        return body

    # ---- users ---------------------------------------------------------------------------------------------
    def sign_up(self, email: str, password: str = DEFAULT_PASSWORD, name: str | None = None) -> User:
        """POST /sign-up/email (email+password); the returned user's session carries the cookie."""
        http = self._session()
        name = name or email.split("@")[0]
        body = self._json(
            http.post(
                self.url("/sign-up/email"), json={"email": email, "password": password, "name": name}, timeout=10
            ),
            "sign-up",
        )
        self._need_cookie(http, "sign-up")
        return User(email, password, name, body["user"]["id"], http)

    def sign_in(self, email: str, password: str = DEFAULT_PASSWORD) -> User:
        """POST /sign-in/email: a new session (and cookie) for an existing user."""
        http = self._session()
        body = self._json(
            http.post(self.url("/sign-in/email"), json={"email": email, "password": password}, timeout=10), "sign-in"
        )
        self._need_cookie(http, "sign-in")
        return User(email, password, body["user"].get("name", ""), body["user"]["id"], http)

    @staticmethod
    def _need_cookie(http: requests.Session, what: str) -> None:
        if not any("session_token" in c.name for c in http.cookies):
            raise BetterAuthError(f"{what}: no session cookie set (cookies: {[c.name for c in http.cookies]})")

    # ---- dynamic client registration ----------------------------------------------------------------------
    def register(
        self,
        client_name: str = "Claude Code (memory)",
        redirect_uris: list[str] | None = None,
        *,
        as_user: User | None = None,
        scope: str | None = None,
        software_id: str | None = None,
        software_version: str | None = None,
        application_type: str | None = "auto",
        extra: dict[str, Any] | None = None,
    ) -> Client:
        """RFC 7591 registration the way an MCP client does it: a public client (token_endpoint_auth_method
        none), grant types authorization_code + refresh_token, a loopback redirect on a random port.
        Anonymous unless `as_user` is given (then the session cookie goes along, and 1.7/1.6/1.3 record
        that user's id in userId).

        application_type: 1.7's oauth-provider defaults it to "web", and a web client may not have an http
        (or any loopback) redirect URI (400 invalid_redirect_uri). "auto" sends "native" to 1.7 when every
        redirect URI is http on localhost/127.0.0.1/[::1] (RFC 8252 loopback), and nothing otherwise;
        None never sends it. The mcp plugins of 1.3/1.6 ignore the field."""
        body: dict[str, Any] = {
            "client_name": client_name,
            "redirect_uris": redirect_uris or [loopback_redirect()],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        }
        if application_type == "auto":
            loopback = all(
                urlsplit(u).scheme == "http" and urlsplit(u).hostname in ("localhost", "127.0.0.1", "::1")
                for u in body["redirect_uris"]
            )
            application_type = "native" if self.flavour == "oauth-provider" and loopback else None
        if application_type is not None:
            body["application_type"] = application_type
        if scope is not None:
            body["scope"] = scope
        if software_id is not None:
            body["software_id"] = software_id
        if software_version is not None:
            body["software_version"] = software_version
        body.update(extra or {})
        post = as_user.http.post if as_user else requests.post
        resp = post(self.url(self.endpoints["register"] or ""), json=body, headers=self._headers(), timeout=10)
        reg = self._json(resp, "register", ok=(200, 201))
        return Client(
            client_id=reg["client_id"],
            client_name=client_name,
            redirect_uris=list(reg.get("redirect_uris") or body["redirect_uris"]),
            client_secret=reg.get("client_secret"),
            registration=reg,
        )

    # ---- authorization code + PKCE -------------------------------------------------------------------------
    def authorize(
        self,
        user: User,
        client: Client,
        *,
        scope: str = DEFAULT_SCOPE,
        resource: str | None = None,
        prompt: str | None = None,
        code_verifier: str | None = None,
    ) -> tuple[str, str]:
        """Runs /authorize with the user's session cookie, answers the consent step where this version has
        one, and returns (code, code_verifier).

        1.7 always asks a new client for consent (the redirect goes to the consent page with a signed query,
        answered by POST /oauth2/consent, which writes an oauthConsent row); a later authorize for the same
        user, client and scopes skips it. The mcp plugins of 1.6 and 1.3 issue the code straight away;
        prompt="consent" makes 1.6 go through /oauth2/consent (and write oauthConsent) too."""
        verifier, challenge = pkce_pair()
        if code_verifier:
            verifier = code_verifier
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(12)
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if resource:
            params["resource"] = resource
        if prompt:
            params["prompt"] = prompt
        resp = user.http.get(
            self.url(self.endpoints["authorize"] or ""), params=params, allow_redirects=False, timeout=10
        )
        location = self._location(resp, "authorize")
        self.consent_asked = not location.startswith(client.redirect_uri)
        if self.consent_asked:
            location = self._consent(user, location)
        query = parse_qs(urlsplit(location).query)
        if "error" in query:
            raise BetterAuthError(f"authorize: redirected with an error: {location}")
        if query.get("state", [state])[0] != state:
            raise BetterAuthError(f"authorize: state mismatch in {location}")
        if "code" not in query:
            raise BetterAuthError(f"authorize: no code in {location}")
        return query["code"][0], verifier

    @staticmethod
    def _location(resp: requests.Response, what: str) -> str:
        if resp.status_code in (301, 302, 303, 307, 308):
            return resp.headers["Location"]
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("application/json"):
            body = resp.json()
            if isinstance(body, dict):
                for key in ("url", "redirect_uri", "redirectURI"):
                    if isinstance(body.get(key), str):
                        return str(body[key])
        raise BetterAuthError(f"{what}: expected a redirect, got HTTP {resp.status_code} {resp.text[:800]}")

    def _consent(self, user: User, location: str) -> str:
        split = urlsplit(location)
        if not split.path.endswith("/consent"):
            raise BetterAuthError(f"authorize: redirected neither to the client nor to consent: {location}")
        consent = self.endpoints["consent"]
        if consent is None:
            raise BetterAuthError(f"Better Auth {self.version} asked for consent but has no consent endpoint")
        if self.flavour == "oauth-provider":
            body: dict[str, Any] = {"accept": True, "oauth_query": split.query}
        else:
            body = {"accept": True, "consent_code": parse_qs(split.query)["consent_code"][0]}
        resp = user.http.post(self.url(consent), json=body, headers=self._headers(), timeout=10, allow_redirects=False)
        return self._location(resp, "consent")

    # ---- token endpoint ------------------------------------------------------------------------------------
    def _token(self, client: Client, form: dict[str, str], what: str) -> Tokens:
        form = {**form, "client_id": client.client_id}
        if client.client_secret:
            form["client_secret"] = client.client_secret
        resp = requests.post(
            self.url(self.endpoints["token"] or ""),
            data=form,
            headers={"Accept": "application/json", "Connection": "close"},
            timeout=10,
        )
        body = self._json(resp, what)
        return Tokens(
            access_token=body["access_token"],
            refresh_token=body.get("refresh_token"),
            expires_in=body.get("expires_in"),
            scope=body.get("scope"),
            id_token=body.get("id_token"),
            response=body,
        )

    def exchange(self, client: Client, code: str, code_verifier: str, *, resource: str | None = None) -> Tokens:
        """grant_type=authorization_code with the PKCE verifier (public client: client_id, no secret)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": client.redirect_uri,
            "code_verifier": code_verifier,
        }
        if resource:
            form["resource"] = resource
        return self._token(client, form, "token (authorization_code)")

    def refresh(self, client: Client, tokens: Tokens | str, *, resource: str | None = None) -> Tokens:
        """grant_type=refresh_token. On 1.7 the old oauthRefreshToken row is rotated away (revoked = rotatedAt
        = now, whole seconds); on 1.6/1.3 a new oauthAccessToken row is added and the old one is untouched."""
        refresh_token = tokens if isinstance(tokens, str) else tokens.refresh_token
        if not refresh_token:
            raise BetterAuthError("refresh: no refresh token (was offline_access requested?)")
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if resource:
            form["resource"] = resource
        return self._token(client, form, "token (refresh_token)")

    def revoke(self, client: Client, token: str, token_type_hint: str = "refresh_token") -> None:
        """RFC 7009 revocation (1.7 only: the mcp plugins of 1.6 and 1.3 have no revocation endpoint)."""
        path = self.endpoints["revoke"]
        if path is None:
            raise NotImplementedError(f"Better Auth {self.version}'s mcp plugin has no revocation endpoint")
        form = {"token": token, "token_type_hint": token_type_hint, "client_id": client.client_id}
        if client.client_secret:
            form["client_secret"] = client.client_secret
        resp = requests.post(
            self.url(path), data=form, headers={"Accept": "application/json", "Connection": "close"}, timeout=10
        )
        if resp.status_code != 200:
            raise BetterAuthError(f"revoke: HTTP {resp.status_code} {resp.text[:800]}")

    def login(
        self,
        user: User,
        client: Client,
        *,
        scope: str = DEFAULT_SCOPE,
        resource: str | None = None,
        prompt: str | None = None,
    ) -> Tokens:
        """The whole authorization-code flow: authorize (+ consent) then exchange."""
        code, verifier = self.authorize(user, client, scope=scope, resource=resource, prompt=prompt)
        return self.exchange(client, code, verifier, resource=resource)

    def metadata(self) -> dict[str, Any]:
        """The authorization server metadata document (RFC 8414) as this version serves it."""
        resp = requests.get(self.url("/.well-known/oauth-authorization-server"), headers=self._headers(), timeout=10)
        return self._json(resp, "metadata")


def age_client(engine: sa.Engine, client_id: str, seconds: float) -> None:
    """Move every time of one client's rows back (the server wrote them now; the scenario happened earlier):
    every timestamptz column of every table with a clientId column (PostgreSQL)."""
    with engine.begin() as conn:
        columns = conn.execute(
            sa.text(
                "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                "WHERE c.table_schema = 'public' AND c.data_type = 'timestamp with time zone' "
                "AND c.table_name IN (SELECT table_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND column_name = 'clientId')"
            )
        ).all()
        tables: dict[str, list[str]] = {}
        for table, column in columns:
            tables.setdefault(table, []).append(column)
        for table, cols in tables.items():
            sets = ", ".join(f'"{c}" = "{c}" - make_interval(secs => :s)' for c in cols)
            conn.execute(
                sa.text(f'UPDATE "{table}" SET {sets} WHERE "clientId" = :cid'), {"s": seconds, "cid": client_id}
            )
