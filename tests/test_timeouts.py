"""Every connection's bounds, as the database and the socket see them (S10): keepalives and TCP_USER_TIMEOUT at
both ends, a bounded round trip, a server-side end for sessions that hold something, and the scan's statement
timeout."""

from __future__ import annotations

import inspect
import socket
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from kit.config import make_config
from reaper.backends.sql import SqlBackend
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.db import Timeouts, make_engine
from reaper.profiles import bind_profile

BOUNDS = Timeouts(connect=3, round_trip=1.0, keepalive_idle=7, keepalive_interval=2, keepalive_count=4,
                  user_timeout=9, stranded_after=12)  # fmt: skip


def test_psycopg_bounds_its_waits():
    """Every PostgreSQL round trip is bounded through psycopg's Connection.wait(timeout=...)."""
    assert "timeout" in inspect.signature(psycopg.Connection.wait).parameters, "pyproject's psycopg floor"


def _show(conn: sa.Connection, name: str) -> str:
    return str(conn.execute(sa.text(f"SHOW {name}")).scalar())


def test_postgres_sessions_carry_keepalives_and_timeouts_at_both_ends(pg_db):
    engines = {p: make_engine(pg_db.url, readonly=p == "read", bounds=BOUNDS, purpose=p) for p in ("read", "write")}
    try:
        for purpose, engine in engines.items():
            with engine.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
                assert (params["keepalives_idle"], params["keepalives_interval"], params["keepalives_count"]) == (
                    "7",
                    "2",
                    "4",
                )
                assert params["tcp_user_timeout"] == "9000" and params["connect_timeout"] == "3"
                assert (_show(conn, "tcp_keepalives_idle"), _show(conn, "tcp_keepalives_count")) == ("7", "4")
                assert _show(conn, "tcp_user_timeout") == "9000"  # milliseconds
                stranded = _show(conn, "idle_in_transaction_session_timeout")
                assert stranded == ("12s" if purpose == "write" else "0"), purpose
    finally:
        for engine in engines.values():
            engine.dispose()


def test_postgres_lock_session_is_ended_by_the_server_when_silent(pg_db):
    engine = make_engine(pg_db.url, readonly=False)
    lock = RunLock(engine, lock_name("dcr_reaper_"), BOUNDS)
    try:
        assert lock.try_acquire()
        assert lock._conn is not None
        assert _show(lock._conn, "idle_session_timeout") == "12s"
        assert lock.check_in == 4.0
    finally:
        lock.release()
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_a_round_trip_longer_than_the_bound_fails_and_the_pool_recovers(server, request):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    sleep = "SELECT pg_sleep(3)" if server == "postgresql" else "SELECT SLEEP(3)"
    engine = make_engine(db.url, readonly=True, bounds=BOUNDS)
    try:
        t0 = time.monotonic()
        with pytest.raises(DBAPIError), engine.connect() as conn:
            conn.execute(sa.text(sleep))
        took = time.monotonic() - t0
        print(f"{server}: a 3 s statement failed after {took:.2f}s (bound 1 s)")
        assert took < 2.0
        with engine.connect() as conn:  # the dropped connection is not handed out again
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_mariadb_sockets_and_sessions(mariadb_db):
    engines = {p: make_engine(mariadb_db.url, readonly=p == "read", bounds=BOUNDS, purpose=p) for p in ("read", "lock")}
    try:
        for purpose, engine in engines.items():
            with engine.connect() as conn:
                raw = conn.connection.dbapi_connection
                sock = raw._sock  # type: ignore[union-attr]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000
                assert raw._read_timeout == 1.0  # type: ignore[union-attr]
                wait = conn.execute(sa.text("SELECT @@session.wait_timeout")).scalar()
                assert (wait == 12) == (purpose == "lock"), (purpose, wait)
    finally:
        for engine in engines.values():
            engine.dispose()


def test_mariadb_connects_within_the_connect_bound_then_waits_a_round_trip(mariadb_db):
    """PyMySQL reads the server's greeting with its read timeout: connecting is bounded by the connect bound (the
    partition tests in test_chaos.py time it), and once connected a statement may take a whole round trip."""
    bounds = Timeouts(connect=1, round_trip=4.0)
    engine = make_engine(mariadb_db.url, readonly=True, bounds=bounds)
    given = make_engine(f"{mariadb_db.url}?read_timeout=7", readonly=True, bounds=bounds)
    try:
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection._read_timeout == 4.0  # type: ignore[union-attr]
            assert conn.execute(sa.text("SELECT SLEEP(2)")).scalar() == 0, "longer than connecting may take"
        with given.connect() as conn:
            assert conn.connection.dbapi_connection._read_timeout == 7, "a timeout in the URL wins"  # type: ignore[union-attr]
    finally:
        engine.dispose()
        given.dispose()


def test_a_connect_timeout_in_a_mysql_url_also_bounds_the_login():
    """A server that takes the connection and never sends its greeting: the URL's connect_timeout (1 s) bounds
    the wait, not the configured one (5 s)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    accepting.start()
    port = silent.getsockname()[1]
    engine = make_engine(
        f"mysql+pymysql://root@127.0.0.1:{port}/x?connect_timeout=1",
        readonly=True,
        bounds=Timeouts(connect=5, round_trip=30.0),
    )
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError), engine.connect():
            pass
        took = time.monotonic() - started
        assert held, "the connection was taken: the wait was for the greeting"
        assert took < 3.0, f"{took:.2f}s"
    finally:
        engine.dispose()
        for conn in held:
            conn.close()
        silent.close()


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_the_scan_runs_under_its_statement_timeout(server, request):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    config = make_config(db.url, scan={"statement_timeout": "7s"})
    backend = SqlBackend(config, bind_profile(config))
    try:
        with backend.read_engine.connect() as conn:
            backend.impl.prepare_scan(conn, 64, config.scan.statement_timeout)
            if server == "postgresql":
                assert _show(conn, "statement_timeout") == "7s"
            else:
                assert float(conn.execute(sa.text("SELECT @@session.max_statement_time")).scalar()) == 7.0
            conn.rollback()
    finally:
        backend.close()
