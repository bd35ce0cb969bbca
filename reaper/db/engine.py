"""Engines: read-only or read-write connections to one database, set up by its implementation."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from reaper.db.impl import DatabaseImpl
from reaper.db.url import describe_error, parse_url, redact
from reaper.errors import ConfigError, DatabaseError


def make_engine(raw_url: str, readonly: bool, connect_timeout: float | None = None, **engine_kwargs: Any) -> Engine:
    """An engine whose connections are read-only at the database when `readonly` (S1)."""
    url = parse_url(raw_url)
    impl = DatabaseImpl.for_url(url)
    impl.check_url(url)
    connect_args = impl.connect_args(url, readonly, connect_timeout)
    try:
        engine = sa.create_engine(
            impl.prepare_url(url, readonly), connect_args=connect_args, pool_pre_ping=True, **engine_kwargs
        )
    except (NoSuchModuleError, ArgumentError) as exc:
        raise ConfigError(f"database_url: {exc}") from None
    impl.prepare_engine(engine, readonly)
    statements = impl.on_connect_statements(readonly)
    if statements:

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            for stmt in statements:
                cur.execute(stmt)
            cur.close()

    return engine


def check_connection(engine: Engine) -> None:
    """Connect once, translating failures into one clear DatabaseError."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except DBAPIError as exc:
        raise DatabaseError(f"cannot connect to {redact(engine.url)}: {describe_error(exc, engine.url)}") from None
