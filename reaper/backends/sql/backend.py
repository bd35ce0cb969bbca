"""The SQL backend: an auth server's own database on PostgreSQL, MySQL/MariaDB or SQLite."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from reaper.backends.base import Actor, Candidate, Finding
from reaper.backends.ledger_check import ledger_findings
from reaper.backends.sql.actor import SqlActor, SqlStatements
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.backends.sql.preflight import preflight
from reaper.backends.sql.scan import SqlScan
from reaper.config import Config
from reaper.db import (
    DatabaseImpl,
    abort_connections,
    check_connection,
    describe_error,
    make_engine,
    parse_url,
    redact,
    timeouts,
)
from reaper.errors import ConfigError, DatabaseError
from reaper.ledger import Ledger
from reaper.profiles import BoundProfile


class SqlBackend:
    """Scans read-only (S1); acts, locks and keeps the ledger on a read-write engine opened only when needed."""

    def __init__(self, config: Config, profile: BoundProfile):
        if not config.database_url:
            raise ConfigError(
                "database_url is not set (use --database-url, DCR_REAPER_DATABASE_URL or the config file)"
            )
        self.config = config
        self._bound = profile  # as configured; `profile` is resolved against the live schema by check()
        self.profile = profile
        self.url = parse_url(config.database_url)
        self.impl = DatabaseImpl.for_url(self.url)
        self.description = redact(self.url)
        self._engines: dict[str, Engine] = {}

    # -- engines -------------------------------------------------------------------------------------------

    def _engine(self, role: str) -> Engine:
        if role not in self._engines:
            assert self.config.database_url
            db = self.config.database
            if role == "read":
                # A scan statement may run for scan.statement_timeout at the server: wait that long, and
                # read_timeout more, for any answer on the read connection.
                scan_bound = self.config.scan.statement_timeout + db.read_timeout
                self._engines[role] = make_engine(
                    self.config.database_url, readonly=True, bounds=timeouts(db, round_trip=scan_bound)
                )
            elif role == "write":
                self._engines[role] = make_engine(self.config.database_url, readonly=False, bounds=timeouts(db))
            elif role == "ping":
                quick = self.config.service.database_timeout
                self._engines[role] = make_engine(
                    self.config.database_url,
                    readonly=True,
                    connect_timeout=quick,
                    bounds=timeouts(db, round_trip=quick),
                    poolclass=NullPool,
                )
            elif role == "ledger-read":
                assert self.config.ledger.url
                self._engines[role] = make_engine(self.config.ledger.url, readonly=True)
            else:  # the ledger's own database
                assert self.config.ledger.url
                self._engines[role] = make_engine(self.config.ledger.url, readonly=False, bounds=timeouts(db))
        return self._engines[role]

    @property
    def read_engine(self) -> Engine:
        return self._engine("read")

    @property
    def write_engine(self) -> Engine:
        return self._engine("write")

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def interrupt(self) -> None:
        """Cut every connection this backend has open (not the run lock's): a blocked call fails at once."""
        for engine in list(self._engines.values()):
            abort_connections(engine)

    # -- the seam ------------------------------------------------------------------------------------------

    def check(self, deep: bool = False) -> list[Finding]:
        engine = self.read_engine
        check_connection(engine)
        if not self.impl.supported_by(self._bound.profile.database):
            raise ConfigError(
                f"profile '{self._bound.name}' supports {', '.join(self._bound.profile.database)}, "
                f"not {engine.dialect.name}"
            )
        try:
            self.profile, findings = preflight(self._bound, engine, self.config.ledger.prefix, deep)
        except DBAPIError as exc:
            raise DatabaseError(f"reading the schema of {self.description}: {describe_error(exc, self.url)}") from None
        if deep:
            where = redact(parse_url(self.config.ledger.url)) if self.config.ledger.url else self.description
            findings += ledger_findings(self._read_ledger(), where)
        return findings

    def _read_ledger(self) -> Ledger:
        """The ledger seen through a read-only engine: `check` inspects it, and never creates it."""
        if self.config.ledger.url:
            return Ledger(self._engine("ledger-read"), self.config.ledger)
        return Ledger(self.read_engine, self.config.ledger, shared=True)

    @contextmanager
    def scan(self, now: float | None = None) -> Iterator[SqlScan]:
        engine = self.read_engine
        try:
            with self.impl.read_guard(engine), engine.connect() as conn:
                self.impl.prepare_scan(conn, self.config.scan.work_mem_mb, self.config.scan.statement_timeout)
                at = self.impl.now(conn) if now is None else now
                yield SqlScan(
                    conn,
                    self.profile,
                    self.impl,
                    datetime.fromtimestamp(at, UTC),
                    self.config.classify.clock_skew,
                    self.config.scan.batch_size,
                    self.description,
                    self.config.scan.max_rows_per_second,
                )
                conn.rollback()
        except DBAPIError as exc:
            raise DatabaseError(f"scan of {self.description} failed: {describe_error(exc, self.url)}") from None

    def now(self) -> float:
        try:
            with self.read_engine.connect() as conn:
                return self.impl.now(conn)
        except DBAPIError as exc:
            raise DatabaseError(f"reading the clock of {self.description}: {describe_error(exc, self.url)}") from None

    def lock(self) -> RunLock:
        engine = self.write_engine
        db = self.config.database
        return RunLock(engine, lock_name(self.config.ledger.prefix), timeouts(db), db.sqlite_lock_dir)

    def ledger(self) -> Ledger:
        if self.config.ledger.url:
            return Ledger(self._engine("ledger"), self.config.ledger)
        return Ledger(self.write_engine, self.config.ledger, shared=True)

    def actor(self) -> Actor:
        return SqlActor(
            self.profile, self.write_engine, self.ledger(), self.config.policy, self.config.classify.stale_after
        )

    def statements(self, batch: Sequence[Candidate]) -> list[str]:
        engine = self.read_engine
        review = SqlStatements(self.profile, engine, self.config.policy)
        now = datetime.fromtimestamp(self.now(), UTC)
        return review.review(batch, now, engine.dialect, self.config.classify.stale_after)

    def ping(self) -> None:
        with self._engine("ping").connect() as conn:
            conn.execute(sa.text("SELECT 1"))
