"""Fresh, real databases: SQLite always; PostgreSQL and MariaDB when they answer.

A server that does not answer skips its tests, unless REAPER_REQUIRE_DBS names it (`.ci/run` sets it), in
which case they fail: CI can never go green by skipping. The fixtures that hand these out are in `kit.plugin`.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from kit.schemas import authlib

SERVER_URLS = {
    "postgresql": os.environ.get("REAPER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("REAPER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
REQUIRED = {d.strip() for d in os.environ.get("REAPER_REQUIRE_DBS", "").split(",") if d.strip()}
_reachable: dict[str, str | None] = {}


def _unreachable_reason(kind: str) -> str | None:
    if kind not in _reachable:
        try:
            eng = sa.create_engine(SERVER_URLS[kind])
            with eng.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            eng.dispose()
            _reachable[kind] = None
        except Exception as exc:  # noqa: BLE001
            _reachable[kind] = f"{kind} unreachable at {make_url(SERVER_URLS[kind]).render_as_string()}: {exc}"
    return _reachable[kind]


def require(kind: str) -> None:
    """Skip (or fail, when REAPER_REQUIRE_DBS names it) unless the database server answers."""
    reason = _unreachable_reason(kind)
    if reason:
        if kind in REQUIRED:
            pytest.fail(f"REAPER_REQUIRE_DBS requires {kind}: {reason}")
        pytest.skip(reason)


@dataclass
class TestDB:
    """A fresh empty database: `url` for the reaper, `engine` (read-write) for setting up fixtures."""

    __test__ = False
    kind: str
    url: str
    engine: Engine


class Spares:
    """Creates server databases ahead of time and drops them afterwards, in one background thread, so a test
    waits for neither: PostgreSQL takes ~0.1 s to create a database and ~0.05 s to drop one, a test often
    less. One spare per server is kept ready once a test has used that server."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases")
        self._admin: dict[str, Engine] = {}
        self._ready: dict[str, Future[str]] = {}
        self._drops: list[Future[None]] = []

    def _engine(self, kind: str) -> Engine:
        if kind not in self._admin:
            self._admin[kind] = sa.create_engine(SERVER_URLS[kind], isolation_level="AUTOCOMMIT")
        return self._admin[kind]

    def _create(self, kind: str) -> str:
        name = f"reaper_t_{uuid.uuid4().hex[:12]}"
        with self._engine(kind).connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        return name

    def _drop(self, kind: str, name: str) -> None:
        force = " WITH (FORCE)" if kind == "postgresql" else ""  # end the sessions a killed process left
        with self._engine(kind).connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))

    def take(self, kind: str) -> str:
        """A fresh, empty database's name; the next one is started at once."""
        ready = self._ready.pop(kind, None) or self._worker.submit(self._create, kind)
        name = ready.result()
        self._ready[kind] = self._worker.submit(self._create, kind)
        return name

    def give_back(self, kind: str, name: str) -> None:
        self._drops.append(self._worker.submit(self._drop, kind, name))

    def close(self) -> None:
        """Drop the spares, wait for every drop; raise the first drop that failed (a database left behind)."""
        for kind, ready in self._ready.items():
            try:
                self.give_back(kind, ready.result())
            except Exception:  # noqa: BLE001 - it was never handed out: nothing to drop
                pass
        self._ready.clear()
        self._worker.shutdown(wait=True)
        for engine in self._admin.values():
            engine.dispose()
        errors = [f.exception() for f in self._drops if f.exception() is not None]
        self._drops.clear()
        if errors:
            raise errors[0]


SPARES = Spares()


def server_db(kind: str) -> Iterator[TestDB]:
    """A fresh database on the PostgreSQL or MariaDB server, dropped afterwards (use with `yield from`)."""
    require(kind)
    name = SPARES.take(kind)
    url = make_url(SERVER_URLS[kind]).set(database=name)
    engine = sa.create_engine(url)
    try:
        yield TestDB(kind, url.render_as_string(hide_password=False), engine)
    finally:
        engine.dispose()
        SPARES.give_back(kind, name)


def sqlite_db(tmp_path: Path) -> Iterator[TestDB]:
    """A fresh SQLite file in tmp_path (use with `yield from`)."""
    path = tmp_path / "auth.sqlite"
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    with engine.connect():
        pass  # creates the file
    try:
        yield TestDB("sqlite", url, engine)
    finally:
        engine.dispose()


def fresh_db(kind: str, tmp_path: Path) -> Iterator[TestDB]:
    """A fresh database of any kind (use with `yield from`)."""
    if kind == "sqlite":
        yield from sqlite_db(tmp_path)
    else:
        yield from server_db(kind)


# --- engines ---------------------------------------------------------------------------------------------


def writer_engine(url: str) -> sa.Engine:
    """The auth server's own engine. On SQLite it takes the write lock at BEGIN (as a careful app must, or a
    read-then-write transaction deadlocks against any other writer) and waits for it."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_size=2)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _no_driver_tx(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# --- what is in the database ------------------------------------------------------------------------------


def has_table(engine: sa.Engine, name: str) -> bool:
    return sa.inspect(engine).has_table(name)


def table_rows(engine: sa.Engine, table: str, order_by: str = "id") -> list[tuple[Any, ...]]:
    """`SELECT *`, every column as the driver returns it, in primary-key order."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order_by}"))]


def snapshot(
    engine: sa.Engine, tables: Iterable[str] = authlib.TABLES, pk: dict[str, str] | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of `tables` (the Authlib ones unless told), ordered by primary key (`id` unless `pk` says)."""
    pk = pk or {}
    return {t: table_rows(engine, t, pk.get(t, "id")) for t in tables}


def client_ids(engine: sa.Engine, table: str = "oauth2_client") -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.text(f"SELECT client_id FROM {table}"))}


def counts_by_client(engine: sa.Engine, *tables: str) -> dict[str, int]:
    """client_id -> number of rows referencing it, across the given tables."""
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for t in tables:
            for cid, n in conn.execute(sa.text(f"SELECT client_id, COUNT(*) FROM {t} GROUP BY client_id")):
                out[cid] = out.get(cid, 0) + n
    return out


def child_counts(engine: sa.Engine, tables: Iterable[str] = authlib.CHILD_TABLES) -> dict[str, int]:
    """client_id -> number of child rows referencing it (the Authlib tokens and codes unless told)."""
    return counts_by_client(engine, *tables)


def sqlite_state(path: Path) -> tuple[str, list[str]]:
    """The database file's hash and a logical dump: equal before and after means nothing was written."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        dump = list(con.iterdump())
    finally:
        con.close()
    return digest, dump


def pg_advisory_locks(engine: sa.Engine) -> int:
    """Granted advisory locks held in this PostgreSQL database right now."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
            ).scalar()
            or 0
        )
