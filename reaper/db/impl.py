"""Per-database implementations, chosen once from the URL's backend (as alembic's `DefaultImpl` subclasses are).

Every decision that differs between PostgreSQL, MySQL/MariaDB and SQLite lives here: connection settings and
timeouts, read-only sessions, streaming, statement shapes (`IN`, `FOR UPDATE`, `DELETE ... RETURNING`, time
arithmetic, group concatenation), reflection quirks, schema creation, the run lock and what identifies a
database to it. No other module compares database names.
"""

from __future__ import annotations

import ctypes
import json
import math
import operator
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import psycopg
import sqlalchemy as sa
from psycopg.abc import PQGen
from psycopg.types import datetime as psycopg_datetime
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from reaper.errors import ConfigError, DatabaseError

_NUMERIC = (sa.Integer, sa.Numeric, sa.Float)
TIME_TYPES = (sa.DateTime, sa.TIMESTAMP, sa.Date)
TEXT_TYPES = (sa.String, sa.Text, sa.JSON, sa.Enum)
NUMERIC_TYPES = _NUMERIC

ScanRows = tuple[list[str], Iterator[Sequence[Any]]]
"""The scan query's column names, and its rows in batches (each row indexable by position)."""

# Whether the scan's server-side cursor reads PostgreSQL's binary format: text, as measured no slower
# (docs/performance.md).
SCAN_BINARY = False

Purpose = Literal["read", "write", "lock"]
"""What a connection is for: a read-only scan, acting (a reap batch, the ledger), or holding the run lock."""


@dataclass(frozen=True)
class Timeouts:
    """How long a connection may wait, and how a silent network is noticed (config: [database], S10)."""

    connect: float = 10.0  # connecting and logging in
    round_trip: float | None = 30.0  # one answer: a statement, a fetch, a commit (None: unbounded)
    keepalive_idle: float = 15.0  # TCP keepalives, set at both ends
    keepalive_interval: float = 5.0
    keepalive_count: int = 3
    user_timeout: float = 30.0  # TCP_USER_TIMEOUT, at both ends
    stranded_after: float = 30.0  # the database ends a lock session idle, or a reap transaction idle, this long


@dataclass(frozen=True)
class ServerRole:
    """What a server says of its place in replication."""

    standby: bool  # replaying a primary's log, read-only
    cluster: str | None  # shared by a primary and its physical replicas (None: the role may not read it)
    server: str  # this server alone: a primary and its standby never share it
    replay_paused: bool = False
    replayed_at: float | None = None  # the primary's commit time of the last transaction a standby replayed


class DatabaseImpl:
    """Defaults shared by every database; one subclass per database family."""

    name: ClassVar[str] = "generic"
    backends: ClassVar[tuple[str, ...]] = ()
    drivers: ClassVar[dict[str, str]] = {}
    # Reap batches that may run at once, each its own transaction on disjoint clients. One where concurrent
    # writers queue (SQLite) or where deletes by a secondary index take gap locks two batches could deadlock on
    # (InnoDB).
    concurrent_batches: ClassVar[int] = 1
    # Whether an engine serves again once its connections were closed (`serve` keeps them between ticks).
    engine_outlives_close: ClassVar[bool] = True
    _registry: ClassVar[dict[str, type[DatabaseImpl]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for backend in cls.backends:
            DatabaseImpl._registry[backend] = cls

    @classmethod
    def for_backend(cls, backend: str, key: str = "database_url") -> DatabaseImpl:
        """The implementation for a SQLAlchemy backend name (`postgresql`, `mysql`, `mariadb`, `sqlite`); `key`
        names the setting the URL came from in an error."""
        try:
            return cls._registry[backend]()
        except KeyError:
            raise ConfigError(
                f"{key}: unsupported database '{backend}' (supported: postgresql, mysql/mariadb, sqlite)"
            ) from None

    @classmethod
    def for_url(cls, url: URL, key: str = "database_url") -> DatabaseImpl:
        return cls.for_backend(url.get_backend_name(), key)

    @classmethod
    def for_engine(cls, engine: Engine | Connection) -> DatabaseImpl:
        return cls.for_backend(engine.dialect.name)

    @classmethod
    def default_driver(cls, drivername: str) -> str:
        """`postgresql` -> `postgresql+psycopg`, ...: the drivers this project ships with."""
        for impl in set(cls._registry.values()):
            if drivername in impl.drivers:
                return impl.drivers[drivername]
        return drivername

    def supported_by(self, databases: tuple[str, ...]) -> bool:
        """Whether a profile's `database` list includes this database."""
        return self.name in databases

    # -- connections -------------------------------------------------------------------------------------

    def check_url(self, url: URL, key: str = "database_url") -> None:
        """Refuse a URL that cannot work, before connecting (`key` names its setting in the error)."""

    def create_database(self, url: URL) -> None:
        """Make the database of a reaper-owned store (a ledger) when it is a file that does not exist yet."""

    def prepare_url(self, url: URL, readonly: bool) -> URL:
        """The URL to connect with (SQLite opens read-only files through a `file:` URI)."""
        return url

    def connect_args(self, url: URL, purpose: Purpose, timeouts: Timeouts) -> dict[str, Any]:
        """Extra DBAPI connect() arguments: timeouts and keepalives (a setting in the URL's query wins)."""
        return {}

    def on_connect(self, dbapi_conn: Any, purpose: Purpose, timeouts: Timeouts) -> None:
        """Set up every new DBAPI connection (session settings, socket options)."""

    def prepare_engine(self, engine: Engine, readonly: bool, timeouts: Timeouts) -> None:
        """Engine-level hooks (SQLite: SQLAlchemy begins transactions, with the write lock)."""

    def lock_connect_args(self, application_name: str) -> dict[str, Any]:
        """connect() arguments for the lock's own connection."""
        return {}

    def abort(self, dbapi_conn: Any) -> None:
        """Cut a DBAPI connection from any thread: a call blocked on it returns at once with an error."""

    @contextmanager
    def read_guard(self, engine: Engine) -> Iterator[None]:
        """Around a scan: raise if what was read may not be consistent (SQLite read without locks)."""
        yield

    def now_query(self) -> str:
        """SQL giving the database server's clock as epoch seconds (a transaction's start, where it has one)."""
        raise NotImplementedError

    def now(self, conn: Connection) -> float:
        """The database's "now", in epoch seconds: what liveness is judged by (S9)."""
        return float(conn.execute(sa.text(self.now_query())).scalar_one())

    def server_role(self, conn: Connection) -> ServerRole | None:
        """Whether this server is a primary or a standby replaying one, and what ties the two together (`check`
        on a scan replica); None where the database cannot say."""
        return None

    # -- statements ----------------------------------------------------------------------------------------

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """`ts + seconds` for a timestamp column and an integer expression."""
        raise NotImplementedError

    def group_concat(self, column: ColumnElement[Any]) -> ColumnElement[Any]:
        """Newline-joined values of a grouped column."""
        return sa.func.aggregate_strings(column, "\n")

    def prefix(self, column: ColumnElement[Any], length: int) -> ColumnElement[Any]:
        """At most `length` characters of a column, as text (the scan's bound on what a field may cost)."""
        return sa.func.substr(sa.cast(column, sa.Text), 1, length)

    def stream_options(self, batch: int) -> dict[str, Any]:
        """Execution options that stream rows instead of buffering the whole result."""
        return {"stream_results": True, "yield_per": batch}

    @contextmanager
    def scan_rows(self, conn: Connection, query: sa.Select[Any], batch: int) -> Iterator[ScanRows]:
        """The scan query's column names and its rows, streamed in batches of positional rows, through what
        this database's driver does fastest (here: SQLAlchemy's streamed result; PyMySQL's own cost dominates)."""
        result = conn.execution_options(**self.stream_options(batch)).execute(query)
        try:
            yield list(result.keys()), iter(lambda: result.fetchmany(batch), [])
        finally:
            result.close()

    def in_(self, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
        """`column IN values`, with values converted to the column's type (keys travel as text); a column of no
        declared type (the scan's) leaves the conversion to the database."""
        return column.in_(typed_values(column, values))  # type: ignore[no-any-return]

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the rows a query selects for this transaction, skipping rows the auth server holds."""
        return query.with_for_update(skip_locked=True)

    def delete_returning(
        self, conn: Connection, table: sa.Table, where: Any
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Delete rows and return exactly the rows deleted: the column names, and each row's values."""
        result = conn.execute(sa.delete(table).where(where).returning(*table.c))
        return list(result.keys()), [tuple(r) for r in result.all()]  # one fetch, not one driver call a row

    def insert_rows(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert many rows of one table (restore, tombstones) as fast as the driver allows. PyMySQL and sqlite3
        batch an executemany themselves."""
        if rows:
            conn.execute(sa.insert(table), rows)

    # -- transactions ------------------------------------------------------------------------------------

    def is_lock_timeout(self, exc: BaseException) -> bool:
        """True for 'gave up waiting for a row lock' (the auth server holds it): skip, don't fail."""
        return False

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        """Bound how long this transaction waits for locks and runs one statement (S7)."""

    def begin_batch(self, conn: Connection, lock_timeout: float | None = None, statement_timeout: float = 0) -> float:
        """Open a batch's transaction, whose statements look rows up by the batch's keys: its timeouts (S7;
        none for a read without locks) and planner settings. Returns the database's now (S9)."""
        if lock_timeout is not None:
            self.set_timeouts(conn, lock_timeout, statement_timeout)
        return self.now(conn)

    def prepare_scan(self, conn: Connection, work_mem_mb: int, statement_timeout: float) -> None:
        """Session settings for the scan: its statement timeout, and for the one big query (local to the
        scan's transaction where the database has that)."""

    # -- schema --------------------------------------------------------------------------------------------

    def find_column(self, wanted: str, actual: dict[str, Any]) -> str | None:
        """The reflected name of a column (exact match; some databases fold case)."""
        return wanted if wanted in actual else None

    def time_type_ok(self, coltype: Any) -> bool:
        """Whether a reflected type can hold a time (SQLite keeps times as text or numbers)."""
        return isinstance(coltype, TIME_TYPES)

    def reflect_listeners(self) -> list[tuple[str, Callable[..., None]]]:
        """Listeners for sa.Table(autoload_with=...)."""
        return []

    def ensure_schema(self, conn: Connection, schema: str) -> None:
        """Create a schema (namespace) if missing, where the database has them."""

    def ledger_rights(self, conn: Connection, schema: str | None, tables: list[str]) -> tuple[str, str | None]:
        """(who we are, what we may not do to the ledger, or None when we may do all of it, or "" unknown)."""
        return "", ""

    def ledger_grants(self, who: str, schema: str | None) -> str:
        """What gives `who` the rights a reap needs on the ledger (for `check` to print; not run by us)."""
        return f"grant {who} SELECT, INSERT, UPDATE, DELETE and CREATE on the ledger's schema"

    def create_index_sql(self, table: str, column: str) -> str:
        """The statement an operator runs to index a credential table's client reference (not run by us)."""
        name = f"ix_{table.rpartition('.')[2]}_{column}"[:60]
        return f"CREATE INDEX {self.quote(name)} ON {self.quote_table(table)} ({self.quote(column)});"

    def quote(self, name: str) -> str:
        return f'"{name}"'

    def quote_table(self, table: str) -> str:
        return ".".join(self.quote(p) for p in table.split("."))

    def long_text(self) -> sa.types.TypeEngine[str]:
        return sa.Text()

    # -- the run lock ------------------------------------------------------------------------------------

    def try_lock(self, conn: Connection, key: int) -> bool:
        """Take the session lock `key` without waiting."""
        raise NotImplementedError

    def unlock(self, conn: Connection, key: int) -> None:
        raise NotImplementedError

    def lock_holder(self, conn: Connection, key: int) -> str | None:
        """Who holds lock `key`, as the database describes the session; None when nobody does."""
        return None

    def lock_scope(self, conn: Connection) -> str:
        """What the lock key is built from: the database as the server names it, never the URL's host, so every
        route to one database (an IP, a host name, a socket, a proxy) gives one lock. Readable by any role."""
        raise NotImplementedError

    def describe_database(self, conn: Connection) -> str:
        """The database as the server identifies itself, for messages (what a least-privilege role can read)."""
        return self.name

    def session_id(self, conn: Connection) -> str | None:
        """This session, in a form that is never reused for another one (to end it if it is stranded)."""
        return None

    def lock_holder_session(self, conn: Connection, key: int) -> str | None:
        """The session holding lock `key`, in session_id()'s form; None when nobody holds it."""
        return None

    def end_session(self, conn: Connection, session: str) -> bool:
        """End one of our own sessions, stranded holding the lock; True if the database ended it."""
        return False

    @property
    def file_lock(self) -> bool:
        """The lock is a file beside the database, not a database session (SQLite)."""
        return False

    def lock_file(self, url: URL, lock_dir: str | None) -> Path:
        """The run lock's file, for databases whose lock is a file."""
        raise NotImplementedError

    def describe_file(self, url: URL) -> str:
        """The database file as the lock identifies it."""
        raise NotImplementedError


class PostgresImpl(DatabaseImpl):
    name = "postgresql"
    backends = ("postgresql",)
    concurrent_batches = 8
    drivers = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}

    def connect_args(self, url: URL, purpose: Purpose, timeouts: Timeouts) -> dict[str, Any]:
        args: dict[str, Any] = {}
        # Every session in UTC, so timestamps without a zone are read and compared as UTC (S9);
        # default_transaction_read_only makes the server itself refuse writes (S1).
        opts = "-c TimeZone=UTC" + (" -c default_transaction_read_only=on" if purpose == "read" else "")
        extra = url.query.get("options")
        args["options"] = f"{extra} {opts}" if isinstance(extra, str) and extra else opts
        # libpq's own: a connect timeout (libpq reads under 2 s as 2 s), TCP keepalives on the client's side, and
        # TCP_USER_TIMEOUT (data unacknowledged this long drops the connection). Not over a Unix socket.
        libpq = {
            "connect_timeout": max(2, math.ceil(timeouts.connect)),
            "keepalives": 1,
            "keepalives_idle": _whole(timeouts.keepalive_idle),
            "keepalives_interval": _whole(timeouts.keepalive_interval),
            "keepalives_count": timeouts.keepalive_count,
            "tcp_user_timeout": int(timeouts.user_timeout * 1000),
        }
        args.update({k: v for k, v in libpq.items() if k not in url.query})
        return args

    def on_connect(self, dbapi_conn: Any, purpose: Purpose, timeouts: Timeouts) -> None:
        # The server's side of the same: keepalives and TCP_USER_TIMEOUT on its socket (any role may set them;
        # ignored over a Unix socket), so the server drops the session of a reaper whose network vanished.
        version = dbapi_conn.info.server_version
        stmts = [
            f"SET tcp_keepalives_idle = {_whole(timeouts.keepalive_idle)}",
            f"SET tcp_keepalives_interval = {_whole(timeouts.keepalive_interval)}",
            f"SET tcp_keepalives_count = {timeouts.keepalive_count}",
        ]
        if version >= 120000:
            stmts.append(f"SET tcp_user_timeout = {int(timeouts.user_timeout * 1000)}")
        stranded = int(timeouts.stranded_after * 1000)
        if purpose == "write":
            # A reap batch's transaction left idle (its reaper gone) holds row locks the auth server waits on.
            stmts.append(f"SET idle_in_transaction_session_timeout = {stranded}")
        elif purpose == "lock" and version >= 140000:
            # The lock session is idle between its holder's check-ins: silent for longer, it is stranded, and the
            # server ends it (and frees the lock) even when a middlebox keeps its TCP connection up.
            stmts.append(f"SET idle_session_timeout = {stranded}")
        with dbapi_conn.cursor() as cur:
            for stmt in stmts:
                cur.execute(stmt)
        dbapi_conn.commit()

    def lock_connect_args(self, application_name: str) -> dict[str, Any]:
        return {"application_name": application_name[:63]}

    def abort(self, dbapi_conn: Any) -> None:
        try:
            fd = dbapi_conn.pgconn.socket
        except Exception:  # noqa: BLE001 - closed already: nothing to cut
            return
        _shutdown_fd(fd)

    def now_query(self) -> str:
        return "SELECT EXTRACT(EPOCH FROM now())::float8"

    def prepare_engine(self, engine: Engine, readonly: bool, timeouts: Timeouts) -> None:
        limit = timeouts.round_trip
        if limit is not None:

            @sa.event.listens_for(engine, "do_connect")
            def _bounded(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
                conn = BoundedConnection.connect(*cargs, **cparams)
                conn.round_trip = limit
                return conn

        @sa.event.listens_for(engine, "connect")
        def _infinite_times(dbapi_conn: Any, _record: Any) -> None:
            # 'infinity' is a valid timestamp in PostgreSQL but no Python datetime: read it as the last one
            # representable, so a row holding it is judged (a time in the future), not a failed scan.
            for name, loader in (("timestamp", _TimestampLoader), ("timestamptz", _TimestamptzLoader)):
                dbapi_conn.adapters.register_loader(name, loader)

    def in_(self, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
        # One array parameter instead of hundreds of placeholders: the statement text stays the same from
        # batch to batch, so neither SQLAlchemy nor the server re-parses it (a tick re-reading 33,333 clients
        # spent 1.5 s parsing placeholders). The array travels as its text form, cast by the server: psycopg's
        # list adapter quotes each element through a regex in Python (about 3 ms for 2,000 keys, and a reap
        # batch sends its keys ten times). For a column of no declared type the server reads it as the column's.
        param = sa.bindparam(None, array_literal(typed_values(column, values)), type_=_ArrayText())
        if isinstance(column.type, sa.types.NullType):
            return column == sa.any_(param)  # type: ignore[no-any-return]
        return column == sa.any_(sa.cast(param, ARRAY(column.type)))  # type: ignore[no-any-return]

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"

    def insert_rows(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        # COPY, in the caller's transaction: psycopg runs an executemany as one statement per row (about 30 us
        # each) and parses the placeholders of a multi-row INSERT in Python (slower still at thousands of rows),
        # so restores and tombstones cost more than the deletes. JSON values are written as JSON text.
        if not rows:
            return
        prep = conn.dialect.identifier_preparer
        names = list(rows[0])
        json_at = [i for i, n in enumerate(names) if isinstance(table.c[n].type, sa.JSON)]
        values = operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)  # in C
        cols = ", ".join(prep.quote(n) for n in names)
        raw = conn.connection.driver_connection
        assert raw is not None
        statement = f"COPY {prep.format_table(table)} ({cols}) FROM STDIN"
        try:
            with raw.cursor() as cur, cur.copy(statement) as copy:
                write = copy.write_row
                if not json_at:
                    for row in rows:
                        write(values(row))
                else:
                    for row in rows:
                        fixed = list(values(row))
                        for i in json_at:
                            if fixed[i] is not None:
                                fixed[i] = json.dumps(fixed[i])
                        write(fixed)
        except psycopg.Error as exc:  # as SQLAlchemy would raise it: callers handle DBAPIError / IntegrityError
            kind = sa.exc.IntegrityError if isinstance(exc, psycopg.IntegrityError) else sa.exc.DBAPIError
            raise kind(statement, None, exc) from None

    def prepare_scan(self, conn: Connection, work_mem_mb: int, statement_timeout: float) -> None:
        # Each statement of the scan (the query's first rows, every later fetch of the server-side cursor) ends
        # at the statement timeout. One backend, no parallel workers (each would rebuild the whole token
        # aggregate: 3x the work on the auth server's CPUs), no JIT (seconds of compile time for a query run
        # once), enough memory to keep the aggregate off disk.
        conn.execute(sa.text(f"SET LOCAL statement_timeout = {max(1, int(statement_timeout * 1000))}"))
        conn.execute(sa.text("SET LOCAL max_parallel_workers_per_gather = 0"))
        conn.execute(sa.text("SET LOCAL jit = off"))
        conn.execute(sa.text(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'"))

    @contextmanager
    def scan_rows(self, conn: Connection, query: sa.Select[Any], batch: int) -> Iterator[ScanRows]:
        # psycopg's own server-side cursor in the scan's transaction, rows as its plain tuples: SQLAlchemy's
        # result layer cost more per row than decoding the row does. Each FETCH is a statement of its own, so
        # the scan's statement timeout bounds every round trip, and Backend.interrupt() cutting the connection
        # ends a fetch at once. The scan query's parameters (numbers, text, times) need no SQLAlchemy type
        # processing on psycopg, so the compiled parameters go to the driver as they are.
        fix_mmap_threshold()
        compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        statement, params = str(compiled), compiled.params
        raw = conn.connection.driver_connection
        assert raw is not None
        cursor = raw.cursor(name="dcr_reaper_scan", binary=SCAN_BINARY)
        cursor.itersize = batch

        def batches() -> Iterator[Sequence[Any]]:
            try:
                cursor.execute(statement, params)
                while rows := cursor.fetchmany(batch):
                    yield rows
            except psycopg.Error as exc:  # as SQLAlchemy would raise it: the scan handles DBAPIError
                raise DBAPIError.instance(statement, params, exc, psycopg.Error) from None

        try:
            yield list(query.selected_columns.keys()), batches()
        finally:
            close_server_cursor(cursor)
            if raw.closed or raw.broken:
                # As SQLAlchemy does for a connection that failed under it: no rollback on a dead connection,
                # whose error would replace the one that ended the scan.
                conn.invalidate()

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}"))
        conn.execute(sa.text(f"SET LOCAL statement_timeout = {int(statement_timeout * 1000)}"))

    def begin_batch(self, conn: Connection, lock_timeout: float | None = None, statement_timeout: float = 0) -> float:
        # One round trip. Every statement of a batch selects by its keys (`= ANY(keys)`), and where the index
        # exists a lookup per key is what it should cost; but PostgreSQL's estimates for 2,000 keys combined with
        # the liveness conditions led it to scan the whole code table in three statements of every batch (half
        # of a batch's database time at 200k clients). Without sequential scans as a choice, a table with no
        # index on the key is still scanned, once per statement: there is no other plan. That scan's penalty
        # lifts the plan's cost over JIT's threshold, and compiling costs more than the statement: no JIT.
        q = (
            "SELECT EXTRACT(EPOCH FROM now())::float8, "
            "set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true)"
        )
        params: dict[str, str] = {}
        if lock_timeout is not None:
            q += ", set_config('lock_timeout', :lock, true), set_config('statement_timeout', :stmt, true)"
            params = {"lock": str(int(lock_timeout * 1000)), "stmt": str(int(statement_timeout * 1000))}
        return float(conn.execute(sa.text(q), params).first()[0])  # type: ignore[index]

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return ts + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)

    def ledger_rights(self, conn: Connection, schema: str | None, tables: list[str]) -> tuple[str, str | None]:
        role, where = conn.execute(sa.text("SELECT current_user, current_schema()")).one()
        schema = schema or where or "public"
        found = [t for t in tables if sa.inspect(conn).has_table(t, schema=schema)]
        if found:
            q = sa.text("SELECT has_table_privilege(:r, :t, 'SELECT,INSERT,UPDATE,DELETE')")
            denied = [t for t in found if not conn.execute(q, {"r": role, "t": f'"{schema}"."{t}"'}).scalar()]
            if denied:
                return role, f"read and write {', '.join(f'{schema}.{t}' for t in denied)}"
            if len(found) == len(tables):
                return role, None
        if found or sa.inspect(conn).has_schema(schema):
            # No ledger yet, or one an older release made: the next reap or restore creates the missing tables.
            q = sa.text("SELECT has_schema_privilege(:r, :s, 'CREATE')")
            return role, None if conn.execute(q, {"r": role, "s": schema}).scalar() else f"create tables in {schema}"
        q = sa.text("SELECT has_database_privilege(:r, current_database(), 'CREATE')")
        return role, None if conn.execute(q, {"r": role}).scalar() else f"create the schema {schema}"

    def ledger_grants(self, who: str, schema: str | None) -> str:
        target = schema or "public"
        return (
            f"run deploy/sql's roles script, or as the owner: GRANT USAGE, CREATE ON SCHEMA {target} TO {who}; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {target} TO {who}"
        )

    def create_index_sql(self, table: str, column: str) -> str:
        # CONCURRENTLY: built without blocking the auth server's writes (it cannot run inside a transaction).
        return super().create_index_sql(table, column).replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1)

    def ensure_schema(self, conn: Connection, schema: str) -> None:
        # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs CREATE on the database, which a
        # least-privilege role owning a prepared schema does not have.
        if not sa.inspect(conn).has_schema(schema):
            conn.execute(sa.schema.CreateSchema(schema))

    def try_lock(self, conn: Connection, key: int) -> bool:
        return bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())

    def unlock(self, conn: Connection, key: int) -> None:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    def lock_holder(self, conn: Connection, key: int) -> str | None:
        hi, lo = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
        row = conn.execute(
            sa.text(
                "SELECT a.application_name, a.client_addr, a.pid, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"
            ),
            {"hi": hi, "lo": lo},
        ).first()
        if row is None:
            return None
        since = f"{row[3]:%Y-%m-%d %H:%M:%S}"
        where = row[1] or "local socket"
        return f"{row[0] or 'unknown'} (backend pid {row[2]}, from {where}, since {since})"

    def server_role(self, conn: Connection) -> ServerRole | None:
        standby = bool(conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar())
        # The system identifier (pg_control_system(), PUBLIC by default) is copied by pg_basebackup: a physical
        # replica shares it with its primary. The postmaster's start time tells two servers apart, whatever route
        # (address, host name, socket) reached them.
        allowed = conn.execute(sa.text("SELECT has_function_privilege('pg_control_system()', 'EXECUTE')")).scalar()
        system = "SELECT system_identifier::text FROM pg_control_system()"
        cluster = conn.execute(sa.text(system)).scalar() if allowed else None
        server = conn.execute(sa.text("SELECT pg_postmaster_start_time()::text")).scalar_one()
        if not standby:
            return ServerRole(False, cluster, str(server))
        paused, replayed = conn.execute(
            sa.text("SELECT pg_is_wal_replay_paused(), EXTRACT(EPOCH FROM pg_last_xact_replay_timestamp())::float8")
        ).one()
        return ServerRole(True, cluster, str(server), bool(paused), None if replayed is None else float(replayed))

    def lock_scope(self, conn: Connection) -> str:
        # Advisory locks live in one database of one cluster (pg_locks.database): the key needs only the
        # database's name as the server reports it, which every role and every route reads the same.
        return f"postgresql/{conn.execute(sa.text('SELECT current_database()')).scalar_one()}"

    def describe_database(self, conn: Connection) -> str:
        db, addr, port = conn.execute(
            sa.text("SELECT current_database(), host(inet_server_addr()), inet_server_port()")
        ).one()
        # The cluster's system identifier, where the role may read it (pg_control_system(), granted to PUBLIC by
        # default; a hardened server may revoke it): checked first, so a refusal cannot abort the transaction.
        allowed = conn.execute(sa.text("SELECT has_function_privilege('pg_control_system()', 'EXECUTE')")).scalar()
        if allowed:
            system = conn.execute(sa.text("SELECT system_identifier::text FROM pg_control_system()")).scalar()
            return f"PostgreSQL cluster {system}, database {db}"
        where = f"{addr}:{port}" if addr else "a local socket"
        return f"PostgreSQL at {where} (as the server reports it), database {db}"

    def session_id(self, conn: Connection) -> str | None:
        row = conn.execute(
            sa.text("SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        ).first()
        return f"{row[0]} {row[1]}" if row else None

    def lock_holder_session(self, conn: Connection, key: int) -> str | None:
        hi, lo = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
        row = conn.execute(
            sa.text(
                "SELECT a.pid, a.backend_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi AND l.objid = :lo "
                "AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"hi": hi, "lo": lo},
        ).first()
        return f"{row[0]} {row[1]}" if row else None

    def end_session(self, conn: Connection, session: str) -> bool:
        # A backend pid and its start time name one session for good (a pid alone may be reused). A role may
        # end its own sessions without any privilege.
        pid, _, start = session.partition(" ")
        ended = conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = :pid AND backend_start::text = :s"
            ),
            {"pid": int(pid), "s": start},
        ).scalar()
        return bool(ended)


class MySQLImpl(DatabaseImpl):
    name = "mysql"
    backends = ("mysql", "mariadb")
    drivers = {"mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}

    def connect_args(self, url: URL, purpose: Purpose, timeouts: Timeouts) -> dict[str, Any]:
        # PyMySQL's socket timeouts: connecting, then every read and write. It reads the server's greeting and
        # the login with its read timeout, so a server that takes the connection and never answers would hold it
        # for a round trip's bound: connecting gets the connect bound, the round trip's is set once connected
        # (prepare_engine).
        bound = max(1, math.ceil(timeouts.connect))
        given = str(url.query.get("connect_timeout", ""))
        if given.replace(".", "", 1).isdigit():  # the URL's own bound, also for the login
            bound = max(1, math.ceil(float(given)))
        args: dict[str, Any] = {"connect_timeout": bound, "read_timeout": bound, "write_timeout": bound}
        return {k: v for k, v in args.items() if k not in url.query}

    def on_connect(self, dbapi_conn: Any, purpose: Purpose, timeouts: Timeouts) -> None:
        # PyMySQL has no keepalive settings: set them on its socket (TCP only, not a Unix socket).
        sock = getattr(dbapi_conn, "_sock", None)
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            _keepalive(sock, timeouts)
        # UTC sessions: TIMESTAMP columns are read and compared in UTC, like the scan's `now`. A long
        # GROUP_CONCAT limit: values kept as rows (Keycloak's redirect URIs) are not cut at 1024 bytes.
        stmts = ["SET SESSION time_zone = '+00:00'", "SET SESSION group_concat_max_len = 16777216"]
        if purpose == "read":
            stmts.append("SET SESSION TRANSACTION READ ONLY")
        else:
            # Read committed, as on PostgreSQL: each statement of a reap batch (the re-check, the deletes) sees
            # what other transactions committed up to that moment, not a snapshot taken at the batch's first read.
            stmts.append("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        if purpose != "read":
            # The server ends a connection silent this long (a lock session between its holder's check-ins, a
            # batch's transaction whose reaper is gone) and frees its GET_LOCK and row locks, whatever the
            # network in between does. MariaDB and MySQL both.
            stmts.append(f"SET SESSION wait_timeout = {max(1, math.ceil(timeouts.stranded_after))}")
        cur = dbapi_conn.cursor()
        try:
            for stmt in stmts:
                cur.execute(stmt)
        finally:
            cur.close()

    def prepare_engine(self, engine: Engine, readonly: bool, timeouts: Timeouts) -> None:
        given = {k for k in ("read_timeout", "write_timeout") if k in engine.url.query}

        @sa.event.listens_for(engine, "connect")
        def _round_trip(dbapi_conn: Any, _record: Any) -> None:
            # Connected and logged in: from now on a read or a write waits a round trip's bound (None: unbounded).
            # PyMySQL applies these at its next read or write.
            if "read_timeout" not in given:
                dbapi_conn._read_timeout = timeouts.round_trip
            if "write_timeout" not in given:
                dbapi_conn._write_timeout = timeouts.round_trip

        @sa.event.listens_for(engine, "handle_error")
        def _forget_unbuffered(context: Any) -> None:
            # A streamed (unbuffered) result whose connection died (a read timeout, a cut) would try to read the
            # rest of its rows when collected, and print a traceback: there is nothing left to read.
            raw = getattr(getattr(context.execution_context, "cursor", None), "connection", None)
            if raw is not None and getattr(raw, "_sock", None) is None:
                result = getattr(raw, "_result", None)
                if result is not None:
                    result.unbuffered_active = False

    def abort(self, dbapi_conn: Any) -> None:
        sock = getattr(dbapi_conn, "_sock", None)
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def prepare_scan(self, conn: Connection, work_mem_mb: int, statement_timeout: float) -> None:
        self._statement_timeout(conn, statement_timeout)

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        conn.execute(sa.text(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_timeout))}"))
        self._statement_timeout(conn, statement_timeout)

    @staticmethod
    def _statement_timeout(conn: Connection, seconds: float) -> None:
        # A `mysql://` URL on a MariaDB server still gets the "mysql" dialect name: ask the dialect.
        if getattr(conn.dialect, "is_mariadb", False):
            conn.execute(sa.text(f"SET SESSION max_statement_time = {seconds:g}"))
        else:
            conn.execute(sa.text(f"SET SESSION max_execution_time = {int(seconds * 1000)}"))

    def delete_returning(
        self, conn: Connection, table: sa.Table, where: Any
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        # MySQL has no DELETE ... RETURNING: lock the rows first, then delete exactly those rows by primary
        # key, so the tombstone holds precisely what went (re-evaluating `where` could match a row inserted
        # since).
        result = conn.execute(sa.select(table).where(where).with_for_update())
        names = list(result.keys())
        rows = [tuple(r) for r in result.all()]
        if not rows:
            return names, rows
        pk = [names.index(c.name) for c in table.primary_key.columns]
        if not pk:
            conn.execute(sa.delete(table).where(where))
            return names, rows
        cols = list(table.primary_key.columns)
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            if len(pk) == 1:
                match = cols[0].in_([r[pk[0]] for r in chunk])
            else:
                match = sa.tuple_(*cols).in_([tuple(r[j] for j in pk) for r in chunk])
            conn.execute(sa.delete(table).where(match))
        return names, rows

    def now_query(self) -> str:
        return "SELECT UNIX_TIMESTAMP(NOW(6))"

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.timestampadd(sa.text("SECOND"), seconds, ts)

    def find_column(self, wanted: str, actual: dict[str, Any]) -> str | None:
        if wanted in actual:
            return wanted
        lowered = {k.lower(): k for k in actual}  # MySQL/MariaDB column names are case-insensitive
        return lowered.get(wanted.lower())

    def long_text(self) -> sa.types.TypeEngine[str]:
        return mysql.LONGTEXT()

    def quote(self, name: str) -> str:
        return f"`{name}`"

    def create_index_sql(self, table: str, column: str) -> str:
        # An online build: the auth server keeps writing while InnoDB builds it.
        return super().create_index_sql(table, column).rstrip(";") + " ALGORITHM=INPLACE LOCK=NONE;"

    @staticmethod
    def _lock_name(key: int) -> str:
        return f"dcr-reaper:{key & 0xFFFFFFFFFFFF:x}"

    def try_lock(self, conn: Connection, key: int) -> bool:
        return conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": self._lock_name(key)}).scalar() == 1

    def unlock(self, conn: Connection, key: int) -> None:
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": self._lock_name(key)})

    def lock_holder(self, conn: Connection, key: int) -> str | None:
        cid = conn.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": self._lock_name(key)}).scalar()
        if not cid:
            return None
        row = conn.execute(
            sa.text("SELECT user, host FROM information_schema.processlist WHERE id = :i"), {"i": cid}
        ).first()
        return f"connection {cid}" + (f" ({row[0]}@{row[1]})" if row else "")

    def lock_scope(self, conn: Connection) -> str:
        # GET_LOCK names are one namespace per server: the key needs the database as the server names it.
        return f"mysql/{conn.execute(sa.text('SELECT DATABASE()')).scalar() or ''}"

    def describe_database(self, conn: Connection) -> str:
        # MySQL has server_uuid, MariaDB server_uid; both have hostname and port. Readable by any account.
        found = {
            str(k).lower(): str(v)
            for k, v in conn.execute(
                sa.text(
                    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('server_uuid', 'server_uid', 'hostname', 'port')"
                )
            )
        }
        db = conn.execute(sa.text("SELECT DATABASE()")).scalar() or ""
        uid = found.get("server_uuid") or found.get("server_uid")
        where = f"{found.get('hostname', '?')}:{found.get('port', '?')}"
        server = f"server {uid} ({where})" if uid else where
        return f"MySQL/MariaDB {server}, database {db}"

    def session_id(self, conn: Connection) -> str | None:
        # A connection id with the client address as the server saw it: ids restart with the server.
        row = conn.execute(
            sa.text("SELECT id, host FROM information_schema.processlist WHERE id = CONNECTION_ID()")
        ).first()
        return f"{row[0]} {row[1]}" if row else None

    def lock_holder_session(self, conn: Connection, key: int) -> str | None:
        cid = conn.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": self._lock_name(key)}).scalar()
        if not cid:
            return None
        row = conn.execute(sa.text("SELECT id, host FROM information_schema.processlist WHERE id = :i"), {"i": cid})
        found = row.first()
        return f"{found[0]} {found[1]}" if found else None

    def end_session(self, conn: Connection, session: str) -> bool:
        cid = int(session.partition(" ")[0])
        try:
            conn.execute(sa.text(f"KILL CONNECTION {cid}"))  # an account may end its own connections
        except DBAPIError:
            return False
        return True


class SQLiteImpl(DatabaseImpl):
    name = "sqlite"
    backends = ("sqlite",)
    # How a file is opened (immutable when nobody has it open, its symlink resolved) is decided when its engine
    # is made, from the file as it is then: a new engine each time.
    engine_outlives_close = False

    def check_url(self, url: URL, key: str = "database_url") -> None:
        path = url.database
        if not path or path == ":memory:":
            raise ConfigError(f"{key}: an in-memory SQLite database has nothing to scan")
        if not Path(path).is_file():
            raise DatabaseError(f"cannot open sqlite:///{path}: no such SQLite database file")

    def create_database(self, url: URL) -> None:
        if url.database and url.database != ":memory:" and not Path(url.database).exists():
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            Path(url.database).touch()

    def prepare_url(self, url: URL, readonly: bool) -> URL:
        if not readonly or not url.database:
            return url
        # Opened read-only by the OS as well: even a WAL checkpoint on close cannot touch the file (S1).
        path = Path(url.database).resolve()
        query = {**url.query, "mode": "ro", "uri": "true"}
        if _wal_mode(path) and not _sidecars(path):
            # A WAL database that no process has open: opening it, even read-only, would create its -wal and -shm
            # files beside it (and leave them, since a read-only connection cannot clean up), or fail where the
            # directory is not writable. Read it without SQLite's locks instead; read_guard() refuses the scan if
            # the file changed meanwhile.
            query["immutable"] = "1"
        return url.set(database=f"file:{path}", query=query)

    @contextmanager
    def read_guard(self, engine: Engine) -> Iterator[None]:
        if engine.url.query.get("immutable") != "1" or not engine.url.database:
            yield
            return
        path = Path(engine.url.database.removeprefix("file:"))
        before = _file_state(path)
        if before[0]:
            raise DatabaseError(f"{path} was opened by another process since this scan began; scan again")
        yield
        if _file_state(path) != before:
            raise DatabaseError(
                f"{path} changed while it was read without SQLite's locks (no process had it open when the scan "
                "began); scan again"
            )

    def now_query(self) -> str:
        return "SELECT (julianday('now') - 2440587.5) * 86400.0"  # the host's clock: SQLite has no server

    def on_connect(self, dbapi_conn: Any, purpose: Purpose, timeouts: Timeouts) -> None:
        # query_only makes SQLite refuse every write on this connection (S1).
        stmts = ["PRAGMA busy_timeout = 5000"] + (["PRAGMA query_only = ON"] if purpose == "read" else [])
        cur = dbapi_conn.cursor()
        try:
            for stmt in stmts:
                cur.execute(stmt)
        finally:
            cur.close()

    def abort(self, dbapi_conn: Any) -> None:
        try:
            dbapi_conn.interrupt()  # the one sqlite3 call safe from another thread
        except Exception:  # noqa: BLE001 - closed already
            pass

    def prepare_engine(self, engine: Engine, readonly: bool, timeouts: Timeouts) -> None:
        if readonly:

            @sa.event.listens_for(engine, "connect")
            def _lenient_text(dbapi_conn: Any, _record: Any) -> None:
                # SQLite stores whatever bytes it is given: a row that is not UTF-8 must become one problem
                # row (the scan sees lone surrogates), not a failed scan.
                dbapi_conn.text_factory = lenient_text

            return

        @sa.event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy, not pysqlite, begins transactions ...

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # ... and takes the write lock at BEGIN

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.datetime(ts, sa.literal("+") + sa.cast(seconds, sa.String) + sa.literal(" seconds"))

    def stream_options(self, batch: int) -> dict[str, Any]:
        return {"yield_per": batch}

    @contextmanager
    def scan_rows(self, conn: Connection, query: sa.Select[Any], batch: int) -> Iterator[ScanRows]:
        # sqlite3 steps through a result only as it is fetched, so the driver's cursor streams by itself; its
        # tuples skip SQLAlchemy's row layer.
        result = conn.execute(query)
        cursor = result.cursor
        statement = str(query)

        def batches() -> Iterator[Sequence[Any]]:
            base = conn.dialect.loaded_dbapi.Error
            try:
                while rows := cursor.fetchmany(batch):
                    yield rows
            except base as exc:
                raise DBAPIError.instance(statement, None, exc, base) from None

        try:
            yield list(result.keys()), batches()
        finally:
            result.close()

    def ledger_rights(self, conn: Connection, schema: str | None, tables: list[str]) -> tuple[str, str | None]:
        path = Path(str(conn.engine.url.database or "").removeprefix("file:"))
        target = path if path.exists() else path.parent
        who = f"uid {os.getuid()}"
        return who, None if os.access(target, os.W_OK) and os.access(path.parent, os.W_OK) else f"write {path}"

    def ledger_grants(self, who: str, schema: str | None) -> str:
        return f"make the database file and its directory writable by {who}"

    def prefix(self, column: ColumnElement[Any], length: int) -> ColumnElement[Any]:
        # SQLite's substr() stops at an embedded NUL; the file is local, so the value is read whole and the
        # scan cuts it in Python.
        return column

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query  # SQLite has no row locks; BEGIN IMMEDIATE takes the write lock for the batch

    def time_type_ok(self, coltype: Any) -> bool:
        return isinstance(coltype, TIME_TYPES + TEXT_TYPES + NUMERIC_TYPES)

    def reflect_listeners(self) -> list[tuple[str, Callable[..., None]]]:
        # SQLite keeps whatever the server wrote, whatever the declared type ('2024-05-01 10:00:00' or an epoch
        # int in a TIMESTAMP column, 't' in a BOOLEAN): read and write stored values untouched, like the scan's
        # untyped columns, so a tombstone restores them exactly and an odd value cannot crash a batch. (Typed,
        # SQLAlchemy rewrote timestamps as '... .000000' on restore.)
        def _untyped(_inspector: Any, _table: Any, info: dict[str, Any]) -> None:
            info["type"] = sa.types.NullType()

        return [("column_reflect", _untyped)]

    @property
    def file_lock(self) -> bool:
        return True

    def lock_file(self, url: URL, lock_dir: str | None) -> Path:
        # One file per database file, wherever it is named from: beside the file a symlink or a relative path
        # resolves to, or, in a configured directory, named after the file's device and inode.
        path = Path(url.database or "").resolve()
        if lock_dir:
            st = path.stat()
            return Path(lock_dir) / f"{path.name}.{st.st_dev:x}-{st.st_ino:x}.dcr-reaper.lock"
        return Path(f"{path}.dcr-reaper.lock")

    def describe_file(self, url: URL) -> str:
        path = Path(url.database or "").resolve()
        try:
            st = path.stat()
        except OSError:
            return f"SQLite file {path}"
        return f"SQLite file {path} (device {st.st_dev:x}, inode {st.st_ino})"


def _wal_mode(path: Path) -> bool:
    """The database file's header says WAL (bytes 18 and 19 are 2)."""
    try:
        with path.open("rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def _sidecars(path: Path) -> bool:
    """Whether a -wal or -shm file exists: some process has (or had) the database open in WAL mode."""
    return Path(f"{path}-wal").exists() or Path(f"{path}-shm").exists()


def _file_state(path: Path) -> tuple[bool, int, int]:
    st = path.stat()
    return _sidecars(path), st.st_size, st.st_mtime_ns


def _whole(seconds: float) -> int:
    """Whole seconds, at least one (the unit of TCP keepalive settings)."""
    return max(1, math.ceil(seconds))


def _keepalive(sock: socket.socket, timeouts: Timeouts) -> None:
    """TCP keepalives and TCP_USER_TIMEOUT on a client socket (Linux option names; others skipped)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", _whole(timeouts.keepalive_idle)),
        ("TCP_KEEPINTVL", _whole(timeouts.keepalive_interval)),
        ("TCP_KEEPCNT", timeouts.keepalive_count),
        ("TCP_USER_TIMEOUT", int(timeouts.user_timeout * 1000)),
    )
    for name, value in options:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _shutdown_fd(fd: int) -> None:
    """Shut a socket down (both ways) through a duplicate of its descriptor: the owner's blocked call returns."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


class BoundedConnection(psycopg.Connection[Any]):
    """psycopg's connection, with every round trip bounded by `round_trip` seconds (Connection.wait's `timeout`,
    psycopg 3.3.6 and later; statements, server-side cursor fetches and commits all go through it): a network that
    goes silent (a partition, a middlebox that stops forwarding) fails the call instead of hanging it."""

    round_trip: float | None = None

    def wait(self, gen: PQGen[Any], interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None or self.round_trip is None:  # the caller's own bound (notifies()) stands
            return super().wait(gen, interval=interval, timeout=timeout)
        try:
            return super().wait(gen, interval=interval, timeout=self.round_trip)
        except psycopg.OperationalError as exc:
            if type(exc).__name__ != "_WaitTimeout":
                raise
            # The protocol is mid-message: the connection cannot be used again (SQLAlchemy sees it closed and
            # drops it from its pool).
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from the server within {self.round_trip:g}s; connection dropped (a silent network?)"
            ) from None


def fix_mmap_threshold() -> None:
    """Keep libpq's result buffers out of the heap. glibc raises its mmap threshold each time a large block is
    freed, so after the first fetches every batch (megabytes of rows) comes from the heap and fragments it: a bare
    psycopg loop over 1M rows peaked at 143 MB against 84 MB with the threshold fixed. Process-wide; glibc only
    (elsewhere nothing happens)."""
    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default, fixed
    except (OSError, AttributeError):
        pass


def close_server_cursor(cursor: Any) -> None:
    """Close a psycopg server-side cursor; when its connection died under it, mark it closed on our side only
    (the cursor went with the connection on the server)."""
    if cursor.closed:
        return
    try:
        cursor.close()
    except Exception:  # noqa: BLE001 - nothing more to free on a dead connection
        for base in type(cursor).__mro__[1:]:
            if base.__name__ == "Cursor" and base.__module__.startswith("psycopg"):
                try:
                    getattr(base, "close")(cursor)  # noqa: B009 - the base class's own close
                except Exception:  # noqa: BLE001
                    pass
                return


def lenient_text(raw: bytes) -> str:
    """Stored bytes as text; bytes that are not UTF-8 become lone surrogates (reversible), never an error."""
    return raw.decode("utf-8", "surrogateescape")


class _ArrayText(sa.types.UserDefinedType[str]):
    """An array's text form as a parameter of no declared type, so the server reads it once as the type it is
    cast to (a parameter cast from text would be parsed again for every row a scan filters)."""

    cache_ok = True

    def literal_processor(self, dialect: Any) -> Callable[[str], str]:
        return lambda value: "'" + value.replace("'", "''") + "'"


def array_literal(values: list[Any]) -> str:
    """A PostgreSQL array's text form, every element quoted: `{"a","b"}`."""
    items = [str(v) for v in values]
    if not items:
        return "{}"
    joined = "".join(items)
    if '"' in joined or "\\" in joined:
        items = [v.replace("\\", "\\\\").replace('"', '\\"') for v in items]
    return '{"' + '","'.join(items) + '"}'


def typed_values(column: Any, values: Sequence[Any]) -> list[Any]:
    """Keys as the column's Python type: integers for integer key columns, text otherwise."""
    if isinstance(column.type, sa.Integer):
        return [int(v) for v in values]
    return list(values)


class _TimestampLoader(psycopg_datetime.TimestampLoader):
    def load(self, data: Any) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            return datetime.min if bytes(data).startswith(b"-") else datetime.max


class _TimestamptzLoader(psycopg_datetime.TimestamptzLoader):
    def load(self, data: Any) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            edge = datetime.min if bytes(data).startswith(b"-") else datetime.max
            return edge.replace(tzinfo=UTC)
