"""Django OAuth Toolkit: the REAL server, in a subprocess: its own migrations make the schema, and its own views
(DCR, authorize, token) make the rows. Django can be configured once per process, and each test has a fresh
database, so every call runs in a new interpreter: `build(url, plan)` runs

    python -m kit.schemas.dot DATABASE_URL < plan.json  ->  {label: {"id": ..., "client_id": ...}, ...}

The plan is a list of clients: {label, source: dcr|manual|cimd, name, redirect, age (seconds), flow}. Flows:
`none` (registered, never used), `live` (code exchanged: live access and refresh token), `reused` (refreshed
once, then the old refresh token replayed: DOT revokes the whole family), `refreshed` (refreshed once, the new
access token expired since, the new refresh token unused), `refresh_only` (code exchanged, the
access token expired, the refresh token unused), `pending_code` (authorized, code not exchanged yet),
`device_pending` (a device authorization waiting for the user), `device_expired` (one that expired unused).
With `at` (seconds ago) a client's whole story runs on Django's clock held at that time and later ones, so DOT
stamps every row itself: `kept` (code exchanged, then refreshed `refresh_after` seconds after registering, each
time with the token it was given last) and `lost` (the same, then the client lost the newest refresh token and
replays the one before it `replay_after` seconds after registering: reuse protection revokes the family).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy.engine import make_url


def django_database(url: str) -> dict[str, object]:
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": u.database}
    engine = {
        "postgresql": "django.db.backends.postgresql",
        "mysql": "django.db.backends.mysql",
        "mariadb": "django.db.backends.mysql",
    }[backend]
    if engine.endswith("mysql"):
        import pymysql

        pymysql.install_as_MySQLdb()
    return {
        "ENGINE": engine,
        "NAME": u.database,
        "USER": u.username or "",
        "PASSWORD": u.password or "",
        "HOST": u.host or "",
        "PORT": str(u.port or ""),
    }


def setup(url: str) -> None:
    from django.conf import settings

    settings.configure(
        SECRET_KEY="dot-test-not-secret",
        USE_TZ=True,
        DATABASES={"default": django_database(url)},
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "oauth2_provider",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        ROOT_URLCONF=__name__,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        ALLOWED_HOSTS=["testserver"],
        OAUTH2_PROVIDER={
            "DCR_ENABLED": True,
            "DCR_REGISTRATION_PERMISSION_CLASSES": ("oauth2_provider.dcr.AllowAllDCRPermission",),
            "REFRESH_TOKEN_REUSE_PROTECTION": True,
            "ROTATE_REFRESH_TOKEN": True,
            "PKCE_REQUIRED": True,
        },
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _urlpatterns() -> list[object]:
    from django.urls import include, path

    return [path("o/", include("oauth2_provider.urls", namespace="oauth2_provider"))]


class Server:
    """Drives DOT's own endpoints through Django's test client."""

    def __init__(self) -> None:
        from django.contrib.auth import get_user_model
        from django.test import Client

        self.http = Client()
        self.user = get_user_model().objects.create_user("alice", password="pw")
        self.browser = Client()
        self.browser.force_login(self.user)
        self._n = 0

    def register(self, name: str, redirect: str) -> str:
        res = self.http.post(
            "/o/register/",
            data=json.dumps(
                {
                    "client_name": name,
                    "redirect_uris": [redirect],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "token_endpoint_auth_method": "none",
                }
            ),
            content_type="application/json",
        )
        assert res.status_code == 201, res.content
        return str(res.json()["client_id"])

    def authorize(self, client_id: str, redirect: str) -> tuple[str, str]:
        """A user approves the client: the authorization code and the PKCE verifier."""
        self._n += 1
        verifier = f"verifier-{self._n:04d}-" + "x" * 40
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        res = self.browser.post(
            "/o/authorize/",
            {
                "client_id": client_id,
                "redirect_uri": redirect,
                "response_type": "code",
                "scope": "read",
                "state": "s",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "allow": "Authorize",
            },
        )
        assert res.status_code == 302, res.content
        code = parse_qs(urlsplit(res["Location"]).query)["code"][0]
        return code, verifier

    def token(self, client_id: str, **form: str) -> dict[str, object]:
        res = self.http.post("/o/token/", {"client_id": client_id, **form})
        return {"status": res.status_code, **res.json()}

    def exchange(self, client_id: str, redirect: str) -> dict[str, object]:
        code, verifier = self.authorize(client_id, redirect)
        tok = self.token(
            client_id,
            grant_type="authorization_code",
            code=code,
            redirect_uri=redirect,
            code_verifier=verifier,
        )
        assert tok["status"] == 200, tok
        return tok


class Clock:
    """Django's clock (`timezone.now`, what Django and DOT stamp rows with), held at a chosen time or real."""

    def __init__(self) -> None:
        from django.utils import timezone

        self.real = timezone.now
        self.at: datetime | None = None
        timezone.now = self.now

    def now(self) -> datetime:
        return self.at or self.real()


def build(url: str, plan: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run DOT on the database: migrate, then register and authorize as the plan says (in a subprocess)."""
    from kit.cli import REPO, TESTS, clean_env

    res = subprocess.run(
        [sys.executable, "-m", "kit.schemas.dot", url],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)])),
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_rows(plan: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Inside the subprocess: DOT's endpoints register and authorize the plan's clients."""
    from django.utils import timezone
    from oauth2_provider.models import AccessToken, Application, DeviceGrant, RefreshToken

    server = Server()
    clock = Clock()
    now = timezone.now()
    out: dict[str, dict[str, object]] = {}
    for spec in plan:
        label, name, redirect = str(spec["label"]), str(spec["name"]), str(spec["redirect"])
        source, flow = spec.get("source", "dcr"), spec.get("flow", "none")
        start = now - timedelta(seconds=float(spec["at"])) if "at" in spec else None
        clock.at = start
        if source == "dcr":
            client_id = server.register(name, redirect)
        else:
            app = Application.objects.create(
                name=name,
                redirect_uris=redirect,
                client_type="public",
                authorization_grant_type="authorization-code",
                registration_source=source,
                user=server.user,
                **({"client_id": str(spec["client_id"])} if spec.get("client_id") else {}),
            )
            client_id = app.client_id
        app = Application.objects.get(client_id=client_id)
        if flow == "live":
            server.exchange(client_id, redirect)
        elif flow == "reused":
            first = server.exchange(client_id, redirect)
            second = server.token(client_id, grant_type="refresh_token", refresh_token=str(first["refresh_token"]))
            assert second["status"] == 200, second
            replay = server.token(client_id, grant_type="refresh_token", refresh_token=str(first["refresh_token"]))
            assert replay["status"] == 400, replay  # reuse detected: the whole family is revoked
        elif flow in ("kept", "lost"):
            assert start is not None, "kept and lost run on the clock: give `at`"
            clock.at = start + timedelta(seconds=20)
            tokens = [str(server.exchange(client_id, redirect)["refresh_token"])]
            for after in spec["refresh_after"]:
                clock.at = start + timedelta(seconds=float(after))
                res = server.token(client_id, grant_type="refresh_token", refresh_token=tokens[-1])
                assert res["status"] == 200, res
                tokens.append(str(res["refresh_token"]))
            if flow == "lost":  # the newest refresh token never reached the client's store: it replays the last
                clock.at = start + timedelta(seconds=float(spec["replay_after"]))
                res = server.token(client_id, grant_type="refresh_token", refresh_token=tokens[-2])
                assert res["status"] == 400, res  # reuse detected: DOT revokes the whole token family
            clock.at = None
        elif flow == "refreshed":
            # Refreshed once, then left: the new access token points at the old (revoked) refresh token
            # (source_refresh_token) and the new refresh token points at the new access token.
            first = server.exchange(client_id, redirect)
            second = server.token(client_id, grant_type="refresh_token", refresh_token=str(first["refresh_token"]))
            assert second["status"] == 200, second
            AccessToken.objects.filter(application=app).exclude(scope="oauth2_provider:registration").update(
                expires=now - timedelta(minutes=5)
            )
        elif flow == "refresh_only":
            server.exchange(client_id, redirect)
            AccessToken.objects.filter(application=app).exclude(scope="oauth2_provider:registration").update(
                expires=now - timedelta(minutes=5)
            )
        elif flow == "pending_code":
            server.authorize(client_id, redirect)
        elif flow == "device_expired":
            DeviceGrant.objects.create(
                device_code=f"dev-{label}",
                user_code=f"X-{label}"[:20],
                client_id=client_id,
                expires=now - timedelta(days=1),
                scope="read",
                status="expired",
            )
        elif flow == "device_pending":
            DeviceGrant.objects.create(
                device_code=f"dev-{label}",
                user_code=f"U-{label}"[:20],
                client_id=client_id,
                expires=now + timedelta(minutes=10),
                scope="read",
            )
        else:
            assert flow == "none", flow
        clock.at = None
        if start is None:
            age = timedelta(seconds=float(spec.get("age", 0)))
            Application.objects.filter(pk=app.pk).update(created=now - age)
            if spec.get("age_tokens"):
                # The client's tokens were issued when it registered, not just now.
                RefreshToken.objects.filter(application=app).update(created=now - age)
        out[label] = {"id": app.pk, "client_id": client_id}
    return out


if __name__ == "__main__":
    setup(sys.argv[1])
    urlpatterns = _urlpatterns()
    sys.modules[__name__].urlpatterns = urlpatterns  # type: ignore[attr-defined]
    result = make_rows(json.loads(sys.stdin.read() or "[]"))
    print(json.dumps(result))
