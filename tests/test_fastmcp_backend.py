"""The key-value backend on FastMCP-shaped stores written through py-key-value itself (Redis and the encrypted
file tree): decoding as the library reads, FastMCP's key derivation, complete enumeration, liveness, the
read-only guarantee (a read-only Redis user), a wrong key, the lock, the re-check, restore, and `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from key_value.aio.stores.filetree import (
    FileTreeStore,
    FileTreeV1CollectionSanitizationStrategy,
    FileTreeV1KeySanitizationStrategy,
)
from key_value.aio.stores.redis import RedisStore
from key_value.aio.wrappers.encryption import FernetEncryptionWrapper
from prometheus_client import generate_latest

from kit.cli import assert_errors, clean_env, run_cli
from kit.redis import RedisServer, redis_db, redis_hostport, redis_state, tree_state  # noqa: F401
from reaper.backends import open_backend
from reaper.backends.kv import keys as kv_keys
from reaper.backends.kv.lock import FileLock, RedisLock
from reaper.commands import apply, classified, plan, report, restore
from reaper.config import Config, load_config
from reaper.errors import ConfigError, LockHeld
from reaper.service import Service

# py-key-value 0.4 writes TTL'd entries with SETEX, which redis-py 8 calls deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
SECRET = "unit-test-jwt-signing-key-0123456789"
HOUR = 3600.0
CLIENTS = "mcp-oauth-proxy-clients"
REDIS_DB = 14


@contextlib.contextmanager
def clock_offset(seconds: float) -> Iterator[None]:
    """py-key-value's clock (envelope created_at / expires_at) shifted by `seconds` in this process."""
    import key_value.aio._utils.time_to_live as ttl

    real = ttl.datetime

    class Shifted(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return cls.fromtimestamp(time.time() + seconds, tz)

    ttl.datetime = Shifted  # type: ignore[misc]
    try:
        yield
    finally:
        ttl.datetime = real  # type: ignore[misc]


@dataclass
class Kv:
    """A store of one kind, written through py-key-value the way FastMCP's proxy writes it."""

    kind: str
    url: str
    tmp: Path
    encrypt: bool
    root: Path | None = None

    async def _run(self, op: Any) -> Any:
        """Run op(store) on a store opened for it, and close that store (its Redis connections) after."""
        store = self._store()
        try:
            return await op(store)
        finally:
            base = store.key_value if self.encrypt else store
            if self.kind == "redis":
                await base.close()

    def _store(self) -> Any:
        if self.kind == "redis":
            base: Any = RedisStore(url=self.url)
        else:
            assert self.root is not None
            base = FileTreeStore(
                data_directory=self.root,
                key_sanitization_strategy=FileTreeV1KeySanitizationStrategy(self.root),
                collection_sanitization_strategy=FileTreeV1CollectionSanitizationStrategy(self.root),
            )
        if self.encrypt:
            return FernetEncryptionWrapper(key_value=base, fernet=Fernet(storage_key()))
        return base

    def put(self, collection: str, key: str, value: dict[str, Any], ttl: float | None = None, age: float = 0) -> None:
        async def put(store: Any) -> None:
            with clock_offset(-age):
                await store.put(key, value, collection=collection, ttl=ttl)

        asyncio.run(self._run(put))

    def get(self, collection: str, key: str) -> Any:
        async def get(store: Any) -> Any:
            return await store.get(key, collection=collection)

        return asyncio.run(self._run(get))

    # FastMCP's records, as its OAuthProxy puts them (models.py)
    def client(self, name: str, age: float, client_id: str | None = None, port: int = 5000) -> str:
        cid = client_id or str(uuid.uuid4())
        value = {
            "client_id": cid,
            "client_name": name,
            "client_id_issued_at": None,
            "redirect_uris": [f"http://localhost:{port}/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "none",
            "cimd_document": None,
            "software_id": None,
        }
        self.put(CLIENTS, cid, value, age=age)
        return cid

    def login(self, cid: str, age: float, refresh_left: float | None, access_left: float = HOUR) -> str:
        """A finished login `age` ago: upstream token set, its jti mappings, refresh metadata (when given)."""
        upstream_id, now = uuid.uuid4().hex, time.time() - age
        refresh = "upstream-refresh" if refresh_left is not None else None
        left = max(refresh_left or 0, access_left)
        self.put(
            "mcp-upstream-tokens",
            upstream_id,
            {"upstream_token_id": upstream_id, "access_token": "upstream-access", "refresh_token": refresh,
             "client_id": cid, "expires_at": now + access_left, "created_at": now},
            ttl=left + age if left + age > 0 else 1,
            age=age,
        )  # fmt: skip
        for jti, life in ((uuid.uuid4().hex, access_left), (uuid.uuid4().hex, left)):
            self.put("mcp-jti-mappings", jti, {"jti": jti, "upstream_token_id": upstream_id, "created_at": now},
                     ttl=max(life + age, 1), age=age)  # fmt: skip
        if refresh_left is not None:
            self.put("mcp-refresh-tokens", uuid.uuid4().hex + uuid.uuid4().hex,
                     {"client_id": cid, "scopes": ["read"], "expires_at": int(now + refresh_left + age),
                      "created_at": now}, ttl=max(refresh_left + age, 1), age=age)  # fmt: skip
        return upstream_id

    def transaction(self, cid: str, age: float) -> None:
        txn = uuid.uuid4().hex
        self.put("mcp-oauth-transactions", txn, {"txn_id": txn, "client_id": cid}, ttl=900, age=age)

    def code(self, cid: str, age: float) -> None:
        code = uuid.uuid4().hex
        value = {"code": code, "client_id": cid, "expires_at": time.time() - age + 300, "created_at": time.time()}
        self.put("mcp-authorization-codes", code, value, ttl=300, age=age)

    def state(self) -> Any:
        return redis_state(self.url) if self.kind == "redis" else tree_state(self.root or self.tmp)

    def config(self, **extra: Any) -> Config:
        data: dict[str, Any] = {
            "database_url": self.url if self.kind == "redis" else str(self.tmp / "home"),
            "profile": "fastmcp-oauth-proxy",
            "classify": {"young_for": "30m", "abandoned_after": "1h"},
            "policy": {"min_age": "1h", "max_per_run": 1000, "max_fraction": 1.0, "pause": 0, "late_token_sweep": 0},
            "ledger": {"url": f"sqlite:///{self.tmp / 'ledger.sqlite'}"},
        }
        if self.encrypt:
            data["fastmcp"] = {"jwt_signing_key": SECRET}
        for key, value in extra.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        return load_config(None, data, environ={})


def storage_key() -> bytes:
    return kv_keys.storage_key_from_jwt_key(kv_keys.jwt_key_from_string(SECRET))


@pytest.fixture(params=["redis", "filetree"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Kv:
    if request.param == "redis":
        return Kv("redis", redis_db(request.getfixturevalue("redis_hostport"), REDIS_DB), tmp_path, encrypt=False)
    root = tmp_path / "home" / "oauth-proxy" / kv_keys.fingerprint(storage_key())
    root.mkdir(parents=True)
    return Kv("filetree", str(root), tmp_path, encrypt=True, root=root)


def verdicts(config: Config) -> dict[str, tuple[str, str]]:
    with classified(config) as (stream, _snap):
        return {c.row.client_id: (str(c.verdict), c.reason) for c in stream}


# -- the library's own reads, FastMCP's own key --------------------------------------------------------------


def test_key_derivation_is_fastmcps(tmp_path: Path):
    from fastmcp.server.auth.jwt_issuer import derive_jwt_key

    jwt = derive_jwt_key(low_entropy_material=SECRET, salt="fastmcp-jwt-signing-key")
    assert kv_keys.jwt_key_from_string(SECRET) == jwt
    assert kv_keys.jwt_key_from_upstream_secret("s3cret") == derive_jwt_key(
        high_entropy_material="s3cret", salt="fastmcp-jwt-signing-key"
    )
    storage = derive_jwt_key(high_entropy_material=jwt.decode(), salt="fastmcp-storage-encryption-key")
    assert kv_keys.storage_key_from_jwt_key(jwt) == storage
    # The directory an OAuthProxy with this key makes for its default store.
    import fastmcp
    from fastmcp.server.auth.oauth_proxy import OAuthProxy
    from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

    home = fastmcp.settings.home
    fastmcp.settings.home = tmp_path
    try:
        OAuthProxy(
            upstream_authorization_endpoint="http://127.0.0.1:1/authorize",
            upstream_token_endpoint="http://127.0.0.1:1/token",
            upstream_client_id="x",
            upstream_client_secret="y",
            token_verifier=StaticTokenVerifier(tokens={}),
            base_url="http://127.0.0.1:2",
            jwt_signing_key=SECRET,
        )
    finally:
        fastmcp.settings.home = home
    assert [p.name for p in (tmp_path / "oauth-proxy").iterdir()] == [kv_keys.fingerprint(storage)]


def test_the_scan_decodes_what_py_key_value_reads(kv: Kv):
    cid = kv.client("Cursor", age=2 * HOUR)
    kv.login(cid, age=HOUR, refresh_left=HOUR)
    backend = open_backend(kv.config())
    try:
        with backend.scan(time.time()) as source:
            [row] = list(source.rows())
            reader = source.reader  # type: ignore[attr-defined]
            entries = {e.key: e for c in ("mcp-oauth-proxy-clients", "mcp-upstream-tokens") for e in reader.decoded(c)}
    finally:
        backend.close()
    assert row.client_id == cid and row.name == "Cursor" and row.redirect_uris == ("http://localhost:5000/callback",)
    assert abs((row.created_at or 0) - (time.time() - 2 * HOUR)) < 60
    for key, entry in entries.items():
        assert entry.value == kv.get(entry.raw.collection, key or ""), "the library's get returns the same value"
        assert entry.encrypted is kv.encrypt


def test_every_redis_key_is_found_where_the_librarys_keys_misses_some(redis_hostport):  # noqa: F811
    import redis

    url = redis_db(redis_hostport, REDIS_DB)
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for i in range(20_000):
        pipe.set(f"other-app:{i}", "x")
    pipe.execute()
    kv = Kv("redis", url, Path("/nonexistent"), encrypt=False)
    ids = {kv.client("Claude Code", age=2 * HOUR) for _ in range(30)}

    async def library_keys() -> list[str]:
        store = RedisStore(url=url)
        try:
            return await store.keys(CLIENTS)
        finally:
            await store.close()

    assert len(asyncio.run(library_keys())) < 30, "py-key-value's keys() makes one SCAN call"
    config = kv.config(ledger={"url": None})
    assert set(verdicts(config)) == ids
    client.flushdb()


# -- liveness ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_liveness_from_refresh_tokens_codes_transactions_and_access_only_logins(kv: Kv):
    live_refresh = kv.client("a", age=10 * HOUR)
    kv.login(live_refresh, age=5 * HOUR, refresh_left=HOUR)
    expired = kv.client("b", age=10 * HOUR)
    kv.login(expired, age=5 * HOUR, refresh_left=-HOUR, access_left=-2 * HOUR)
    in_login = kv.client("c", age=10 * HOUR)
    kv.transaction(in_login, age=60)
    stale_login = kv.client("d", age=10 * HOUR)
    kv.transaction(stale_login, age=HOUR)
    coded = kv.client("e", age=10 * HOUR)
    kv.code(coded, age=10)
    access_only = kv.client("f", age=10 * HOUR)
    kv.login(access_only, age=10 * 60, refresh_left=None)
    cimd = kv.client("g", age=10 * HOUR, client_id="https://app.example.com/oauth/client.json")
    young = kv.client("h", age=10 * 60)
    got = verdicts(kv.config())
    assert got[live_refresh] == ("live", "live_token")
    assert got[expired] == ("abandoned", "never_used")
    assert got[in_login] == ("live", "live_login"), "an open transaction: a login in progress"
    assert got[stale_login] == ("abandoned", "never_used"), "a transaction is no sign of use"
    assert got[coded] == ("live", "live_code")
    assert got[access_only] == ("live", "live_token")
    assert got[cimd] == ("protected", "cimd"), problems_of(kv.config(), cimd)
    assert got[young] == ("young", "grace_period")
    # options.refresh_idle: a refresh token not used for that long no longer keeps its client.
    assert verdicts(kv.config(options={"refresh_idle": "4h"}))[live_refresh] == ("idle", "no_newer_sibling")


@pytest.mark.slow
def test_a_transaction_keeps_a_flood_flagged_but_not_used(kv: Kv):
    for i in range(12):
        cid = kv.client("Free MCP Scanner", age=2 * HOUR + i, port=40000 + i)
        kv.transaction(cid, age=2 * HOUR + i)
    with classified(kv.config(loops={"flood_registrations": 10})) as (stream, snap):
        assert {str(c.verdict) for c in stream} == {"abandoned"}
    [flood] = snap.floods
    assert flood.registrations == 12


# -- read-only, wrong key --------------------------------------------------------------------------------------


def test_report_writes_nothing_even_to_a_redis_that_refuses_every_write(tmp_path: Path):
    server = RedisServer()
    try:
        admin = f"redis://127.0.0.1:{server.port}/0"
        kv = Kv("redis", admin, tmp_path, encrypt=False)
        gone = kv.client("Claude Code", age=10 * HOUR)
        kv.login(kv.client("Claude Code", age=9 * HOUR), age=HOUR, refresh_left=HOUR)
        import redis

        r = redis.Redis.from_url(admin)
        r.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@read", "+@connection", "-@write")
        before = redis_state(admin)
        reader = kv.config(database_url=f"redis://reader:pw@127.0.0.1:{server.port}/0")
        snap = report(reader)
        assert snap.clients == 2 and redis_state(admin) == before
        assert ":***@" in snap.database and "pw" not in snap.database
        # The control: the same user cannot reap (its lock and its deletes are writes).
        with pytest.raises(Exception, match="NOPERM|no permissions"):
            apply(reader, plan(reader))
        assert redis_state(admin) == before and gone
        # serve leads with a user that may write only its lock key, as docs/fastmcp.md says.
        r.execute_command(
            "ACL", "SETUSER", "leader", "on", ">pw", "%R~*", "%RW~dcr-reaper:lock:*",
            "+@read", "+@connection", "+set", "+eval", "+del",
        )  # fmt: skip
        service = Service(kv.config(database_url=f"redis://leader:pw@127.0.0.1:{server.port}/0"))
        try:
            service.tick()
            assert service.metrics.leader == 1 and service.lock is not None and service.metrics.scans == 1
        finally:
            if service.lock is not None:
                service.lock.release()
        assert redis_state(admin) == before
    finally:
        server.stop()


@pytest.mark.slow
def test_a_wrong_key_fails_with_one_line_and_writes_nothing(tmp_path: Path):
    root = tmp_path / "home" / "oauth-proxy" / kv_keys.fingerprint(storage_key())
    root.mkdir(parents=True)
    kv = Kv("filetree", str(root), tmp_path, encrypt=True, root=root)
    kv.client("Claude Code", age=10 * HOUR)
    before = tree_state(tmp_path)
    wrong = "not-the-servers-key-0123456789"
    out = tmp_path / "report.json"
    elsewhere = tmp_path / "copy-of-the-store"
    shutil.copytree(root, elsewhere)
    before = tree_state(tmp_path)
    cases = ((tmp_path / "home", "no store for this key"), (root, "store of another key"), (elsewhere, "not decrypt"))
    for url, message in cases:
        res = run_cli(
            ["report", "--profile", "fastmcp-oauth-proxy", "--database-url", str(url), "-o", str(out)],
            tmp_path,
            env=clean_env(DCR_REAPER_FASTMCP__JWT_SIGNING_KEY=wrong),
        )
        [line] = assert_errors(res, 2)
        assert message in line and wrong not in res.stderr + res.stdout
        assert not out.exists()
    assert tree_state(tmp_path) == before
    res = run_cli(["report", "--profile", "fastmcp-oauth-proxy", "--database-url", str(root)], tmp_path)
    [line] = assert_errors(res, 2)
    assert "encrypted" in line


# -- one actor at a time --------------------------------------------------------------------------------------------


def test_the_redis_lock_is_one_holders_and_knows_when_it_is_lost(redis_hostport):  # noqa: F811
    import redis

    url = redis_db(redis_hostport, REDIS_DB)
    first = RedisLock(redis.Redis.from_url(url), "t", "dcr-reaper:lock:test", ttl_ms=600)
    second = RedisLock(redis.Redis.from_url(url), "t", "dcr-reaper:lock:test", ttl_ms=600)
    assert first.try_acquire() and not second.try_acquire()
    assert "pid" in second.holder()
    time.sleep(1.0)
    assert first.alive(), "renewed while held"
    redis.Redis.from_url(url).delete("dcr-reaper:lock:test")
    assert second.try_acquire() and not first.alive()
    first.release()
    assert second.alive(), "a lost lock's release never deletes the new holder's"
    second.release()
    assert redis.Redis.from_url(url).get("dcr-reaper:lock:test") is None


def test_the_file_tree_lock_and_a_second_reaper(kv: Kv):
    if kv.kind == "filetree":
        lock = FileLock(Path(f"{kv.root}.dcr-reaper.lock"), "t")
        assert lock.try_acquire() and not FileLock(lock.path, "t").try_acquire()
        lock.release()
    kv.client("Claude Code", age=10 * HOUR)
    kv.client("Claude Code", age=9 * HOUR)
    config = kv.config()
    backend = open_backend(config)
    held = backend.lock()
    assert held.try_acquire()
    try:
        with pytest.raises(LockHeld):
            apply(config, plan(config))
    finally:
        held.release()
        backend.close()


# -- reap: the re-check, dependents, restore ---------------------------------------------------------------------


@pytest.mark.slow
def test_reap_rechecks_deletes_dependents_and_restores_them_byte_for_byte(kv: Kv):
    old = kv.client("Claude Code", age=10 * HOUR)
    kv.login(old, age=8 * HOUR, refresh_left=-HOUR, access_left=-2 * HOUR)
    kv.transaction(old, age=7 * HOUR)
    revived = kv.client("Claude Code", age=9 * HOUR)
    newest = kv.client("Claude Code", age=2 * HOUR)
    kv.login(newest, age=HOUR, refresh_left=HOUR)
    config = kv.config()
    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == {old, revived}
    kv.transaction(revived, age=0)  # a login starts between the plan and the reap
    before = kv.state()
    result = apply(config, the_plan)
    assert result.total_acted == 1 and result.skipped["changed_since_scan"] == 1
    after = kv.state()
    removed = set(before) - set(after)
    assert len(removed) == 6, "the client, its upstream token set, both jti mappings, refresh entry, transaction"
    assert not set(after) - set(before)
    assert set(verdicts(config)) == {revived, newest}
    res = restore(config, client_id=old)
    assert res.restored == [old]
    now = kv.state()
    for key in removed:
        if kv.kind == "filetree":
            assert now[key] == before[key]
        else:
            assert now[key][0] == before[key][0]
    assert verdicts(config)[old] == ("abandoned", "never_used")
    again = restore(config, client_id=old[:10])  # a restored client restores as a no-op, by a prefix too
    assert (again.restored, again.already) == ([], 1)
    assert kv.state() == now


def test_statements_list_every_entry_a_reap_would_delete(kv: Kv):
    from reaper.commands import statements

    old = kv.client("Claude Code", age=10 * HOUR)
    kv.login(old, age=8 * HOUR, refresh_left=-HOUR, access_left=-2 * HOUR)
    kv.client("Claude Code", age=9 * HOUR)
    config = kv.config()
    before = kv.state()
    [batch] = statements(config, plan(config))
    assert len(batch) == 2 * 1 + 3 and all(s.split()[0] in ("DEL", "unlink") for s in batch)
    assert kv.state() == before


def test_serve_scans_and_exports_metrics(kv: Kv):
    kv.client("Claude Code", age=10 * HOUR)
    kv.client("Claude Code", age=9 * HOUR)
    service = Service(kv.config())
    try:
        service.tick()
        text = generate_latest(service.metrics.registry).decode()
    finally:
        if service.lock is not None:
            service.lock.release()
        service.backend.close()
    assert 'dcr_clients{verdict="abandoned"} 2.0' in text and "dcr_leader 1.0" in text


def test_the_profile_refuses_a_sql_url_and_sql_profiles_refuse_redis(tmp_path: Path):
    with pytest.raises(ConfigError, match="key-value store"):
        open_backend(load_config(None, {"database_url": "redis://127.0.0.1:6379/14"}, environ={}))
    config = load_config(
        None, {"database_url": "postgresql://x@127.0.0.1/y", "profile": "fastmcp-oauth-proxy"}, environ={}
    )
    with pytest.raises(ConfigError, match="not a key-value store"):
        open_backend(config)


def problems_of(config: Config, client_id: str) -> list[str]:
    with classified(config) as (stream, _snap):
        return [p for c in stream if c.row.client_id == client_id for p in c.row.problems]


@pytest.mark.slow
def test_the_cli_checks_reports_reaps_and_restores(kv: Kv):
    old = kv.client("Claude Code", age=10 * HOUR)
    kv.client("Claude Code", age=9 * HOUR)
    url = kv.url if kv.kind == "redis" else str(kv.tmp / "home")
    env = clean_env(
        DCR_REAPER_PROFILE="fastmcp-oauth-proxy",
        DCR_REAPER_DATABASE_URL=url,
        DCR_REAPER_LEDGER__URL=f"sqlite:///{kv.tmp / 'ledger.sqlite'}",
        DCR_REAPER_POLICY__MAX_FRACTION="1.0",
        DCR_REAPER_CLASSIFY__ABANDONED_AFTER="1h",
        DCR_REAPER_POLICY__LATE_TOKEN_SWEEP="0",
        **({"DCR_REAPER_FASTMCP__JWT_SIGNING_KEY": SECRET} if kv.encrypt else {}),
    )
    check = run_cli(["check"], kv.tmp, env=env)
    assert check.returncode == 0 and "ok: profile 'fastmcp-oauth-proxy'" in check.stdout, check.stderr
    rep = run_cli(["report", "--format", "json"], kv.tmp, env=env)
    assert rep.returncode == 0, rep.stderr
    assert {c["client_id"] for c in json.loads(rep.stdout)["clients"]} >= {old}
    reaped = run_cli(["reap", "--apply"], kv.tmp, env={**env, "DCR_REAPER_POLICY__MIN_AGE": "1h"})
    assert reaped.returncode == 0, reaped.stderr
    assert old not in verdicts(kv.config()), reaped.stdout
    back = run_cli(["restore", "--client", old], kv.tmp, env=env)
    assert back.returncode == 0, back.stderr
    assert old in verdicts(kv.config())
