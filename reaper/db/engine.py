"""Engines: read-only or read-write connections to one database, set up by its implementation.

Every connection gets the implementation's timeouts and keepalives (S10), and is registered while it is open, so
that a stop request can cut every connection of an engine, or of the process, from another thread
(`abort_connections`): a call blocked on the network then returns at once with an error.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from reaper.config import DatabaseConfig
from reaper.db.impl import DatabaseImpl, Purpose, Timeouts
from reaper.db.url import describe_error, parse_url, redact
from reaper.errors import ConfigError, DatabaseError

# id(DBAPI connection) -> (the connection, its implementation, id(its engine)): every connection open now.
_open: dict[int, tuple[Any, DatabaseImpl, int]] = {}
_open_mutex = threading.Lock()


def timeouts(settings: DatabaseConfig, round_trip: float | None = None) -> Timeouts:
    """The [database] settings as an implementation reads them; `round_trip` replaces read_timeout."""
    return Timeouts(
        connect=settings.connect_timeout,
        round_trip=settings.read_timeout if round_trip is None else round_trip,
        keepalive_idle=settings.keepalive_idle,
        keepalive_interval=settings.keepalive_interval,
        keepalive_count=settings.keepalive_count,
        user_timeout=settings.user_timeout,
        stranded_after=settings.stranded_after,
    )


def make_engine(
    raw_url: str | URL,
    readonly: bool,
    connect_timeout: float | None = None,
    *,
    bounds: Timeouts | None = None,
    purpose: Purpose | None = None,
    application_name: str | None = None,
    key: str = "database_url",
    **engine_kwargs: Any,
) -> Engine:
    """An engine whose connections are read-only at the database when `readonly` (S1), with `bounds` on every
    wait (the [database] defaults when not given; `connect_timeout` replaces their connect timeout). `key` names
    the setting the URL came from in a configuration error."""
    url = raw_url if isinstance(raw_url, URL) else parse_url(raw_url, key)
    impl = DatabaseImpl.for_url(url, key)
    impl.check_url(url, key)
    t = bounds or timeouts(DatabaseConfig())
    if connect_timeout is not None:
        t = dataclasses.replace(t, connect=connect_timeout)
    role: Purpose = purpose or ("read" if readonly else "write")
    connect_args = impl.connect_args(url, role, t)
    if application_name:
        connect_args.update(impl.lock_connect_args(application_name))
    try:
        engine = sa.create_engine(
            impl.prepare_url(url, readonly), connect_args=connect_args, pool_pre_ping=True, **engine_kwargs
        )
    except (NoSuchModuleError, ArgumentError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    impl.prepare_engine(engine, readonly, t)
    engine_id = id(engine)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        impl.on_connect(dbapi_conn, role, t)
        with _open_mutex:
            _open[id(dbapi_conn)] = (dbapi_conn, impl, engine_id)

    @sa.event.listens_for(engine, "close")
    def _on_close(dbapi_conn: Any, _record: Any) -> None:
        with _open_mutex:
            _open.pop(id(dbapi_conn), None)

    @sa.event.listens_for(engine, "close_detached")
    def _on_close_detached(dbapi_conn: Any) -> None:
        with _open_mutex:
            _open.pop(id(dbapi_conn), None)

    return engine


def abort_connections(engine: Engine | None = None) -> int:
    """Cut every open connection of `engine` (of every engine made here, when None), from any thread: a call
    blocked on one fails at once. Returns how many were cut."""
    with _open_mutex:
        targets = [(c, impl) for c, impl, eid in _open.values() if engine is None or eid == id(engine)]
    for conn, impl in targets:
        impl.abort(conn)
    return len(targets)


def check_connection(engine: Engine, what: str = "") -> None:
    """Connect once, translating failures into one clear DatabaseError (`what` says which database it is)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except DBAPIError as exc:
        said = f"{what} {redact(engine.url)}" if what else redact(engine.url)
        raise DatabaseError(f"cannot connect to {said}: {describe_error(exc, engine.url)}") from None
