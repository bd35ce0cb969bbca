"""Engines: driver choice, read-only connections, password redaction and error translation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from reaper.dialects import dialect_for_name
from reaper.errors import ConfigError, DatabaseError

_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def parse_url(raw: str) -> URL:
    """A SQLAlchemy URL, with psycopg / PyMySQL as default drivers; a bare path means SQLite."""
    if "://" not in raw:
        raw = f"sqlite:///{Path(raw).expanduser().resolve()}"
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a non-numeric port
        raise ConfigError("database_url: not a database URL (e.g. postgresql://user@host:5432/db)") from None
    if url.drivername in _DRIVERS:
        url = url.set(drivername=_DRIVERS[url.drivername])
    return url


def redact(url: URL | str) -> str:
    """The URL with its password hidden, for messages and logs (S8)."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    if "password" in parsed.query:  # libpq also takes ?password=...
        parsed = parsed.update_query_dict({"password": "***"})
    db = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and db.startswith("file:") and parsed.query.get("uri") == "true":
        return f"sqlite:///{db.removeprefix('file:')}"  # the read-only form of a plain SQLite URL
    return parsed.render_as_string(hide_password=True).replace("password=%2A%2A%2A", "password=***")


def _scrub(message: str, url: URL) -> str:
    message = message.strip().splitlines()[0] if message.strip() else "unknown error"
    secrets = [url.password, *url.normalized_query.get("password", ())]
    for secret in filter(None, secrets):
        message = message.replace(str(secret), "***")
    return re.sub(r"password=\S+", "password=***", message)


def describe_error(exc: BaseException, url: URL) -> str:
    """One line describing a database error, never echoing the password."""
    orig = getattr(exc, "orig", None) or exc
    return _scrub(str(orig), url)


def make_engine(raw_url: str, readonly: bool, **engine_kwargs: Any) -> Engine:
    """An engine whose connections are read-only at the database when `readonly` (S1)."""
    url = parse_url(raw_url)
    try:
        strategy = dialect_for_name(url.get_backend_name())
    except ValueError as exc:
        raise ConfigError(f"database_url: {exc}") from None
    if strategy.name == "sqlite":
        path = url.database
        if not path or path == ":memory:":
            raise ConfigError("database_url: an in-memory SQLite database has nothing to scan")
        if not Path(path).is_file():
            raise DatabaseError(f"cannot open {redact(url)}: no such SQLite database file")
        if readonly:
            # Opened read-only by the OS as well: even a WAL checkpoint on close cannot touch the file (S1).
            url = url.set(database=f"file:{Path(path).resolve()}", query={**url.query, "mode": "ro", "uri": "true"})
    connect_args = strategy.connect_args(readonly)
    if "options" in connect_args and url.query.get("options"):
        connect_args["options"] = f"{url.query['options']} {connect_args['options']}"
    try:
        engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, **engine_kwargs)
    except (NoSuchModuleError, ArgumentError) as exc:
        raise ConfigError(f"database_url: {exc}") from None
    if strategy.name == "sqlite" and not readonly:
        _sqlite_immediate_transactions(engine)
    statements = strategy.on_connect_statements(readonly)
    if statements:

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            for stmt in statements:
                cur.execute(stmt)
            cur.close()

    return engine


def _sqlite_immediate_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not pysqlite, begin transactions, and take the write lock at BEGIN."""

    @sa.event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def check_connection(engine: Engine) -> None:
    """Connect once, translating failures into one clear DatabaseError."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except DBAPIError as exc:
        raise DatabaseError(f"cannot connect to {redact(engine.url)}: {describe_error(exc, engine.url)}") from None
