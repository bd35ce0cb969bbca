"""The read-only pipeline: config -> profile -> scan -> classify -> Snapshot (S1: nothing here writes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from reaper.check import check_schema
from reaper.classify import Classified, Classifier, Snapshot
from reaper.config import Config
from reaper.db import check_connection, describe_error, make_engine, redact
from reaper.dialects import dialect_for
from reaper.errors import ConfigError, DatabaseError, SchemaError
from reaper.loops import LoopDetector
from reaper.profile import BoundProfile, bind_profile
from reaper.scan import count_clients, scan

Progress = Callable[[int, int], None]


@dataclass
class Source:
    """A bound profile and a read-only engine on the auth database."""

    profile: BoundProfile
    engine: Engine


def open_source(config: Config, readonly: bool = True) -> Source:
    """Bind the profile, connect (read-only by default) and check the schema; raise on any mismatch."""
    if not config.database_url:
        raise ConfigError("database_url is not set (use --database-url, DCR_REAPER_DATABASE_URL or the config file)")
    profile = bind_profile(config)
    engine = make_engine(config.database_url, readonly=readonly)
    try:
        _check_source(engine, profile)
    except BaseException:
        engine.dispose()
        raise
    return Source(profile, engine)


def _check_source(engine: Engine, profile: BoundProfile) -> None:
    check_connection(engine)
    if engine.dialect.name not in profile.profile.database and not (
        engine.dialect.name in ("mysql", "mariadb") and "mysql" in profile.profile.database
    ):
        raise ConfigError(
            f"profile '{profile.name}' supports {', '.join(profile.profile.database)}, not {engine.dialect.name}"
        )
    try:
        problems = check_schema(engine, profile)
    except DBAPIError as exc:
        raise DatabaseError(f"reading the schema of {redact(engine.url)}: {describe_error(exc, engine.url)}") from None
    if problems:
        raise SchemaError(problems)


@contextmanager
def classified(
    config: Config,
    source: Source | None = None,
    progress: Progress | None = None,
    now: float | None = None,
    new_since: float | None = None,
    seen_at_watermark: dict[str, int] | None = None,
) -> Iterator[tuple[Iterator[Classified], Snapshot]]:
    """Stream classified clients; the Snapshot is complete once the stream is exhausted."""
    src = source or open_source(config)
    started = time.time() if now is None else now
    now_dt = datetime.fromtimestamp(started, UTC)
    snapshot = Snapshot(
        profile=src.profile.name,
        database=redact(src.engine.url),
        started_at=started,
        churn_window=config.classify.churn_window,
        churn_min_registrations=config.classify.churn_min_registrations,
    )
    dialect = dialect_for(src.engine)
    try:
        with src.engine.connect() as conn:
            dialect.prepare_scan(conn, config.scan.work_mem_mb)
            total = count_clients(conn, src.profile) if progress else 0
            detector = LoopDetector.start(conn, src.profile, dialect, config.loops, started, snapshot)
            rows = scan(conn, src.profile, dialect, now_dt, config.classify.clock_skew, config.scan.batch_size)
            stream = Classifier(config.classify, snapshot, started, new_since, seen_at_watermark).run(rows)
            observe = detector.observe if detector is not None else None

            def counted() -> Generator[Classified, None, None]:
                for n, item in enumerate(stream, 1):
                    if progress and n % 1000 == 0:
                        progress(n, total)
                    if observe is not None:
                        observe(item)
                    yield item
                if progress:
                    progress(snapshot.clients, total)
                if detector is not None:
                    detector.finish(snapshot)
                snapshot.finished_at = time.time()

            outer = counted()
            try:
                yield outer, snapshot
            finally:
                # Close the generators (and so the server-side cursor) while the connection is still open,
                # even when the consumer stopped early (a broken pipe, a stop request).
                outer.close()
                stream.close()
                rows.close()
            conn.rollback()
    except DBAPIError as exc:
        raise DatabaseError(f"scan of {redact(src.engine.url)} failed: {describe_error(exc, src.engine.url)}") from None
    finally:
        if source is None:
            src.engine.dispose()


def report(config: Config, progress: Progress | None = None) -> Snapshot:
    """Scan and classify everything; return only the Snapshot."""
    with classified(config, progress=progress) as (stream, snapshot):
        for _ in stream:
            pass
    return snapshot
