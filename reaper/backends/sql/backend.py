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
from reaper.backends.sql.delta import SqlDelta
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

SCAN_KEY = "scan_database_url"


class SqlBackend:
    """Scans read-only (S1), from scan_database_url when it is set (a streaming replica); acts, re-checks, locks
    and keeps the ledger on database_url (the primary), on a read-write engine opened only when needed."""

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
        self.replica = config.scan_database_url is not None
        self.scan_url = self.url
        if config.scan_database_url is not None:
            self.scan_url = parse_url(config.scan_database_url, SCAN_KEY)
            scan_impl = DatabaseImpl.for_url(self.scan_url, SCAN_KEY)
            if type(scan_impl) is not type(self.impl):
                raise ConfigError(
                    f"{SCAN_KEY}: a replica of database_url's {self.impl.name} database is {self.impl.name} too, "
                    f"not {scan_impl.name}"
                )
        self.scan_description = redact(self.scan_url)  # what reports name: the store the scan read
        self._engines: dict[str, Engine] = {}

    # -- engines -------------------------------------------------------------------------------------------

    def _engine(self, role: str) -> Engine:
        if role not in self._engines:
            assert self.config.database_url
            db = self.config.database
            # A scan statement may run for scan.statement_timeout at the server: wait that long, and read_timeout
            # more, for any answer on a read connection.
            scan_bound = timeouts(db, round_trip=self.config.scan.statement_timeout + db.read_timeout)
            quick = self.config.service.database_timeout
            if role == "read":
                self._engines[role] = make_engine(self.config.database_url, readonly=True, bounds=scan_bound)
            elif role == "scan":
                self._engines[role] = make_engine(self.scan_url, readonly=True, bounds=scan_bound, key=SCAN_KEY)
            elif role == "write":
                self._engines[role] = make_engine(self.config.database_url, readonly=False, bounds=timeouts(db))
            elif role in ("ping", "scan-ping"):
                self._engines[role] = make_engine(
                    self.scan_url if role == "scan-ping" else self.url,
                    readonly=True,
                    connect_timeout=quick,
                    bounds=timeouts(db, round_trip=quick),
                    poolclass=NullPool,
                    key=SCAN_KEY if role == "scan-ping" else "database_url",
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
        """Read-only on database_url: what must see the truth without writing (the ledger for `check`, the clock
        a reap is checked against, Keycloak's re-check)."""
        return self._engine("read")

    @property
    def scan_engine(self) -> Engine:
        """Read-only on what the scan reads: scan_database_url, else database_url's own read engine."""
        return self._engine("scan") if self.replica else self.read_engine

    @property
    def write_engine(self) -> Engine:
        return self._engine("write")

    def close(self) -> None:
        """Close every connection. The engines stay for the next use (`serve` closes after each tick), where
        the database allows (not a SQLite file's): their compiled statements and the dialect's first-connect
        checks are not paid again."""
        for role, engine in list(self._engines.items()):
            engine.dispose()
            if not DatabaseImpl.for_engine(engine).engine_outlives_close:
                del self._engines[role]

    def interrupt(self) -> None:
        """Cut every connection this backend has open (not the run lock's): a blocked call fails at once."""
        for engine in list(self._engines.values()):
            abort_connections(engine)

    # -- the seam ------------------------------------------------------------------------------------------

    def check(self, deep: bool = False) -> list[Finding]:
        """The schema as the scan reads it (a physical replica's is its primary's); with `deep`, also the
        primary, and what the scan store is to it."""
        engine = self.scan_engine
        check_connection(engine, SCAN_KEY if self.replica else "")
        if not self.impl.supported_by(self._bound.profile.database):
            raise ConfigError(
                f"profile '{self._bound.name}' supports {', '.join(self._bound.profile.database)}, "
                f"not {engine.dialect.name}"
            )
        try:
            self.profile, findings = preflight(self._bound, engine, self.config.ledger.prefix, deep)
        except DBAPIError as exc:
            raise DatabaseError(
                f"reading the schema of {self.scan_description}: {describe_error(exc, self.scan_url)}"
            ) from None
        if deep and self.replica:
            findings += self._replica_findings()
        if deep:
            where = redact(parse_url(self.config.ledger.url)) if self.config.ledger.url else self.description
            findings += ledger_findings(self._read_ledger(), where)
        return findings

    def _replica_findings(self) -> list[Finding]:
        """What scan_database_url is to database_url: its standby, the primary itself, or something else."""
        check_connection(self.read_engine, "database_url")
        roles, clocks = [], []
        for engine, url in ((self.scan_engine, self.scan_url), (self.read_engine, self.url)):
            try:
                with engine.connect() as conn:
                    roles.append(self.impl.server_role(conn))
                    clocks.append(self.impl.now(conn))
                    conn.rollback()
            except DBAPIError as exc:
                raise DatabaseError(f"reading the role of {redact(url)}: {describe_error(exc, url)}") from None
        scan, primary = roles
        replica, source = self.scan_description, self.description
        if scan is None or primary is None:
            return [
                Finding(
                    "info",
                    "replica",
                    f"the scan reads {replica}; {self.impl.name} cannot say whether it replicates {source} "
                    "(the reap re-checks every client on the primary all the same)",
                )
            ]
        if scan.server == primary.server and scan.cluster == primary.cluster:
            return [
                Finding(
                    "info",
                    "replica",
                    f"{SCAN_KEY} points at database_url's own server ({source}): the scan reads the primary",
                    f"point {SCAN_KEY} at a streaming replica to take the scan off the primary",
                )
            ]
        known = scan.cluster is not None and primary.cluster is not None
        if known and scan.cluster != primary.cluster:
            return [
                Finding(
                    "error",
                    "replica",
                    f"{SCAN_KEY} ({replica}) is not a copy of database_url ({source}): system identifiers "
                    f"{scan.cluster} and {primary.cluster} differ",
                    f"point {SCAN_KEY} at a streaming replica of database_url, or unset it",
                )
            ]
        if not scan.standby:
            return [
                Finding(
                    "warning",
                    "replica",
                    f"{SCAN_KEY} ({replica}) is not a standby: a primary of its own (a promoted replica?) whose "
                    f"data need not follow database_url ({source}) any more",
                    f"point {SCAN_KEY} at a streaming replica of database_url",
                )
            ]
        lag = ""
        if scan.replayed_at is not None:
            lag = (
                f"; its last replayed transaction committed {clocks[1] - scan.replayed_at:.1f}s before the primary's "
                "now (on a quiet primary that bounds the lag from above)"
            )
        said = f"the scan reads {replica}, a read-only standby replaying {source}{lag}"
        if not known:
            said += " (the system identifiers are not readable here to confirm it)"
        findings = [Finding("info", "replica", said)]
        if scan.replay_paused:
            findings.append(
                Finding(
                    "warning",
                    "replica",
                    f"replay is paused on {replica}: scans read an old snapshot (the reap re-checks on the "
                    "primary, but the plan lags)",
                    "SELECT pg_wal_replay_resume() on the replica",
                )
            )
        skew = clocks[0] - clocks[1]
        if abs(skew) > self.config.classify.clock_skew:
            findings.append(
                Finding(
                    "warning",
                    "clock",
                    f"the clocks of {replica} (the scan's verdicts) and {source} (the reap's re-check) differ by "
                    f"{skew:+.1f}s, more than classify.clock_skew",
                    "fix the hosts' time sync (NTP)",
                )
            )
        return findings

    def _read_ledger(self) -> Ledger:
        """The ledger seen through a read-only engine: `check` inspects it, and never creates it."""
        if self.config.ledger.url:
            return Ledger(self._engine("ledger-read"), self.config.ledger)
        return Ledger(self.read_engine, self.config.ledger, shared=True)

    @contextmanager
    def scan(self, now: float | None = None) -> Iterator[SqlScan]:
        engine = self.scan_engine
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
                    self.scan_description,
                    self.config.scan.max_rows_per_second,
                )
                conn.rollback()
        except DBAPIError as exc:
            raise DatabaseError(
                f"scan of {self.scan_description} failed: {describe_error(exc, self.scan_url)}"
            ) from None

    def delta(self, source: SqlScan) -> SqlDelta:
        """What changed since an earlier scan, read through this scan (for `serve`'s incremental ticks)."""
        return SqlDelta(source)

    def now(self) -> float:
        """The primary's clock: what the reap's re-check judges by, so what a reap is checked against (S9)."""
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
        """Both stores answer: the primary, and the scan replica when there is one (each named on failure)."""
        for role in ("ping", "scan-ping") if self.replica else ("ping",):
            engine = self._engine(role)
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except DBAPIError as exc:
                said = f"{SCAN_KEY} {self.scan_description}" if role == "scan-ping" else self.description
                raise DatabaseError(f"{said}: {describe_error(exc, engine.url)}") from None
