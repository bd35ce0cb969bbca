"""`dcr-reaper serve` for real: subprocesses scraped over HTTP, promtool on the scrape, leader failover after
kill -9, SIGTERM in the middle of a reap, and database faults injected through a TCP proxy the test controls.

Every wait is a bounded poll; processes, engines, sockets and services are closed in `finally` blocks.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kit.cli import ServeProcess, http_get, poll
from kit.databases import counts_by_client, pg_advisory_locks
from kit.ledger import tombstone_count
from kit.prometheus import promtool_check, value
from kit.proxy import FaultProxy, pg_port_of, via_proxy
from kit.schemas.authlib import fill_churning
from reaper import commands
from reaper.analysis.model import VERDICTS
from reaper.backends import open_backend
from reaper.config import Config, load_config
from reaper.demo import CHURN_REGISTRATIONS, build_demo
from reaper.service import Service

pytestmark = pytest.mark.slow  # real `serve` processes, failovers, faults: seconds each

DEMO_VERDICTS = {"live": 2, "orphan": CHURN_REGISTRATIONS - 1, "abandoned": 1, "young": 1}


def _toml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _check_scrape(proc: ServeProcess) -> str:
    """After the first successful scan: /metrics passes promtool, /healthz and /readyz answer 200."""
    text = proc.wait_metric("dcr_last_success_timestamp_seconds", lambda v: v > 0, timeout=20)
    promtool_check(text)
    assert proc.get("/healthz") == (200, "ok\n")
    status, why = proc.get("/readyz")
    assert status == 200, why
    assert why.startswith("leader: last successful scan")
    assert value(text, "dcr_leader") == 1
    assert value(text, "dcr_scan_failures_total") == 0
    assert proc.get("/nope")[0] == 404
    return text


# --- 1 and 7: a real scrape, and the per-scan log line --------------------------------------------------


def test_serve_sqlite_demo_scrape_promtool_health_and_scan_logs(tmp_path):
    db = build_demo(tmp_path / "demo.sqlite")
    args = ["--database-url", f"sqlite:///{db}", "--profile", "mcp-memory-service", "--interval", "1s"]
    with ServeProcess(args, tmp_path) as proc:
        proc.wait_started()
        text = _check_scrape(proc)
        for verdict in VERDICTS:
            assert value(text, "dcr_clients", verdict=str(verdict)) == DEMO_VERDICTS.get(str(verdict), 0)
        assert value(text, "dcr_family_clients", family="claude code (scalarly-memory)", verdict="all") == 32
        assert value(text, "dcr_families", state="churning") == 1
        assert value(text, "dcr_last_scan_clients") == 35
        # A few more scans on the interval, then a clean SIGTERM.
        text = proc.wait_metric("dcr_scans_total", lambda v: v >= 3, timeout=10)
        scanned = value(text, "dcr_scans_total")
        rc, took = proc.terminate(timeout=10)
        assert rc == 0, proc.output()
        assert took < 10, f"SIGTERM to exit took {took:.1f}s"
        out = proc.output()
    assert "Traceback" not in out, out
    scans = proc.events("scan")
    # One line per scan: at least as many as the scrape counted (a scan may have finished after it), not more
    # than the 1 s interval allows for the time between the scrape and the stop.
    assert scanned is not None and scanned <= len(scans) <= scanned + 2, (scanned, scans)
    for i, ev in enumerate(scans):
        assert ev["clients"] == 35
        assert ev["by_verdict"] == DEMO_VERDICTS
        assert sum(ev["by_verdict"].values()) == ev["clients"]
        assert ev["families"] == 4 and ev["problems"] == 0
        assert ev["new_registrations"] == (None if i == 0 else 0)
        assert isinstance(ev["duration_seconds"], int | float)
    assert [e["event"] for e in proc.events()][-2:] == ["signal", "stopped"]
    assert proc.events("stopped") == [{"event": "stopped", "clean": True}]


def test_serve_postgres_authlib_scrape_promtool_and_health(tmp_path, pg_db):
    fill_churning(pg_db.engine, families=3, orphans_per_family=5, name='Claude "Code" #{f}')
    args = ["--database-url", pg_db.url, "--profile", "authlib", "--interval", "1s"]
    with ServeProcess(args, tmp_path) as proc:
        proc.wait_started()
        text = _check_scrape(proc)
        assert value(text, "dcr_clients", verdict="orphan") == 15
        assert value(text, "dcr_clients", verdict="live") == 3
        assert value(text, "dcr_last_scan_clients") == 18
        for f in range(3):
            assert value(text, "dcr_family_clients", family=f'claude "code" #{f}', verdict="all") == 6
            assert value(text, "dcr_family_clients", family=f'claude "code" #{f}', verdict="orphan") == 5
        rc, _ = proc.terminate(timeout=10)
        assert rc == 0, proc.output()
    scans = proc.events("scan")
    assert scans and all(e["by_verdict"] == {"live": 3, "orphan": 15} for e in scans)


# --- 5: one leader; kill -9 it and the standby takes over within one interval ------------------------------


def test_two_replicas_one_leader_and_failover_after_kill_9(tmp_path, pg_db):
    fill_churning(pg_db.engine, families=2, orphans_per_family=3)
    interval = 1.0
    args = ["--database-url", pg_db.url, "--profile", "authlib", "--interval", f"{interval}s"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ServeProcess(args, tmp_path / "a", "a") as a, ServeProcess(args, tmp_path / "b", "b") as b:
        a.wait_started()
        b.wait_started()

        def leaders() -> tuple[float | None, float | None]:
            return value(a.metrics(), "dcr_leader"), value(b.metrics(), "dcr_leader")

        poll(lambda: 1 in leaders(), 15, what="a leader")
        time.sleep(1.5 * interval)  # both have ticked at least once since
        for _ in range(3):
            assert sorted(leaders()) == [0, 1], "exactly one replica leads"
            time.sleep(interval / 3)
        leader, standby = (a, b) if leaders() == (1, 0) else (b, a)
        standby_text = standby.metrics()
        assert value(standby_text, "dcr_scans_total") == 0, "a standby does not scan"
        assert standby.get("/readyz") == (200, "standby: database answers\n")
        promtool_check(standby_text)
        assert pg_advisory_locks(pg_db.engine) == 1

        leader.proc.kill()  # SIGKILL: no cleanup, the database must notice the dead connection
        t0 = time.monotonic()
        leader.proc.wait(timeout=10)
        text = standby.wait_metric("dcr_leader", lambda v: v == 1, timeout=interval + 3)
        took = time.monotonic() - t0
        assert took <= interval + 1.5, f"takeover took {took:.2f}s with a {interval}s interval"
        standby.wait_metric("dcr_last_success_timestamp_seconds", lambda v: v > 0, timeout=interval + 3)
        assert value(text, "dcr_scan_failures_total") == 0
        assert [e["event"] for e in standby.events() if e["event"].startswith("leadership")] == ["leadership_acquired"]
        assert pg_advisory_locks(pg_db.engine) == 1
        rc, _ = standby.terminate(timeout=10)
        assert rc == 0, standby.output()
    assert pg_advisory_locks(pg_db.engine) == 0, "a clean stop releases the lock"


# --- 6: SIGTERM in the middle of a reap --------------------------------------------------------------------


def test_sigterm_during_reap_finishes_the_batch_and_exits_within_grace(tmp_path, pg_db):
    data = fill_churning(pg_db.engine, families=30, orphans_per_family=100)
    batch, grace = 20, 10.0
    cfg = _toml(
        tmp_path / "reaper.toml",
        f"""
database_url = "{pg_db.url}"
profile = "authlib"
[classify]
young_for = "1s"
[policy]
batch_size = {batch}
pause = 0.2
max_per_run = 100000
max_fraction = 1.0
min_age = "60s"
late_token_sweep = "1s"
[service]
reap = true
grace = "{grace:g}s"
scan_interval = "1h"
""",
    )
    tomb = "dcr_reaper_tombstones"

    with ServeProcess(["--config", cfg], tmp_path) as proc:
        proc.wait_started()
        proc.poll(lambda: tombstone_count(pg_db.engine) >= 3 * batch, 30, "the reap to get going")
        rc, took = proc.terminate(timeout=grace + 5)
        assert rc == 0, proc.output()
        assert took < grace, f"exit took {took:.1f}s, grace is {grace}s"
        out = proc.output()
    assert "Traceback" not in out, out

    clients = counts_by_client(pg_db.engine, "oauth2_client")
    tokens = counts_by_client(pg_db.engine, "oauth2_token")
    codes = counts_by_client(pg_db.engine, "oauth2_code")
    with pg_db.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT client_id, state, action, run_id FROM {tomb}"))
        stones = {r[0]: r for r in rows}
        runs = list(conn.execute(sa.text("SELECT status, acted, planned FROM dcr_reaper_runs")))
    gone = set(data.orphans) - set(clients)
    assert 0 < len(gone) < len(data.orphans), "SIGTERM stopped the run part-way"
    assert len(gone) % batch == 0, f"{len(gone)} reaped: not whole batches of {batch}"
    assert set(stones) == gone, "a tombstone for every reaped client and for nothing else"
    assert {(s.state, s.action) for s in stones.values()} == {("done", "delete")}
    for cid in gone:
        assert cid not in tokens and cid not in codes, f"{cid} reaped but its children are left"
    for cid, (n_tok, n_code) in data.orphans.items():
        if cid not in gone:
            assert (tokens.get(cid), codes.get(cid)) == (n_tok, n_code), f"{cid} kept but lost children"
    for cid in data.survivors:
        assert clients.get(cid) == 1 and tokens.get(cid) == 1
    assert [(r.status, r.acted, r.planned) for r in runs] == [("stopped", len(gone), len(data.orphans))]
    reaps = proc.events("reap")
    assert len(reaps) == 1 and reaps[0]["stopped"] is True and reaps[0]["acted"] == len(gone)
    assert proc.events("stopped") == [{"event": "stopped", "clean": True}]


def test_sigterm_when_the_batch_outlasts_grace_keeps_the_lock_until_the_run_ends(tmp_path, pg_db):
    """stop() gives up waiting after the grace, but the reap thread is still inside a batch: the lock must
    stay held (S6) until the run ends, or another replica could start reaping alongside it."""
    fill_churning(pg_db.engine, families=10, orphans_per_family=40)
    batch = 20
    with pg_db.engine.begin() as conn:  # every client DELETE statement now takes 3 s: a batch outlasts the grace
        conn.execute(
            sa.text(
                "CREATE FUNCTION slow_delete() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$"
                " LANGUAGE plpgsql"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER slow BEFORE DELETE ON oauth2_client FOR EACH STATEMENT EXECUTE FUNCTION slow_delete()"
            )
        )
    cfg = _toml(
        tmp_path / "reaper.toml",
        f"""
database_url = "{pg_db.url}"
profile = "authlib"
[policy]
batch_size = {batch}
pause = "0.1s"
max_per_run = 100000
max_fraction = 1.0
min_age = "60s"
late_token_sweep = "0.5s"
statement_timeout = "60s"
[service]
reap = true
grace = "0.5s"
scan_interval = "1h"
""",
    )

    def deleting() -> bool:
        return bool(_sessions(pg_db.engine, "state = 'active' AND query LIKE 'DELETE FROM oauth2_client%'"))

    with ServeProcess(["--config", cfg], tmp_path) as proc:
        proc.wait_started()
        proc.poll(deleting, 30, "a batch inside its slow client DELETE")
        proc.proc.send_signal(signal.SIGTERM)
        poll(lambda: proc.events("stopped"), 5, what="stop() to give up after the grace")
        assert proc.events("stopped") == [{"event": "stopped", "clean": False}]
        assert not proc.events("reap"), "the batch outlasts the grace: the run has not ended yet"
        assert pg_advisory_locks(pg_db.engine) == 1, "the lock was released while the reap was still running"
        rc = proc.proc.wait(timeout=20)
        out = proc.output()
    assert "Traceback" not in out, out
    assert rc == 0
    assert proc.events("reap")[0]["stopped"] is True
    assert tombstone_count(pg_db.engine) % batch == 0
    assert pg_advisory_locks(pg_db.engine) == 0


def test_sigterm_during_a_long_pause_stops_at_once(tmp_path, pg_db):
    """The pause between batches wakes on SIGTERM: the run ends between batches, within the grace."""
    fill_churning(pg_db.engine, families=10, orphans_per_family=40)
    batch = 20
    cfg = _toml(
        tmp_path / "reaper.toml",
        f"""
database_url = "{pg_db.url}"
profile = "authlib"
[policy]
batch_size = {batch}
pause = "30s"
max_per_run = 100000
max_fraction = 1.0
min_age = "60s"
late_token_sweep = "30s"
[service]
reap = true
grace = "5s"
scan_interval = "1h"
""",
    )
    with ServeProcess(["--config", cfg], tmp_path) as proc:
        proc.wait_started()
        proc.poll(lambda: tombstone_count(pg_db.engine) >= batch, 20, "the first batch")  # now in its pause
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rc = proc.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    assert rc == 0 and elapsed < 5, elapsed
    assert proc.events("stopped") == [{"event": "stopped", "clean": True}]
    assert proc.events("reap")[0]["stopped"] is True
    # policy.batches_in_flight = 2: two batches started together, each then rests in its pause; none after.
    assert tombstone_count(pg_db.engine) == 2 * batch
    assert pg_advisory_locks(pg_db.engine) == 0


# --- 4: faults between the service and PostgreSQL --------------------------------------------------


@pytest.fixture
def proxy(pg_db) -> Iterator[FaultProxy]:
    with FaultProxy(pg_port_of(pg_db.url)) as p:
        yield p


def _service_config(url: str, **service: object) -> Config:
    settings = {"port": 0, "bind_address": "127.0.0.1", "scan_interval": 0.5, "database_timeout": 1, "grace": 10}
    settings.update(service)
    return load_config(None, {"database_url": url, "profile": "authlib", "service": settings}, environ={})


class ServiceEvents:
    """The in-process service's JSON log events, in order (from pytest's log capture)."""

    def __init__(self, caplog: pytest.LogCaptureFixture):
        self.caplog = caplog

    def all(self) -> list[dict[str, object]]:
        return [json.loads(r.getMessage()) for r in self.caplog.records if r.name == "reaper.service"]

    def named(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.all() if e["event"] == name]


@pytest.fixture
def service_events(caplog: pytest.LogCaptureFixture) -> ServiceEvents:
    caplog.set_level(logging.INFO, logger="reaper.service")
    return ServiceEvents(caplog)


def _scrape(port: int) -> str:
    status, text = http_get(port, "/metrics")
    assert status == 200
    return text


def _scrape_until(port: int, name: str, pred, timeout: float) -> str:  # type: ignore[no-untyped-def]
    """Poll /metrics until sample `name` (0 when absent) satisfies pred; return that exposition."""

    def check() -> str | None:
        text = _scrape(port)
        return text if pred(value(text, name) or 0) else None

    return poll(check, timeout, what=f"{name} on :{port}")


def test_database_refused_at_start_then_recovers_without_restart(pg_db, proxy, service_events):
    fill_churning(pg_db.engine, families=2, orphans_per_family=4)
    proxy.refuse()
    service = Service(_service_config(via_proxy(pg_db.url, proxy)))
    service.start()
    try:
        port = service.port
        assert port != 0, "port 0 binds an ephemeral port and the service reports it"
        # Down: the process stays up, /readyz says why, failures count up, nothing was scanned.
        text = _scrape_until(port, "dcr_scan_failures_total", lambda v: v >= 3, 15)
        assert value(text, "dcr_last_success_timestamp_seconds") == 0
        assert value(text, "dcr_leader") == 0
        assert value(text, "dcr_clients", verdict="live") is None, "no snapshot, no snapshot gauges"
        promtool_check(text)
        assert http_get(port, "/healthz") == (200, "ok\n")
        status, why = http_get(port, "/readyz")
        assert status == 503 and why.startswith("database unreachable"), why
        assert proxy.refused >= 3
        failures_down = value(text, "dcr_scan_failures_total")

        # Back: it recovers by itself.
        proxy.accept()
        text = _scrape_until(port, "dcr_last_success_timestamp_seconds", lambda v: v > 0, 15)
        first_success = value(text, "dcr_last_success_timestamp_seconds")
        status, why = http_get(port, "/readyz")
        assert status == 200 and why.startswith("leader: last successful scan"), why
        assert value(text, "dcr_leader") == 1
        assert value(text, "dcr_clients", verdict="orphan") == 8
        later = _scrape_until(port, "dcr_last_success_timestamp_seconds", lambda v: v > first_success, 5)
        failures_up = value(later, "dcr_scan_failures_total")
        assert failures_up is not None and failures_down is not None
        assert failures_up - failures_down <= 1, "no failures once the database is back (one in flight)"
        promtool_check(later)
    finally:
        assert service.stop() is True
    # One scan line per successful scan, a failure line per failed attempt.
    assert len(service_events.named("scan")) == service.metrics.scans - service.metrics.failures
    failed = [e for e in service_events.all() if str(e["event"]).endswith("_failed")]
    assert len(failed) == service.metrics.failures
    assert service_events.named("leadership_acquired")


# Cutting connections mid-statement leaves psycopg server-side cursor objects that their driver could not close
# (SQLAlchemy swallows the failed close of a statement that failed): the connection is dead and nothing leaks on
# the server, but psycopg warns when it collects them. The test collects them itself, inside this marker, so the
# warning can never surface in a later test; every other warning stays an error.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function ServerCursorMixin.__del__:pytest.PytestUnraisableExceptionWarning"
)
def test_connection_cut_mid_scan_then_recovers(pg_db, proxy, service_events):
    fill_churning(pg_db.engine, families=100, orphans_per_family=100)  # ~3 MB of scan results
    # Every tick a full scan: an incremental tick streams a few kB, and the cut waits for 1 MB in one connection
    # (with one full scan in 12 ticks, that could take longer than the wait on a slow machine).
    service = Service(_service_config(via_proxy(pg_db.url, proxy), scan_interval=0.5, full_scan_every=1))
    service.start()
    port = service.port
    try:
        text = _scrape_until(port, "dcr_last_success_timestamp_seconds", lambda v: v > 0, 20)
        assert value(text, "dcr_clients", verdict="orphan") == 10000
        assert value(text, "dcr_scan_failures_total") == 0

        # One cut, in the middle of the scan's result stream (1 MB into one connection).
        proxy.arm_cut_after(1_000_000)
        poll(lambda: not proxy.armed, 15, what="the armed cut to fire")
        failed = poll(lambda: service_events.named("scan_failed"), 10, what="a scan_failed event")
        assert "scan of" in str(failed[0]["error"]) and "***" not in str(failed[0]["error"])
        cut_at = time.time()
        text = _scrape_until(port, "dcr_last_success_timestamp_seconds", lambda v: v > cut_at, 15)
        assert value(text, "dcr_scan_failures_total") >= 1
        assert value(text, "dcr_leader") == 1
        assert http_get(port, "/readyz")[0] == 200
        assert service_events.named("leadership_lost"), "the cut lock connection was noticed and re-taken"
        assert pg_advisory_locks(pg_db.engine) == 1

        # A storm: every connection cut every 100 ms for 2 s. Nothing crashes; it comes back afterwards.
        before = value(text, "dcr_scan_failures_total")
        storm_end = time.monotonic() + 2
        while time.monotonic() < storm_end:
            proxy.cut()
            time.sleep(0.1)
            assert http_get(port, "/healthz")[0] == 200
        storm_over = time.time()
        text = _scrape_until(port, "dcr_last_success_timestamp_seconds", lambda v: v > storm_over, 15)
        assert value(text, "dcr_scan_failures_total") > before
        assert value(text, "dcr_clients", verdict="orphan") == 10000
        assert http_get(port, "/readyz")[0] == 200
        promtool_check(text)
    finally:
        assert service.stop() is True
    gc.collect()  # cursors dropped by the cuts are collected here, inside this test and its warning filter
    assert len(service_events.named("scan")) == service.metrics.scans - service.metrics.failures


def test_ticks_hold_no_connection_between_them_and_keep_their_engines(pg_db):
    """`serve` closes its backend after each tick: no connection to the auth database stays open in between, and
    the next tick reuses the engines (their compiled statements and first-connect checks), not new ones."""
    fill_churning(pg_db.engine, families=2, orphans_per_family=4)
    config = _service_config(pg_db.url)
    backend = open_backend(config)

    def sessions() -> int:
        return _sessions(pg_db.engine, "datname = current_database() AND pid <> pg_backend_pid()")

    pg_db.engine.dispose()
    alone = sessions()
    try:
        snapshot, state = commands.tick(config, None, backend)
        backend.close()
        engines = dict(backend._engines)
        assert engines and sessions() == alone, "no connection kept after the tick"
        again, kept = commands.tick(config, state, backend, new_since=snapshot.newest_registration)
        assert kept is state and again.clients == snapshot.clients == 10
        backend.close()
        assert backend._engines == engines, "the same engines"
        assert all(e.pool.checkedin() == 0 and e.pool.checkedout() == 0 for e in engines.values())
        assert sessions() == alone
    finally:
        backend.close()


def _sessions(engine: sa.Engine, where: str) -> int:
    """PostgreSQL sessions (pg_stat_activity) matching a condition."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM pg_stat_activity WHERE {where}")).scalar_one())
