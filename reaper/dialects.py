"""Per-database strategies, chosen once from the engine's dialect (no `if dialect ==` elsewhere)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement


class Dialect:
    """Defaults shared by every database."""

    name = "generic"

    def connect_args(self, readonly: bool) -> dict[str, Any]:
        """Extra DBAPI connect() arguments."""
        return {}

    def on_connect_statements(self, readonly: bool) -> list[str]:
        """Statements run on every new DBAPI connection."""
        return []

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """`ts + seconds` for a timestamp column and an integer expression."""
        raise NotImplementedError

    def group_concat(self, column: ColumnElement[Any]) -> ColumnElement[Any]:
        """Newline-joined values of a grouped column."""
        return sa.func.aggregate_strings(column, "\n")

    def stream_options(self, batch: int) -> dict[str, Any]:
        """Execution options that stream rows instead of buffering the whole result."""
        return {"stream_results": True, "yield_per": batch}

    def in_(self, column: Any, values: list[Any]) -> Any:
        """`column IN values`, with values converted to the column's type (keys travel as text)."""
        return column.in_(typed_values(column, values))

    def is_lock_timeout(self, exc: BaseException) -> bool:
        """True for 'gave up waiting for a row lock' (the auth server holds it): skip, don't fail."""
        return False

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        """Bound how long this transaction waits for locks and runs one statement (S7)."""

    def prepare_scan(self, conn: Connection, work_mem_mb: int) -> None:
        """Session settings for the one big scan query (local to its transaction)."""

    def for_update(self) -> dict[str, Any]:
        """with_for_update() arguments: lock the rows we act on, skip rows the auth server holds."""
        return {"skip_locked": True}

    def delete_returning(self, conn: Connection, table: Table, where: Any) -> list[dict[str, Any]]:
        """Delete rows and return exactly the rows deleted."""
        result = conn.execute(sa.delete(table).where(where).returning(*table.c))
        return [r._asdict() for r in result]


class PostgresDialect(Dialect):
    name = "postgresql"

    def in_(self, column: Any, values: list[Any]) -> Any:
        # One array parameter instead of hundreds of placeholders: the statement text stays the same from
        # batch to batch, so neither SQLAlchemy nor the server re-parses it.
        return column == sa.any_(sa.bindparam(None, typed_values(column, values), type_=ARRAY(column.type)))

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"

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

    def connect_args(self, readonly: bool) -> dict[str, Any]:
        # default_transaction_read_only makes the server itself refuse writes (S1).
        opts = "-c default_transaction_read_only=on" if readonly else ""
        return {"options": opts} if opts else {}

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return ts + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)


class MySQLDialect(Dialect):
    name = "mysql"

    def set_timeouts(self, conn: Connection, lock_timeout: float, statement_timeout: float) -> None:
        conn.execute(sa.text(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_timeout))}"))
        # A `mysql://` URL on a MariaDB server still gets the "mysql" dialect name: ask the dialect.
        if getattr(conn.dialect, "is_mariadb", False):
            conn.execute(sa.text(f"SET SESSION max_statement_time = {statement_timeout:g}"))
        else:
            conn.execute(sa.text(f"SET SESSION max_execution_time = {int(statement_timeout * 1000)}"))

    def delete_returning(self, conn: Connection, table: Table, where: Any) -> list[dict[str, Any]]:
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


class SQLiteDialect(Dialect):
    name = "sqlite"

    def on_connect_statements(self, readonly: bool) -> list[str]:
        # query_only makes SQLite refuse every write on this connection (S1).
        stmts = ["PRAGMA busy_timeout = 5000"]
        return stmts + (["PRAGMA query_only = ON"] if readonly else [])

    def add_seconds(self, ts: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.datetime(ts, sa.literal("+") + sa.cast(seconds, sa.String) + sa.literal(" seconds"))

    def stream_options(self, batch: int) -> dict[str, Any]:
        return {"yield_per": batch}

    def for_update(self) -> dict[str, Any]:
        return {}  # SQLite has no row locks; BEGIN IMMEDIATE takes the write lock for the batch


def typed_values(column: Any, values: list[Any]) -> list[Any]:
    """Keys as the column's Python type: integers for integer key columns, text otherwise."""
    if isinstance(column.type, sa.Integer):
        return [int(v) for v in values]
    return list(values)


_BY_NAME: dict[str, type[Dialect]] = {
    "postgresql": PostgresDialect,
    "mysql": MySQLDialect,
    "mariadb": MySQLDialect,
    "sqlite": SQLiteDialect,
}


def dialect_for_name(name: str) -> Dialect:
    """The strategy for a SQLAlchemy dialect name."""
    try:
        return _BY_NAME[name]()
    except KeyError:
        raise ValueError(f"unsupported database '{name}' (supported: postgresql, mysql/mariadb, sqlite)") from None


def dialect_for(engine: Engine) -> Dialect:
    """The strategy for an engine."""
    return dialect_for_name(engine.dialect.name)
