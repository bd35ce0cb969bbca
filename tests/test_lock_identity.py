"""One actor is one database, not one URL (S6): the run lock's identity is what the server says the database is.

Every route to one database (127.0.0.1, localhost, the Unix socket; for SQLite a symlink or a relative path) gives
one lock; two `reap --apply` through different routes at once: exactly one acts, the other exits 4. A lock
session stranded behind a black hole is ended by the server within `database.stranded_after`, and a session of
our own that we gave up on is ended by our next attempt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from kit.cli import kill9, poll, run_cli, start_cli
from kit.config import write_config
from kit.databases import TestDB, client_ids, pg_advisory_locks, server_db
from kit.ledger import runs, tombstone_count, tombstones
from kit.proxy import FaultProxy, pg_port_of, via_proxy
from kit.schemas.authlib import AuthlibDB, fill_families
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.db import Timeouts, make_engine
from reaper.demo import build_demo


def _route(url: str, **changes: object) -> str:
    return make_url(url).set(**changes).render_as_string(hide_password=False)  # type: ignore[arg-type]


def _server_routes(db: TestDB) -> dict[str, str]:
    """The same database reached by IP address, by host name and, where the server has one, by its socket."""
    routes = {"127.0.0.1": _route(db.url, host="127.0.0.1"), "localhost": _route(db.url, host="localhost")}
    with db.engine.connect() as conn:
        if db.kind == "postgresql":
            dirs = str(conn.execute(sa.text("SHOW unix_socket_directories")).scalar() or "")
            sock_dir = next((d.strip() for d in dirs.split(",") if d.strip() and Path(d.strip()).is_dir()), None)
            if sock_dir:
                routes["socket"] = _route(db.url, host=None, port=None, query={"host": sock_dir})
        else:
            sock = conn.execute(sa.text("SELECT @@socket")).scalar()
            if sock and Path(str(sock)).exists():
                routes["socket"] = _route(db.url, host="localhost", query={"unix_socket": str(sock)})
    return routes


class Locks:
    """RunLocks on several URLs, each on its own engine; everything closed at the end."""

    def __init__(self) -> None:
        self.engines: list[sa.Engine] = []
        self.locks: list[RunLock] = []

    def on(self, url: str, bounds: Timeouts | None = None) -> RunLock:
        engine = make_engine(url, readonly=False)
        self.engines.append(engine)
        lock = RunLock(engine, lock_name("dcr_reaper_"), bounds)
        self.locks.append(lock)
        return lock

    def close(self) -> None:
        for lock in self.locks:
            lock.discard()
        for engine in self.engines:
            engine.dispose()


@pytest.fixture
def locks() -> Iterator[Locks]:
    held = Locks()
    try:
        yield held
    finally:
        held.close()


def _one_lock_for_every_route(routes: dict[str, str], locks: Locks) -> None:
    assert len(routes) >= 2
    first, *others = [locks.on(url) for url in routes.values()]
    assert first.try_acquire()
    for lock, route in zip(others, list(routes)[1:], strict=True):
        assert not lock.try_acquire(), f"via {route}: a second lock on the same database"
        assert lock.key == first.key and lock.name == first.name
        assert "pid" in lock.holder() or "connection" in lock.holder()
    first.release()
    assert others[0].try_acquire(), "released with its holder"


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_every_route_to_a_server_database_is_one_lock(server, request, locks):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    routes = _server_routes(db)
    print("routes:", sorted(routes))
    _one_lock_for_every_route(routes, locks)
    assert ("PostgreSQL cluster" if server == "postgresql" else "MySQL/MariaDB server") in locks.locks[0].name


def test_another_database_on_the_same_server_is_another_lock(pg_db, locks):
    gen = server_db("postgresql")
    second = next(gen)
    try:
        a, b = locks.on(pg_db.url), locks.on(second.url)
        assert a.try_acquire() and b.try_acquire(), "two databases of one cluster: two locks"
        assert a.key != b.key
    finally:
        locks.close()
        gen.close()


def test_every_path_to_a_sqlite_file_is_one_lock(tmp_path, locks, monkeypatch):
    (tmp_path / "data").mkdir()
    db = build_demo(tmp_path / "data" / "oauth.db")
    (tmp_path / "link.db").symlink_to(db)
    monkeypatch.chdir(tmp_path / "data")
    routes = {
        "path": f"sqlite:///{db}",
        "symlink": f"sqlite:///{tmp_path / 'link.db'}",
        "relative": "sqlite:///oauth.db",
        "dotted": f"sqlite:///{tmp_path / 'data' / '..' / 'data' / 'oauth.db'}",
    }
    first, *others = [locks.on(url) for url in routes.values()]
    assert first.try_acquire()
    for lock, route in zip(others, list(routes)[1:], strict=True):
        assert not lock.try_acquire(), f"via the {route}: a second lock on the same file"
        assert f"pid {os.getpid()}" in lock.holder()
    assert sorted(p.name for p in db.parent.iterdir() if p.name.endswith(".lock")) == ["oauth.db.dcr-reaper.lock"]
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir()), "none beside the symlink"
    assert "inode" in first.name


def test_sqlite_lock_dir_holds_one_file_per_database(tmp_path, locks):
    db = build_demo(tmp_path / "oauth.db")
    (tmp_path / "link.db").symlink_to(db)
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    engines = [make_engine(f"sqlite:///{p}", readonly=False) for p in (db, tmp_path / "link.db")]
    locks.engines += engines
    a, b = (RunLock(e, lock_name("dcr_reaper_"), lock_dir=str(lock_dir)) for e in engines)
    locks.locks += [a, b]
    assert a.try_acquire() and not b.try_acquire()
    (only,) = lock_dir.iterdir()
    assert only.name.startswith("oauth.db.") and only.name.endswith(".dcr-reaper.lock")
    assert not Path(f"{db}.dcr-reaper.lock").exists()


# --- two reapers, two routes, one database -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_two_reap_apply_via_127_0_0_1_and_localhost_exactly_one_acts(server, request, tmp_path):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=5, orphans_each=10, seed=45)
    planned = {c for f in fams for c in f.orphans}
    # 13 batches, 0.3 s apart: whichever takes the lock holds it for seconds, long after the other has planned.
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 4, "pause": 0.3})
    procs = {}
    for route in ("127.0.0.1", "localhost"):
        url = _route(db.url, host=route)
        args = ["reap", "--apply", "--no-progress", "--profile", "authlib", "--database-url", url, "--config", str(cfg)]
        procs[route] = start_cli(args, tmp_path)
    results = {}
    try:
        for route, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[route] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill9(proc)
    codes = sorted(rc for rc, _, _ in results.values())
    assert codes == [0, 4], results
    (winner,) = [r for r in results.values() if r[0] == 0]
    (loser,) = [r for r in results.values() if r[0] == 4]
    assert "APPLIED" in winner[1]
    assert "holds the lock" in loser[2] and "Traceback" not in loser[2] and loser[1] == ""
    (run,) = runs(db.engine)  # the loser started no run and wrote no tombstone
    assert run.status == "ok" and run.acted == len(planned)
    assert {t.run_id for t in tombstones(db.engine)} == {run.id}
    assert client_ids(db.engine) == {f.survivor for f in fams}


# --- a lock session stranded behind a black hole ------------------------------------------------------------


@pytest.mark.slow
def test_stranded_lock_of_a_killed_reaper_is_freed_within_stranded_after(pg_db, tmp_path):
    """kill -9 a `reap --apply` whose connections go through a black hole: the server never sees them close.
    The lock is free again within database.stranded_after (not the two hours of the kernel's keepalive)."""
    adb = AuthlibDB(pg_db.engine)
    fill_families(adb, families=5, orphans_each=10, seed=46)
    stranded = 6.0
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 2, "pause": 0.3})
    with cfg.open("a") as fh:
        fh.write(f'[database]\nstranded_after = "{stranded:g}s"\nread_timeout = "2s"\n')

    def args(url: str) -> list[str]:
        return ["reap", "--apply", "--no-progress", "--profile", "authlib", "--database-url", url, "--config", str(cfg)]

    with FaultProxy(pg_port_of(pg_db.url)) as proxy:
        proc = start_cli(args(via_proxy(pg_db.url, proxy)), tmp_path)
        try:
            poll(lambda: tombstone_count(pg_db.engine) > 0, 60, "the reaper to be acting", proc=proc, interval=0.01)
            proxy.blackhole()
            kill9(proc)
            killed = time.monotonic()
        finally:
            if proc.poll() is None:
                kill9(proc)
        assert pg_advisory_locks(pg_db.engine) == 1, "the dead reaper's session still holds the lock"
        second = run_cli(args(pg_db.url), tmp_path)
        assert second.returncode == 4, second.stderr
        poll(lambda: pg_advisory_locks(pg_db.engine) == 0, stranded + 10, "the server to free the stranded lock")
        freed = time.monotonic() - killed
        print(f"stranded lock freed {freed:.1f}s after kill -9 (stranded_after {stranded:g}s)")
        assert freed <= stranded + 1.5
        third = run_cli(args(pg_db.url), tmp_path)
        assert third.returncode == 0, third.stderr


@pytest.mark.slow
def test_a_session_we_gave_up_on_is_ended_by_our_next_attempt(pg_db, locks):
    """Our lock connection goes silent (black hole): the lock counts as lost after one check-in, though the server
    still holds the session. Our next attempt ends that session (it is ours: same pid and start time) and takes
    the lock, instead of standing by behind itself."""
    with FaultProxy(pg_port_of(pg_db.url)) as proxy:
        first = locks.on(via_proxy(pg_db.url, proxy), Timeouts(stranded_after=3.0))  # check-ins of at most 1 s
        assert first.try_acquire()
        assert first._conn is not None
        first._conn.execute(sa.text("SET idle_session_timeout = 0"))  # the server would not end it by itself
        first._conn.commit()
        proxy.blackhole()
        t0 = time.monotonic()
        assert not first.alive()
        lost_after = time.monotonic() - t0
        print(f"lock counted lost {lost_after:.2f}s into the black hole")
        assert lost_after < 2.0
        assert pg_advisory_locks(pg_db.engine) == 1, "the server still holds the abandoned session"
        again = locks.on(pg_db.url)  # our own next attempt, direct this time
        assert again.try_acquire(), "our abandoned session was ended and the lock taken"
        assert again.key == first.key
        assert pg_advisory_locks(pg_db.engine) == 1


@pytest.mark.slow
def test_three_serve_replicas_by_three_routes_give_one_leader(pg_db, tmp_path):
    """The issue's three replicas, each reaching the database its own way: one leader, two standbys."""
    from kit.cli import ServeProcess
    from kit.prometheus import value
    from kit.schemas.authlib import fill_churning

    fill_churning(pg_db.engine, families=2, orphans_per_family=3)
    routes = _server_routes(pg_db)
    procs = []
    try:
        for route, url in routes.items():
            (tmp_path / route).mkdir()
            args = ["--database-url", url, "--profile", "authlib", "--interval", "1s"]
            procs.append(ServeProcess(args, tmp_path / route, route))
        for proc in procs:
            proc.wait_started()

        def leaders() -> list[float]:
            return [value(p.metrics(), "dcr_leader") or 0.0 for p in procs]

        poll(lambda: sum(leaders()) == 1, 20, "one leader")
        for _ in range(6):  # several ticks each: still one
            time.sleep(0.5)
            assert sum(leaders()) == 1, leaders()
        assert pg_advisory_locks(pg_db.engine) == 1
    finally:
        for proc in procs:
            proc.close()
