"""Per-database implementations, chosen once from the URL's backend (as alembic's `DefaultImpl` subclasses are).

Every decision that differs between PostgreSQL, MySQL/MariaDB and SQLite lives here: connection settings and
timeouts, read-only sessions, streaming, statement shapes (`IN`, `FOR UPDATE`, `DELETE ... RETURNING`, time
arithmetic, group concatenation), reflection quirks, schema creation and the run lock. No other module compares
database names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import sqlalchemy as sa
from psycopg.types import datetime as psycopg_datetime
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from reaper.errors import ConfigError, DatabaseError

_NUMERIC = (sa.Integer, sa.Numeric, sa.Float)
TIME_TYPES = (sa.DateTime, sa.TIMESTAMP, sa.Date)
TEXT_TYPES = (sa.String, sa.Text, sa.JSON, sa.Enum)
NUMERIC_TYPES = _NUMERIC


class DatabaseImpl:
    """Defaults shared by every database; one subclass per database family."""

    name: ClassVar[str] = "generic"
    backends: ClassVar[tuple[str, ...]] = ()
    drivers: ClassVar[dict[str, str]] = {}
    _registry: ClassVar[dict[str, type[DatabaseImpl]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for backend in cls.backends:
            DatabaseImpl._registry[backend] = cls

    @classmethod
    def for_backend(cls, backend: str) -> DatabaseImpl:
        """The implementation for a SQLAlchemy backend name (`postgresql`, `mysql`, `mariadb`, `sqlite`)."""
        try:
            return cls._registry[backend]()
        except KeyError:
            raise ConfigError(
                f"database_url: unsupported database '{backend}' (supported: postgresql, mysql/mariadb, sqlite)"
            ) from None

    @classmethod
    def for_url(cls, url: URL) -> DatabaseImpl:
        return cls.for_backend(url.get_backend_name())

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

    def check_url(self, url: URL) -> None:
        """Refuse a URL that cannot work, before connecting."""

    def create_database(self, url: URL) -> None:
        """Make the database of a reaper-owned store (a ledger) when it is a file that does not exist yet."""

    def prepare_url(self, url: URL, readonly: bool) -> URL:
        """The URL to connect with (SQLite opens read-only files through a `file:` URI)."""
        return url

    def connect_args(self, url: URL, readonly: bool, connect_timeout: float | None) -> dict[str, Any]:
        """Extra DBAPI connect() arguments."""
        return {}

    def on_connect_statements(self, readonly: bool) -> list[str]:
        """Statements run on every new DBAPI connection."""
        return []

    def prepare_engine(self, engine: Engine, readonly: bool) -> None:
        """Engine-level hooks (SQLite: SQLAlchemy begins transactions, with the write lock)."""

    def lock_connect_args(self, application_name: str) -> dict[str, Any]:
        """connect() arguments for the lock's own connection."""
        return {}

    def now_query(self) -> str:
        """SQL giving the database server's clock as epoch seconds (a transaction's start, where it has one)."""
        raise NotImplementedError

    def now(self, conn: Connection) -> float:
        """The database's "now", in epoch seconds: what liveness is judged by (S9)."""
        return float(conn.execute(sa.text(self.now_query())).scalar_one())

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

    def in_(self, column: Any, values: list[Any]) -> ColumnElement[bool]:
        """`column IN values`, with values converted to the column's type (keys travel as text)."""
        return column.in_(typed_values(column, values))  # type: ignore[no-any-return]

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the rows a query selects for this transaction, skipping rows the auth server holds."""
        return query.with_for_update(skip_locked=True)

    def delete_returning(self, conn: Connection, table: sa.Table, where: Any) -> list[dict[str, Any]]:
        """Delete rows and return exactly the rows deleted."""
        result = conn.execute(sa.delete(table).where(where).returning(*table.c))
        names = list(result.keys())
        return [dict(zip(names, r, strict=True)) for r in result]  # several times faster than Row._asdict()

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

    def prepare_scan(self, conn: Connection, work_mem_mb: int) -> None:
        """Session settings for the one big scan query (local to its transaction)."""

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

    @property
    def file_lock(self) -> bool:
        """The lock is a file beside the database, not a database session (SQLite)."""
        return False


class PostgresImpl(DatabaseImpl):
    name = "postgresql"
    backends = ("postgresql",)
    drivers = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}

    def connect_args(self, url: URL, readonly: bool, connect_timeout: float | None) -> dict[str, Any]:
        args: dict[str, Any] = {}
        # Every session in UTC, so timestamps without a zone are read and compared as UTC (S9);
        # default_transaction_read_only makes the server itself refuse writes (S1).
        opts = "-c TimeZone=UTC" + (" -c default_transaction_read_only=on" if readonly else "")
        extra = url.query.get("options")
        args["options"] = f"{extra} {opts}" if isinstance(extra, str) and extra else opts
        if connect_timeout is not None:
            args["connect_timeout"] = max(1, int(connect_timeout))
        return args

    def lock_connect_args(self, application_name: str) -> dict[str, Any]:
        return {"application_name": application_name[:63], "options": "-c TimeZone=UTC"}

    def now_query(self) -> str:
        return "SELECT EXTRACT(EPOCH FROM now())::float8"

    def prepare_engine(self, engine: Engine, readonly: bool) -> None:
        @sa.event.listens_for(engine, "connect")
        def _infinite_times(dbapi_conn: Any, _record: Any) -> None:
            # 'infinity' is a valid timestamp in PostgreSQL but no Python datetime: read it as the last one
            # representable, so a row holding it is judged (a time in the future), not a failed scan.
            for name, loader in (("timestamp", _TimestampLoader), ("timestamptz", _TimestamptzLoader)):
                dbapi_conn.adapters.register_loader(name, loader)

    def in_(self, column: Any, values: list[Any]) -> ColumnElement[bool]:
        # One array parameter instead of hundreds of placeholders: the statement text stays the same from
        # batch to batch, so neither SQLAlchemy nor the server re-parses it.
        param = sa.bindparam(None, typed_values(column, values), type_=ARRAY(column.type))
        return column == sa.any_(param)  # type: ignore[no-any-return]

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"

    def insert_rows(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        # COPY, in the caller's transaction: psycopg runs an executemany as one statement per row (about 30 us
        # each) and parses the placeholders of a multi-row INSERT in Python (slower still at thousands of rows),
        # so restores and tombstones cost more than the deletes. JSON values are written as JSON text.
        if not rows:
            return
        prep = conn.dialect.identifier_preparer
        names = [c for c in rows[0]]
        json_cols = {n for n in names if isinstance(table.c[n].type, sa.JSON)}
        cols = ", ".join(prep.quote(n) for n in names)
        raw = conn.connection.driver_connection
        assert raw is not None
        statement = f"COPY {prep.format_table(table)} ({cols}) FROM STDIN"
        try:
            with raw.cursor() as cur, cur.copy(statement) as copy:
                for row in rows:
                    copy.write_row(
                        [json.dumps(row[n]) if n in json_cols and row[n] is not None else row[n] for n in names]
                    )
        except psycopg.Error as exc:  # as SQLAlchemy would raise it: callers handle DBAPIError / IntegrityError
            kind = sa.exc.IntegrityError if isinstance(exc, psycopg.IntegrityError) else sa.exc.DBAPIError
            raise kind(statement, None, exc) from None

    def prepare_scan(self, conn: Connection, work_mem_mb: int) -> None:
        # One backend, no parallel workers (each would rebuild the whole token aggregate: 3x the work on the
        # auth server's CPUs), no JIT (seconds of compile time for a query run once), enough memory to keep
        # the aggregate off disk.
        conn.execute(sa.text("SET LOCAL max_parallel_workers_per_gather = 0"))
        conn.execute(sa.text("SET LOCAL jit = off"))
        conn.execute(sa.text(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'"))

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}"))
        conn.execute(sa.text(f"SET LOCAL statement_timeout = {int(statement_timeout * 1000)}"))

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return ts + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)

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


class MySQLImpl(DatabaseImpl):
    name = "mysql"
    backends = ("mysql", "mariadb")
    drivers = {"mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}

    def connect_args(self, url: URL, readonly: bool, connect_timeout: float | None) -> dict[str, Any]:
        return {"connect_timeout": max(1, int(connect_timeout))} if connect_timeout is not None else {}

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        conn.execute(sa.text(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_timeout))}"))
        # A `mysql://` URL on a MariaDB server still gets the "mysql" dialect name: ask the dialect.
        if getattr(conn.dialect, "is_mariadb", False):
            conn.execute(sa.text(f"SET SESSION max_statement_time = {statement_timeout:g}"))
        else:
            conn.execute(sa.text(f"SET SESSION max_execution_time = {int(statement_timeout * 1000)}"))

    def delete_returning(self, conn: Connection, table: sa.Table, where: Any) -> list[dict[str, Any]]:
        # MySQL has no DELETE ... RETURNING: lock the rows first, then delete exactly those rows by primary
        # key, so the tombstone holds precisely what went (re-evaluating `where` could match a row inserted
        # since).
        rows = [dict(r) for r in conn.execute(sa.select(table).where(where).with_for_update()).mappings()]
        if not rows:
            return rows
        pk = list(table.primary_key.columns)
        if not pk:
            conn.execute(sa.delete(table).where(where))
            return rows
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            if len(pk) == 1:
                match = pk[0].in_([r[pk[0].name] for r in chunk])
            else:
                match = sa.tuple_(*pk).in_([tuple(r[c.name] for c in pk) for r in chunk])
            conn.execute(sa.delete(table).where(match))
        return rows

    def now_query(self) -> str:
        return "SELECT UNIX_TIMESTAMP(NOW(6))"

    def on_connect_statements(self, readonly: bool) -> list[str]:
        # UTC sessions: TIMESTAMP columns are read and compared in UTC, like the scan's `now`. A long
        # GROUP_CONCAT limit: values kept as rows (Keycloak's redirect URIs) are not cut at 1024 bytes.
        stmts = ["SET SESSION time_zone = '+00:00'", "SET SESSION group_concat_max_len = 16777216"]
        if readonly:
            return stmts + ["SET SESSION TRANSACTION READ ONLY"]
        # Read committed, as on PostgreSQL: each statement of a reap batch (the re-check, the deletes) sees
        # what other transactions committed up to that moment, not a snapshot taken at the batch's first read.
        return stmts + ["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"]

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.timestampadd(sa.text("SECOND"), seconds, ts)

    def find_column(self, wanted: str, actual: dict[str, Any]) -> str | None:
        if wanted in actual:
            return wanted
        lowered = {k.lower(): k for k in actual}  # MySQL/MariaDB column names are case-insensitive
        return lowered.get(wanted.lower())

    def long_text(self) -> sa.types.TypeEngine[str]:
        return mysql.LONGTEXT()

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


class SQLiteImpl(DatabaseImpl):
    name = "sqlite"
    backends = ("sqlite",)

    def check_url(self, url: URL) -> None:
        path = url.database
        if not path or path == ":memory:":
            raise ConfigError("database_url: an in-memory SQLite database has nothing to scan")
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
        return url.set(
            database=f"file:{Path(url.database).resolve()}", query={**url.query, "mode": "ro", "uri": "true"}
        )

    def now_query(self) -> str:
        return "SELECT (julianday('now') - 2440587.5) * 86400.0"  # the host's clock: SQLite has no server

    def on_connect_statements(self, readonly: bool) -> list[str]:
        # query_only makes SQLite refuse every write on this connection (S1).
        stmts = ["PRAGMA busy_timeout = 5000"]
        return stmts + (["PRAGMA query_only = ON"] if readonly else [])

    def prepare_engine(self, engine: Engine, readonly: bool) -> None:
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


def lenient_text(raw: bytes) -> str:
    """Stored bytes as text; bytes that are not UTF-8 become lone surrogates (reversible), never an error."""
    return raw.decode("utf-8", "surrogateescape")


def typed_values(column: Any, values: list[Any]) -> list[Any]:
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
