"""Re-auth loops found on every server, from rows written the way that server writes them (docs/loops.md).

mcp-memory-service through its own SQLite OAuth storage (installed without its dependencies:
tests/requirements-upstream.txt), Django OAuth Toolkit through its own endpoints and
rotation code, Better Auth 1.7 through the real npm server over HTTP; Hydra, Spring Authorization Server and
Doorkeeper through the kit's schemas, with the statements their sources issue. Each server's loop: a client
software that registers, logs in, has its refresh token rotated, never stores the new one, and registers anew.
Each test has its controls: families that rotate and keep their tokens show no loop step at all (min_cycles 1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
import sqlite3
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.common import ago, insert
from kit.schemas.doorkeeper import Doorkeeper
from kit.schemas.hydra import Hydra
from kit.schemas.mcp_memory import create_mcp_schema
from kit.schemas.spring import Spring, spring_metadata
from reaper.backends.sql import scan
from reaper.commands import report
from reaper.profiles import bind_profile

# Every test writes a few hundred rows through a server or its statements and scans twice: seconds each.
pytestmark = pytest.mark.slow

MINUTE, HOUR, DAY = 60, 3600, 86400
LOOPER = "Claude Code (memory)"


def assert_only_loop(url: str, profile: str, members: list[str], name: str = LOOPER) -> None:
    """The looping family is the one suspected loop, each of its members but the newest one step; no other
    family shows a single step (checked with min_cycles = 1)."""
    snap = report(make_config(url, profile=profile))
    assert snap.loop_detection == "on"
    [loop] = snap.loops.values()
    assert loop.name == name and loop.cycles == len(members) - 1
    assert [s.client_id for s in loop.steps] == members[-2::-1], "each lost login, newest first"
    strict = report(make_config(url, profile=profile, loops={"min_cycles": 1}))
    assert [x.name for x in strict.loops.values()] == [name], "the healthy families show no step"
    assert_same_as_a_pass_of_its_own(url, profile, strict)


def assert_same_as_a_pass_of_its_own(url: str, profile: str, snap: Any) -> None:
    """The scan reads the revocations with the clients when it can: the loops and floods are exactly those a
    separate pass over the credential table gives."""
    assert scan.revocations_on_rows(bind_profile(make_config(url, profile=profile))) is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scan, "revocations_on_rows", lambda _profile: None)
        apart = report(make_config(url, profile=profile, loops={"min_cycles": 1}))
    assert apart.loops == snap.loops and apart.floods == snap.floods


# --- mcp-memory-service: its own SQLite OAuth storage ------------------------------------------------------


def mcp_memory_storage() -> Any:
    """mcp-memory-service's storage module (its models still use pydantic's class-based config: a deprecation
    warning at import, which is theirs to fix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from mcp_memory_service.web.oauth import models
            from mcp_memory_service.web.oauth.storage import sqlite
        except ModuleNotFoundError as exc:
            pytest.fail(f"{exc}: run pip install --no-deps -r tests/requirements-upstream.txt (see that file)")

    return sqlite, models


class McpMemoryClient:
    """What an MCP client does against mcp-memory-service, in the calls its endpoints make on its storage
    (web/oauth/registration.py and authorization.py), on a clock the test turns: the storage stamps every
    row with `time.time()`."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch):
        upstream, self.models = mcp_memory_storage()
        self.now = 0.0
        clock = type("Clock", (), {"time": staticmethod(lambda: self.now)})
        monkeypatch.setattr(upstream, "time", clock)
        self.storage = upstream.SQLiteOAuthStorage(str(path))

    async def register(self, name: str, at: float) -> str:
        self.now = at
        client = self.models.RegisteredClient(
            client_id=self.storage.generate_client_id(),
            client_secret="",  # a public client (token_endpoint_auth_method none) stores an empty secret
            redirect_uris=[f"http://127.0.0.1:{secrets.randbelow(20000) + 40000}/callback"],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
            client_name=name,
            created_at=at,
            allowed_scope="read write offline_access",
        )
        await self.storage.store_client(client)
        return client.client_id

    async def login(self, client_id: str, at: float) -> str:
        """Authorization code with PKCE, exchanged at once: an access token, and (offline_access) a refresh one."""
        self.now = at
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        code = self.storage.generate_authorization_code()
        scope = "read write offline_access"
        await self.storage.store_authorization_code(
            code, client_id, "http://127.0.0.1/callback", scope, None, challenge, "S256"
        )
        self.now = at + 2
        assert await self.storage.get_authorization_code(code) is not None
        await self.storage.store_access_token(self.storage.generate_access_token(), client_id, scope, 3600)
        refresh = self.storage.generate_refresh_token()
        await self.storage.store_refresh_token(refresh, client_id, scope)
        return refresh

    async def refresh(self, client_id: str, refresh: str, at: float) -> str | None:
        """grant_type=refresh_token as _handle_refresh_token_grant does it: an unknown or revoked token is a
        replay (the whole rotation chain is revoked, invalid_grant); otherwise the presented token is revoked
        and a new pair issued, the new refresh token chained to it."""
        self.now = at
        data = await self.storage.get_refresh_token(refresh)
        if data is None:
            await self.storage.revoke_refresh_token_chain(refresh)
            return None
        assert await self.storage.revoke_refresh_token(refresh)
        await self.storage.store_access_token(self.storage.generate_access_token(), client_id, data["scope"], 3600)
        new = self.storage.generate_refresh_token()
        await self.storage.store_refresh_token(new, client_id, data["scope"], parent_token=refresh)
        return new


async def _mcp_memory_story(server: McpMemoryClient, now: float, replay: bool = True) -> list[str]:
    """Four sessions of the looping CLI (replaying its old refresh token before it registers again, or not);
    an editor on three machines and a single-machine client, rotating and keeping their tokens; one
    registration never used. Returns the looping members."""
    loopers = []
    t = now - 20 * HOUR
    for i in range(4):
        cid = await server.register(LOOPER, t)
        loopers.append(cid)
        old = await server.login(cid, t + 20)
        if i == 3:
            break  # the newest session: still logged in
        assert await server.refresh(cid, old, t + HOUR) is not None  # rotated: the new token is never stored
        if replay:
            assert await server.refresh(cid, old, t + 2 * HOUR) is None  # the old one replayed: invalid_grant
        t += 2 * HOUR + 30  # ... and the CLI registers again

    # Three machines of one editor and a single-machine client, each refreshing twice a day with the token it
    # was given last, until an hour ago.
    for name, days in (("Visual Studio Code", 6), ("Visual Studio Code", 5), ("Visual Studio Code", 4), ("Cursor", 3)):
        cid = await server.register(name, now - days * DAY)
        token: str | None = await server.login(cid, now - days * DAY + 30)
        for h in range(days * 24 - 12, 0, -12):
            assert token is not None
            token = await server.refresh(cid, token, now - h * HOUR)
    await server.register("MCP Inspector", now - 2 * DAY)
    await server.storage.close()
    return loopers


def test_mcp_memory_service_storage_loop(tmp_path, monkeypatch):
    path = tmp_path / "oauth.db"
    loopers = asyncio.run(_mcp_memory_story(McpMemoryClient(path, monkeypatch), time.time()))
    url = f"sqlite:///{path}"
    assert_only_loop(url, "mcp-memory-service", loopers)
    [loop] = report(make_config(url, profile="mcp-memory-service")).loops.values()
    # No revocation time is stored: a step's time is the newest revoked row's creation, the lost rotation.
    assert all(s.gap == pytest.approx(HOUR + 30) for s in loop.steps)


def test_mcp_memory_service_without_a_replay_leaves_no_step(tmp_path, monkeypatch):
    """The lost successor stays unrevoked, and the newest revoked row is the one before the rotation: the
    client was issued something after it (docs/loops.md: the evidence is the replay's chain revocation)."""
    path = tmp_path / "oauth.db"
    asyncio.run(_mcp_memory_story(McpMemoryClient(path, monkeypatch), time.time(), replay=False))
    assert not report(make_config(f"sqlite:///{path}", profile="mcp-memory-service", loops={"min_cycles": 1})).loops


def test_the_kits_mcp_memory_schema_is_the_storage_one(tmp_path):
    """The kit's schema (reaper.demo.SCHEMA) has the storage's tables, columns and types, in its order; it
    leaves out the NOT NULL constraints, so tests can also write the broken rows a hand-edited file holds."""
    upstream, _ = mcp_memory_storage()

    async def init() -> None:
        storage = upstream.SQLiteOAuthStorage(str(tmp_path / "upstream.db"))
        await storage.get_stats()
        await storage.close()

    asyncio.run(init())
    create_mcp_schema(sa.create_engine(f"sqlite:///{tmp_path / 'kit.db'}"), "sqlite")

    def shape(name: str) -> dict[str, list[tuple[str, str, int]]]:
        with sqlite3.connect(tmp_path / name) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: [(c[1], c[2], c[5]) for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables}

    assert shape("kit.db") == shape("upstream.db")


# --- Django OAuth Toolkit: its own endpoints and rotation, on Django's clock -----------------------------


def test_dot_loop(db):
    from kit.schemas.dot import build

    def story(label: str, name: str, at: float, **extra: Any) -> dict[str, Any]:
        port = 40000 + secrets.randbelow(20000)
        return {"label": label, "name": name, "redirect": f"http://127.0.0.1:{port}/callback", "at": at, **extra}

    plan = []
    start = 20 * HOUR  # seconds ago
    for i in range(4):  # logs in, refreshed after an hour, loses the new token, replays the old an hour later
        if i < 3:
            plan.append(story(f"loop{i}", LOOPER, start, flow="lost", refresh_after=[HOUR], replay_after=2 * HOUR))
        else:
            plan.append(story(f"loop{i}", LOOPER, start, flow="kept", refresh_after=[]))
        start -= 2 * HOUR + 30
    # Three machines of one editor, each refreshing twice a day with the token it was given, and a single one.
    for i, days in enumerate((6, 5, 4)):
        refreshes = [h * HOUR for h in range(12, int(days * 24) - 1, 12)]
        plan.append(story(f"editor{i}", "Visual Studio Code", days * DAY, flow="kept", refresh_after=refreshes))
    plan.append(story("single", "Cursor", 3 * DAY, flow="kept", refresh_after=[12 * HOUR, 36 * HOUR]))
    plan.append({"label": "never", "name": "MCP Inspector", "redirect": "http://127.0.0.1:6274/cb", "age": 2 * DAY})
    ids = build(db.url, plan)
    assert_only_loop(db.url, "django-oauth-toolkit", [ids[f"loop{i}"]["client_id"] for i in range(4)])
    [loop] = report(make_config(db.url, profile="django-oauth-toolkit")).loops.values()
    assert all(s.gap == pytest.approx(30, abs=1) for s in loop.steps), "revoked at the replay (exact)"


# --- Ory Hydra: graceful refresh rotation, as its persister writes it -------------------------------------


class HydraWriter:
    """Hydra's rows for one client: a login writes the code (invalidated once exchanged), the access and the
    refresh token of one request; a graceful rotation marks the old refresh token used (active = false,
    first_used_at, used_times), drops the request's access token and writes a new pair for the same request."""

    def __init__(self, engine: sa.Engine):
        self.h = Hydra(engine)
        self.engine = engine
        self.nid = self.h.network()

    def _row(self, table: str, cid: str, request: str, at: float, active: bool, ttl: float | None) -> str:
        sig = uuid.uuid4().hex
        row = {
            "signature": sig,
            "request_id": request,
            "requested_at": ago(at),
            "client_id": cid,
            "nid": self.nid,
            "subject": "alice",
            "active": active,
            "expires_at": None if ttl is None else ago(at - ttl),
        }
        if table == "hydra_oauth2_refresh":
            row |= {"first_used_at": None, "used_times": 0}
        insert(self.engine, self.h.t[table], [row])
        return sig

    def register(self, name: str, at: float) -> str:
        return self.h.client(self.nid, name, [f"http://127.0.0.1:{40000 + secrets.randbelow(20000)}/cb"], at)

    def login(self, cid: str, at: float) -> tuple[str, str]:
        request = uuid.uuid4().hex
        self.h.flow(self.nid, cid, at)
        self._row("hydra_oauth2_code", cid, request, at, active=False, ttl=10 * MINUTE)
        self._row("hydra_oauth2_access", cid, request, at - 2, active=True, ttl=HOUR)
        return request, self._row("hydra_oauth2_refresh", cid, request, at - 2, active=True, ttl=30 * DAY)

    def refresh(self, cid: str, request: str, signature: str, at: float) -> str:
        t = self.h.t
        with self.engine.begin() as conn:
            refresh = t["hydra_oauth2_refresh"]
            conn.execute(
                refresh.update()
                .where(refresh.c.signature == signature)
                .values(active=False, first_used_at=ago(at), used_times=refresh.c.used_times + 1)
            )
            access = t["hydra_oauth2_access"]
            conn.execute(access.delete().where(access.c.request_id == request))
        self._row("hydra_oauth2_access", cid, request, at, active=True, ttl=HOUR)
        return self._row("hydra_oauth2_refresh", cid, request, at, active=True, ttl=30 * DAY)


def test_hydra_graceful_rotation_loop(server_db):
    """Under graceful rotation the rotated token keeps its first use. The looping client here re-registers
    without replaying: a replay after the grace period deletes the request's rows, and with them the loop."""
    w = HydraWriter(server_db.engine)
    loopers = []
    at = 20 * HOUR  # seconds ago
    for i in range(4):
        cid = w.register(LOOPER, at)
        loopers.append(cid)
        request, sig = w.login(cid, at - 20)
        if i < 3:
            w.refresh(cid, request, sig, at - HOUR)  # the new refresh token never reaches the client's store
        at -= 2 * HOUR
    _healthy(w.register, w.login, lambda cid, state, when: (state[0], w.refresh(cid, *state, when)))
    assert_only_loop(server_db.url, "ory-hydra", loopers)


def _healthy(register: Callable[..., Any], login: Callable[..., Any], refresh: Callable[..., Any]) -> None:
    """Three machines of one editor and a single-machine client, each refreshing twice a day with what it was
    given last (`refresh(client, state, seconds_ago) -> state`), until an hour ago; one registration unused."""
    clients = [(register("Visual Studio Code", days * DAY), days) for days in (6, 5, 4)]
    clients.append((register("Cursor", 3 * DAY), 3))
    for cid, days in clients:
        state = login(cid, days * DAY - 30)
        for h in range(int(days * 24) - 12, 0, -12):
            state = refresh(cid, state, h * HOUR)
    register("MCP Inspector", 2 * DAY)


# --- Spring Authorization Server: the authorization row rotated in place ----------------------------------


class SpringWriter:
    """JdbcOAuth2AuthorizationService's rows with reuseRefreshTokens(false): a DCR client comes with its
    registration access token (an authorization of itself); a login saves the code, then on exchange the
    access and refresh token into the same row (code invalidated); a refresh overwrites the access and the
    refresh token of that row in place. A replayed old refresh token finds no row: nothing is written."""

    def __init__(self, engine: sa.Engine):
        self.s = Spring(engine)
        self.engine = engine

    def register(self, name: str, at: float) -> str:
        client_id = uuid.uuid4().hex
        key = self.s.client(client_id, name, [f"http://127.0.0.1:{40000 + secrets.randbelow(20000)}/cb"], at)
        self.s.authorization(key, principal=client_id, grant="client_credentials", scopes="client.read", age=at)
        return key

    def login(self, key: str, at: float) -> str:
        auth = self.s.authorization(key, age=at, code_ttl=5 * MINUTE, invalidated=("authorization_code",))
        self._tokens(auth, at - 2)  # exchanged two seconds after the consent
        return auth

    def _tokens(self, auth: str, at: float) -> None:
        t = self.s.t["oauth2_authorization"]
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.id == auth)
                .values(
                    access_token_value=uuid.uuid4().hex,
                    access_token_issued_at=ago(at),
                    access_token_expires_at=ago(at - 5 * MINUTE),
                    access_token_metadata=spring_metadata(False),
                    refresh_token_value=uuid.uuid4().hex,
                    refresh_token_issued_at=ago(at),
                    refresh_token_expires_at=ago(at - HOUR),
                    refresh_token_metadata=spring_metadata(False),
                )
            )

    def refresh(self, key: str, auth: str, at: float) -> str:
        self._tokens(auth, at)
        return auth


def test_spring_rotation_in_place_loop(server_db):
    w = SpringWriter(server_db.engine)
    loopers = []
    at = 20 * HOUR
    for i in range(4):
        key = w.register(LOOPER, at)
        loopers.append(key)
        auth = w.login(key, at - 20)
        if i < 3:
            w.refresh(key, auth, at - 30 * MINUTE)  # the rotated refresh token is lost; the old one is refused
        at -= 2 * HOUR
    _healthy(w.register, w.login, w.refresh)
    # A family that logs in and re-registers without ever refreshing: its refresh tokens were never rotated.
    for at in (10 * HOUR, 8 * HOUR, 6 * HOUR):
        w.login(w.register("MCP CLI Proxy", at), at - 20)
    with server_db.engine.connect() as conn:
        keys = dict(conn.execute(sa.text("SELECT id, client_id FROM oauth2_registered_client")).all())
    assert_only_loop(server_db.url, "spring-authorization-server", [keys[k] for k in loopers])


# --- Doorkeeper: previous_refresh_token, the old token revoked on the new one's first use -----------------


class DoorkeeperWriter:
    """Doorkeeper's rows with the previous_refresh_token column (its generated default): the grant is revoked
    when exchanged; a refresh writes a new token row that names the old refresh token, and the old row is
    revoked (revoked_at) when the new access token is first used, which clears previous_refresh_token."""

    def __init__(self, engine: sa.Engine):
        self.d = Doorkeeper(engine)
        self.engine = engine

    def register(self, name: str, at: float) -> int:
        return self.d.application(name, [f"http://127.0.0.1:{40000 + secrets.randbelow(20000)}/cb"], at)[0]

    def _token(self, app: int, at: float, previous: str = "") -> int:
        t = self.d.t["oauth_access_tokens"]
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    t.insert().values(
                        resource_owner_id=1,
                        application_id=app,
                        token=uuid.uuid4().hex,
                        refresh_token=uuid.uuid4().hex,
                        expires_in=2 * HOUR,
                        scopes="read",
                        created_at=ago(at),
                        previous_refresh_token=previous,
                    )
                ).inserted_primary_key[0]
            )

    def login(self, app: int, at: float) -> int:
        self.d.grant(app, at, revoked_in=-(at - 2))
        return self._token(app, at - 2)

    def refresh(self, app: int, token: int, at: float, use_after: float = 5) -> int:
        t = self.d.t["oauth_access_tokens"]
        with self.engine.begin() as conn:
            old = conn.execute(sa.select(t.c.refresh_token).where(t.c.id == token)).scalar_one()
        new = self._token(app, at, previous=old)
        with self.engine.begin() as conn:  # the new access token's first use: revoke_previous_refresh_token!
            conn.execute(t.update().where(t.c.id == token).values(revoked_at=ago(at - use_after)))
            conn.execute(t.update().where(t.c.id == new).values(previous_refresh_token=""))
        return new


def test_doorkeeper_loop(pg_db):
    w = DoorkeeperWriter(pg_db.engine)
    loopers = []
    at = 20 * HOUR
    for i in range(4):
        app = w.register(LOOPER, at)
        loopers.append(app)
        token = w.login(app, at - 20)
        if i < 3:
            # Refreshed when the access token expired; the new access token was used for the call at hand, the
            # new refresh token never stored. Two hours later the old refresh token is refused (revoked).
            w.refresh(app, token, at - 2 * HOUR)
        at -= 4 * HOUR
    _healthy(w.register, w.login, w.refresh)
    with pg_db.engine.connect() as conn:
        uids = dict(conn.execute(sa.text("SELECT id, uid FROM oauth_applications")).all())
    assert_only_loop(pg_db.url, "doorkeeper", [uids[a] for a in loopers])


# --- Better Auth 1.7 (@better-auth/oauth-provider): the real npm server over HTTP --------------------------


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is needed to run the real Better Auth")
def test_better_auth_real_server_loop(pg_db):
    """Rotation sets revoked = rotatedAt on the old refresh row. The looping CLI re-registers without
    replaying: on 1.7 a replay deletes the (client, user) refresh family, and with it the evidence."""
    from kit.better_auth.driver import BetterAuthServer, age_client

    loopers: list[str] = []
    with BetterAuthServer("1.7", pg_db.url, install=True) as ba:
        alice = ba.sign_up("alice@example.com")
        for i in range(4):
            c = ba.register(LOOPER)
            tokens = ba.login(alice, c)
            if i < 3:
                ba.refresh(c, tokens)  # the rotated refresh token never reaches the client's store
            loopers.append(c.client_id)
        # Two machines of an editor and their newer third, both older ones refreshing after it registered.
        editors = [ba.register("Visual Studio Code") for _ in range(3)]
        kept = {e.client_id: (e, ba.refresh(e, ba.login(alice, e))) for e in editors[:2]}
        ba.login(alice, editors[2])
        time.sleep(2.2)  # whole seconds: later than the newest registration by more than the slack
        for client, tokens in kept.values():
            ba.refresh(client, tokens)
    for i, cid in enumerate(loopers):  # each session two hours after the last
        age_client(pg_db.engine, cid, (4 - i) * 2 * HOUR)
    for e in editors:
        age_client(pg_db.engine, e.client_id, 2 * DAY)  # the same for all: their order and gaps stay
    with pg_db.engine.connect() as conn:
        rotated = conn.execute(sa.text('SELECT count(*) FROM "oauthRefreshToken" WHERE "rotatedAt" IS NOT NULL'))
        assert rotated.scalar() == 7, "1.7 marks each rotated-away refresh token"
    assert_only_loop(pg_db.url, "better-auth", loopers)
