"""MariaDB as a first-class database: the session settings the MySQL strategy makes, the batched delete
without RETURNING (by primary key, tombstoned exactly), GET_LOCK, and a whole Authlib reap and restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from kit.config import make_config
from kit.databases import child_counts, client_ids, snapshot
from kit.schemas.authlib import AuthlibDB, fill_families
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.commands import apply, plan, restore
from reaper.db import make_engine
from reaper.db.impl import MySQLImpl as MySQLDialect
from reaper.errors import LockHeld


def _mysql_url(db) -> str:
    """The URL as an operator writes it for MariaDB: `mysql://` (SQLAlchemy then says 'mysql')."""
    return db.url.replace("mysql+pymysql://", "mysql://")


def test_sessions_are_utc_read_committed_and_time_bounded(mariadb_db):
    url = _mysql_url(mariadb_db)
    rw, ro = make_engine(url, readonly=False), make_engine(url, readonly=True)
    try:
        with rw.connect() as conn:
            MySQLDialect().set_timeouts(conn, lock_timeout=3, statement_timeout=7.5)
            tz, iso, stmt, lock, gcl = conn.execute(
                sa.text(
                    "SELECT @@session.time_zone, @@session.tx_isolation, @@session.max_statement_time,"
                    " @@session.innodb_lock_wait_timeout, @@session.group_concat_max_len"
                )
            ).one()
        assert (tz, iso, float(stmt), int(lock)) == ("+00:00", "READ-COMMITTED", 7.5, 3)
        assert int(gcl) >= 1 << 24
        with ro.connect() as conn:
            tz, ro_flag = conn.execute(sa.text("SELECT @@session.time_zone, @@session.tx_read_only")).one()
        assert (tz, int(ro_flag)) == ("+00:00", 1)
    finally:
        rw.dispose()
        ro.dispose()


def test_timestamp_columns_read_in_utc_whatever_the_server_zone(mariadb_db):
    """A TIMESTAMP written by an app whose session runs at +05:00 reads back as the same instant in UTC."""
    instant = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    with mariadb_db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id INT PRIMARY KEY, at TIMESTAMP NULL)"))
        conn.execute(sa.text("SET time_zone = '+05:00'"))
        conn.execute(
            sa.text("INSERT INTO t VALUES (1, :local)"),
            {"local": (instant + timedelta(hours=5)).replace(tzinfo=None)},
        )
    # A server (or account) whose default zone is not UTC: every new session starts at +05:00.
    url = sa.engine.make_url(mariadb_db.url).update_query_dict({"init_command": "SET time_zone = '+05:00'"})
    engine = make_engine(url.render_as_string(hide_password=False), readonly=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT at FROM t")).scalar_one() == instant.replace(tzinfo=None)
    finally:
        engine.dispose()


def test_delete_without_returning_removes_exactly_the_locked_rows(mariadb_db):
    with mariadb_db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tok (id INT PRIMARY KEY, client VARCHAR(20), dead INT)"))
        conn.execute(sa.text("CREATE TABLE nopk (client VARCHAR(20), dead INT)"))
        for table in ("tok", "nopk"):
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} VALUES "
                    + ", ".join(
                        f"({i}, 'c{i % 3}', {i % 2})" if table == "tok" else f"('c{i % 3}', {i % 2})" for i in range(12)
                    )
                )
            )
    engine = make_engine(mariadb_db.url, readonly=False)
    md = sa.MetaData()
    try:
        for name in ("tok", "nopk"):
            table = sa.Table(name, md, autoload_with=engine)
            where = sa.and_(table.c.client.in_(["c0", "c1"]), table.c.dead == 1)
            with engine.begin() as conn:
                names, rows = MySQLDialect().delete_returning(conn, table, where)
                gone = [dict(zip(names, r, strict=True)) for r in rows]
            with engine.connect() as conn:
                left = [tuple(r) for r in conn.execute(sa.select(table.c.client, table.c.dead))]
            assert sorted((r["client"], r["dead"]) for r in gone) == sorted(
                (f"c{i % 3}", 1) for i in range(12) if i % 2 and i % 3 in (0, 1)
            )
            assert len(left) == 12 - len(gone) and not any(c in ("c0", "c1") and d == 1 for c, d in left)
    finally:
        engine.dispose()


def test_get_lock_is_one_actor_at_a_time(mariadb_db):
    engine = make_engine(_mysql_url(mariadb_db), readonly=False)
    try:
        name = lock_name("dcr_reaper_")
        first, second = RunLock(engine, name), RunLock(engine, name)
        with first:
            assert first.alive()
            with pytest.raises(LockHeld, match="another dcr-reaper holds the lock .*connection"):
                second.__enter__()
        with second:  # released with the first holder
            assert second.alive()
    finally:
        engine.dispose()


def test_authlib_reap_and_restore_on_mariadb(mariadb_db):
    adb = AuthlibDB(mariadb_db.engine)
    fams = fill_families(adb, families=4, orphans_each=6, seed=11)
    orphans = {c for f in fams for c in f.orphans}
    before = snapshot(mariadb_db.engine)
    config = make_config(_mysql_url(mariadb_db), policy={"batch_size": 7})
    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == orphans
    result = apply(config, the_plan)
    assert result.total_acted == len(orphans) and result.batches == 4
    assert client_ids(mariadb_db.engine).isdisjoint(orphans)
    assert not set(child_counts(mariadb_db.engine)) & orphans
    restore(config, run_id=result.run_id)
    assert snapshot(mariadb_db.engine) == before, "every row back, every column equal"
