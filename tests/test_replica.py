"""Scan a streaming replica, act on the primary (`scan_database_url`).

A real PostgreSQL hot standby of the test server (kit.replica) is scanned; the reap re-checks and acts on the
primary. With the standby's replay paused (a deterministic lag), a token issued on the primary after the
standby's snapshot keeps its client alive: the standby's plan names it an orphan, the primary's re-check skips it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from kit.cli import assert_errors, run_cli
from kit.config import make_config
from kit.databases import client_ids, snapshot
from kit.ledger import runs, tombstones
from kit.schemas.authlib import DAY, HOUR, AuthlibDB, fill_families
from kit.schemas.keycloak import Keycloak, KeycloakStandIn
from reaper.backends import open_backend
from reaper.commands import apply, check, plan, report, restore
from reaper.config import load_config
from reaper.errors import ConfigError, DatabaseError
from reaper.service.app import Service

PASSWORD = "s3cr3t-Pa55"  # trust authentication ignores it; it must never be printed


def _with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def _issue_live_token(engine: sa.Engine, client_id: str) -> None:
    """What the auth server does when a client comes back: a fresh token, issued now, on the primary."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_token (client_id, token_type, access_token, refresh_token, scope, issued_at,"
                " access_token_revoked_at, refresh_token_revoked_at, expires_in)"
                " VALUES (:c, 'Bearer', 'after-the-snapshot', 'r-after-the-snapshot', 'openid',"
                " CAST(EXTRACT(EPOCH FROM now()) AS integer), 0, 0, :ttl)"
            ),
            {"c": client_id, "ttl": HOUR},
        )


@pytest.mark.slow
def test_a_lagging_replica_plans_the_client_and_the_primary_keeps_it(pg_db, pg_replica):
    fams = fill_families(AuthlibDB(pg_db.engine), families=3, orphans_each=4, seed=15)
    orphans = {c for f in fams for c in f.orphans}
    survivors = {f.survivor for f in fams}
    pg_replica.catch_up()
    scan_url = _with_password(pg_replica.url(pg_db.url))
    config = make_config(_with_password(pg_db.url), scan_database_url=scan_url)
    replica = sa.create_engine(scan_url)
    came_back = fams[0].orphans[-1]
    pg_replica.pause()
    try:
        _issue_live_token(pg_db.engine, came_back)  # after the standby's snapshot: it cannot see this token

        the_plan = plan(config)
        # The plan is the replica's: the client that came back on the primary is an orphan there.
        assert {c.client_id for c in the_plan.candidates} == orphans
        before = snapshot(replica)

        result = apply(config, the_plan)

        assert result.skipped["changed_since_scan"] == 1, result.skipped
        assert client_ids(pg_db.engine) == survivors | {came_back}, "the re-check on the primary kept it"
        assert {t.client_id for t in tombstones(pg_db.engine)} == orphans - {came_back}
        (run,) = runs(pg_db.engine)
        assert (run.status, run.acted) == ("ok", len(orphans) - 1)
        assert snapshot(replica) == before, "nothing was written through the replica (it replays nothing now)"
    finally:
        pg_replica.resume()
    pg_replica.catch_up()
    assert client_ids(replica) == survivors | {came_back}, "the primary's reap reached the replica by replication"
    assert plan(config).candidates == [], "scanned again, the replica sees a live client and nothing to reap"

    # Restore goes to the primary, and reaches the replica the same way.
    restored = restore(config, run_id=run.id)
    assert len(restored.restored) == len(orphans) - 1
    assert client_ids(pg_db.engine) == orphans | survivors
    pg_replica.catch_up()
    assert client_ids(replica) == orphans | survivors
    replica.dispose()


@pytest.mark.slow
def test_report_and_check_from_the_replica_name_it_without_its_password(pg_db, pg_replica, tmp_path):
    fill_families(AuthlibDB(pg_db.engine), families=2, orphans_each=3, seed=16)
    pg_replica.catch_up()
    scan_url = _with_password(pg_replica.url(pg_db.url))
    config = make_config(_with_password(pg_db.url), scan_database_url=scan_url)

    snap = report(config)
    assert (
        snap.database == f"postgresql+psycopg://postgres:***@127.0.0.1:{pg_replica.port}/{make_url(pg_db.url).database}"
    )
    assert snap.clients == 8
    # A report never connects to the primary: with database_url unreachable it reads the replica all the same.
    nowhere = make_url(pg_db.url).set(port=_free_port()).render_as_string(hide_password=False)
    assert report(make_config(nowhere, scan_database_url=scan_url)).clients == 8

    _, findings = check(config)
    said = [f for f in findings if f.code == "replica"]
    assert [f.level for f in said] == ["info"], said
    assert "a read-only standby replaying" in said[0].message and f":{pg_replica.port}/" in said[0].message

    pg_replica.pause()
    try:
        _, findings = check(config)
        assert [f.level for f in findings if f.code == "replica"] == ["info", "warning"]
        assert "replay is paused" in next(f.message for f in findings if f.level == "warning" and f.code == "replica")
    finally:
        pg_replica.resume()

    # The scan URL may name the primary itself: allowed, and said.
    _, findings = check(make_config(pg_db.url, scan_database_url=_with_password(pg_db.url)))
    (same,) = [f for f in findings if f.code == "replica"]
    assert same.level == "info" and "points at database_url's own server" in same.message

    for args in (["check", "--format", "json"], ["report", "--format", "json"]):
        done = run_cli([*args, "--database-url", config.database_url, "--scan-database-url", scan_url], tmp_path)
        assert done.returncode in (0, 7), done.stderr  # 7: check's warnings (Authlib's missing indexes)
        assert PASSWORD not in done.stdout + done.stderr
        assert f"postgres:***@127.0.0.1:{pg_replica.port}/" in done.stdout


@pytest.mark.slow
def test_serve_scans_the_replica_and_reaps_and_locks_on_the_primary(pg_db, pg_replica):
    fams = fill_families(AuthlibDB(pg_db.engine), families=2, orphans_each=3, seed=17)
    orphans = {c for f in fams for c in f.orphans}
    pg_replica.catch_up()
    scan_url = pg_replica.url(pg_db.url)
    config = load_config(
        None,
        {
            "database_url": pg_db.url,
            "scan_database_url": scan_url,
            "policy": {"max_fraction": 1.0, "pause": 0, "late_token_sweep": 0},
            "service": {"port": 0, "bind_address": "127.0.0.1", "reap": True},
        },
        environ={},
    )
    came_back = fams[1].orphans[0]
    pg_replica.pause()
    service = Service(config)
    try:
        _issue_live_token(pg_db.engine, came_back)
        service.tick()
        assert service.lock is not None, "the tick led"
        held = sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        with pg_db.engine.connect() as conn:
            assert conn.execute(held).scalar() == 1, "the run lock is held on the primary"
        replica = sa.create_engine(scan_url)
        with replica.connect() as conn:
            assert conn.execute(held).scalar() == 0, "and not on the replica"
        replica.dispose()
        with pg_db.engine.connect() as conn:
            planned = conn.execute(sa.text("SELECT planned FROM dcr_reaper_runs")).scalar_one()
        assert planned == len(orphans), "the tick's plan is the replica's: the client that came back is in it"
        assert client_ids(pg_db.engine) == {f.survivor for f in fams} | {came_back}
        assert {t.client_id for t in tombstones(pg_db.engine)} == orphans - {came_back}
    finally:
        service.stop()
        pg_replica.resume()


@pytest.mark.slow
def test_keycloak_scans_the_replica_and_rechecks_sessions_on_the_primary(pg_db, pg_replica, tmp_path: Path):
    kc = Keycloak(pg_db.engine)
    realm = kc.realm("mcp")
    keys = {}
    for i in range(3):
        keys[i] = kc.client(
            realm, f"old{i}", "Claude Code (kc)", [f"http://localhost:{50100 + i}/cb"], registered_age=6 * DAY
        )
        kc.session(realm, keys[i], offline=True, refreshed_age=(36 - i) * DAY)
    live = kc.client(realm, "new", "Claude Code (kc)", ["http://localhost:50200/cb"], registered_age=2 * HOUR)
    kc.session(realm, live, offline=True, refreshed_age=60)
    pg_replica.catch_up()
    (tmp_path / "ledger.sqlite").touch()
    pg_replica.pause()
    try:
        kc.session(realm, keys[1], offline=True, refreshed_age=5)  # on the primary, after the replica's snapshot
        with KeycloakStandIn(kc) as standin:
            config = make_config(
                pg_db.url,
                profile="keycloak",
                scan_database_url=pg_replica.url(pg_db.url),
                options={"realm": "mcp"},
                keycloak={"url": standin.url, "client_id": standin.client_id, "client_secret": standin.secret},
                ledger={"url": f"sqlite:///{tmp_path / 'ledger.sqlite'}"},
            )
            the_plan = plan(config)
            assert {c.client_id for c in the_plan.candidates} == {"old0", "old1", "old2"}
            result = apply(config, the_plan)
        assert result.skipped["changed_since_scan"] == 1 and result.total_acted == 2
        deleted = {path.rsplit("/", 1)[-1] for method, path in standin.calls if method == "DELETE"}
        assert deleted == {keys[0], keys[2]}
    finally:
        pg_replica.resume()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_an_unreachable_replica_is_one_line_naming_the_scan_url(tmp_path: Path):
    scan_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/test"
    primary = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/test"  # a report never connects to it
    done = run_cli(["report", "--database-url", primary, "--scan-database-url", scan_url], tmp_path)
    (line,) = assert_errors(done, DatabaseError.exit_code)
    assert line.startswith("cannot connect to scan_database_url postgresql+psycopg://postgres:***@127.0.0.1:"), line
    assert PASSWORD not in done.stderr + done.stdout


def test_readiness_names_the_replica_that_does_not_answer(pg_db):
    scan_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/test"
    backend = open_backend(make_config(pg_db.url, scan_database_url=scan_url))
    try:
        with pytest.raises(DatabaseError) as err:
            backend.ping()  # what /readyz asks: the primary answers, the replica does not
    finally:
        backend.close()
    assert str(err.value).startswith("scan_database_url postgresql+psycopg://postgres:***@127.0.0.1:")
    assert PASSWORD not in str(err.value)


def test_the_setting_comes_from_the_file_the_environment_or_the_flag(tmp_path: Path):
    env = {"DCR_REAPER_DATABASE_URL": "postgresql://p@h/db", "DCR_REAPER_SCAN_DATABASE_URL": "postgresql://r@h2/db"}
    assert load_config(None, environ=env).scan_database_url == "postgresql://r@h2/db"
    flag = load_config(None, {"scan_database_url": "postgresql://f@h3/db"}, environ=env)
    assert flag.scan_database_url == "postgresql://f@h3/db"
    with pytest.raises(ConfigError, match="DCR_REAPER_SCAN_DATABASE_URL: scan_database_url: needs database_url"):
        load_config(None, environ={"DCR_REAPER_SCAN_DATABASE_URL": "postgresql://r@h2/db"})
    with pytest.raises(ConfigError, match="scan_database_url: empty"):
        load_config(None, {"database_url": "postgresql://p@h/db", "scan_database_url": " "}, environ={})


def test_a_replica_of_another_kind_of_database_or_a_bad_url_is_refused_by_name(sqlite_db):
    def backend(scan: str) -> object:
        return open_backend(make_config(sqlite_db.url, scan_database_url=scan))

    with pytest.raises(ConfigError, match="scan_database_url: a replica of database_url's sqlite database is sqlite"):
        backend("postgresql://r@127.0.0.1/db")
    with pytest.raises(ConfigError, match="scan_database_url: unsupported database 'oracle'"):
        backend("oracle://r@127.0.0.1/db")
    with pytest.raises(ConfigError, match="scan_database_url: not a database URL"):
        backend("postgresql://r@127.0.0.1:port/db")


def test_the_key_value_backend_refuses_a_scan_replica(tmp_path: Path):
    config = make_config(str(tmp_path), profile="fastmcp-oauth-proxy", scan_database_url="redis://127.0.0.1/1")
    with pytest.raises(ConfigError, match="scan_database_url: profile 'fastmcp-oauth-proxy' reads a key-value store"):
        open_backend(config)
