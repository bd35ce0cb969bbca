"""The scan's fast path (psycopg's own server-side cursor, decoded by position, values remembered) gives the same
clients and verdicts as independent paths: SQLAlchemy's result layer on the same query, and the same rows copied
into SQLite and scanned there. On the benchmark's dataset shape (bench/dataset.py), at small N."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from bench.dataset import INDEXES, SCHEMA, ensure_pg
from kit.config import make_config
from kit.databases import SERVER_URLS, require
from reaper import commands
from reaper.backends.sql import SqlBackend
from reaper.backends.sql.scan import RowDecoder, build_query, paced
from reaper.db import DatabaseImpl
from reaper.errors import DatabaseError
from reaper.profiles import bind_profile

N = 2500


@pytest.fixture(scope="module")
def bench_pg() -> tuple[str, int]:
    """The benchmark's PostgreSQL dataset at N clients: its SQLAlchemy URL and the time it was made at."""
    require("postgresql")
    url = make_url(SERVER_URLS["postgresql"])
    admin = f"host={url.host or '127.0.0.1'} user={url.username or 'postgres'} dbname={url.database}"
    dsn, now = ensure_pg(admin, N, log=lambda _msg: None)
    dbname = dict(p.split("=", 1) for p in dsn.split())["dbname"]
    return str(url.set(database=dbname)), now


def _copy_to_sqlite(url: str, path: Path) -> None:
    """The same rows, every column, in an SQLite file of the same schema."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA + INDEXES)
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as pg:
        for table in ("oauth2_client", "oauth2_token", "oauth2_code"):
            cur = pg.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
            rows = cur.fetchall()
            if rows:
                marks = ",".join("?" * len(rows[0]))
                db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)  # noqa: S608
    db.commit()
    db.close()


def _verdicts(url: str, now: float) -> tuple[Counter[tuple[str, str, str]], dict[str, str]]:
    """Clients per (family, verdict, reason), and each client's verdict, from one full scan at `now`."""
    config = make_config(url)
    per_family: Counter[tuple[str, str, str]] = Counter()
    each: dict[str, str] = {}
    with commands.classified(config, now=now) as (stream, _snapshot):
        for item in stream:
            per_family[(item.family, str(item.verdict), item.reason)] += 1
            each[item.row.client_id] = f"{item.verdict}/{item.reason}"
    return per_family, each


@pytest.mark.pg
def test_fast_scan_verdicts_match_sqlite_scan_of_the_same_rows(bench_pg, tmp_path):
    url, now = bench_pg
    path = tmp_path / "copy.sqlite"
    _copy_to_sqlite(url, path)
    fast, fast_each = _verdicts(url, now)
    reference, reference_each = _verdicts(f"sqlite:///{path}", now)
    assert sum(fast.values()) > 0.9 * N
    assert {v for (_f, v, _r) in fast} >= {"live", "orphan"}  # the dataset's shape: a live newest, orphans
    assert fast == reference
    assert fast_each == reference_each


@pytest.mark.pg
def test_driver_rows_decode_like_sqlalchemy_rows(bench_pg):
    """Row by row: psycopg's tuples (PostgresImpl.scan_rows) and SQLAlchemy's Rows (the generic path) decode to
    equal ClientRows, in the same order."""
    url, now = bench_pg
    config = make_config(url)
    backend = SqlBackend(config, bind_profile(config))
    try:
        backend.check()
        at = datetime.fromtimestamp(now, UTC)
        query = build_query(backend.profile, backend.impl, at)
        decoded = {}
        for name, scan_rows in (("driver", backend.impl.scan_rows), ("sqlalchemy", DatabaseImpl().scan_rows)):
            with backend.read_engine.connect() as conn:
                backend.impl.prepare_scan(conn, 64, 60)
                with scan_rows(conn, query, 700) as (keys, batches):
                    decode = RowDecoder(backend.profile, at, 30.0, keys).decode
                    decoded[name] = sorted((decode(row) for rows in batches for row in rows), key=lambda r: r.key)
                conn.rollback()
        assert len(decoded["driver"]) > 0.9 * N
        assert decoded["driver"] == decoded["sqlalchemy"]
    finally:
        backend.close()


@pytest.mark.pg
def test_interrupt_ends_a_scan_reading_from_the_driver(bench_pg):
    """Backend.interrupt() cuts the connection under psycopg's server-side cursor: the next fetch fails as a
    DatabaseError, and the scan ends there (a stop request, a signal)."""
    url, now = bench_pg
    config = make_config(url, scan={"batch_size": 500})
    backend = SqlBackend(config, bind_profile(config))
    seen = 0
    try:
        with pytest.raises(DatabaseError), commands.classified(config, backend, now=now) as (stream, _snapshot):
            for _item in stream:
                seen += 1
                if seen == 10:
                    backend.interrupt()
        assert seen < N / 2
    finally:
        backend.close()


@pytest.mark.slow
def test_a_rate_limited_scan_hands_out_every_row_no_faster_than_its_rate():
    """scan.max_rows_per_second: the same rows in the same order, at most that many a second on average, in
    slices of a tenth of a second's worth (a stop request never waits longer than one)."""
    batches = [list(range(i, i + 1000)) for i in range(0, 3000, 1000)]
    started = time.monotonic()
    slices = list(paced(iter(batches), 2000))
    took = time.monotonic() - started
    assert [row for chunk in slices for row in chunk] == list(range(3000))
    assert max(len(chunk) for chunk in slices) == 200
    assert 1.35 <= took < 3.0, took


def test_the_collector_runs_rarely_during_a_scan_and_as_before_after_it(bench_pg):
    """few_collections: a raised gen-0 threshold while the stream runs, put back after it, also when the consumer
    stops early."""
    import gc

    from reaper.analysis.pipeline import SCAN_GC_THRESHOLD

    url, now = bench_pg
    config = make_config(url)
    before = gc.get_threshold()
    for stop_after in (None, 10):
        seen = []
        with commands.classified(config, now=now) as (stream, _snapshot):
            for n, _item in enumerate(stream, 1):
                seen.append(gc.get_threshold()[0])
                if n == stop_after:
                    break
        assert seen and set(seen) == {max(before[0], SCAN_GC_THRESHOLD)}
        assert gc.get_threshold() == before, "put back after the scan"


def test_overlapping_scans_put_the_collector_back_when_the_last_ends():
    """Scans in two threads ending in either order leave the threshold as it was; threshold 0 (automatic collection
    off) stays 0 through a scan."""
    import gc

    from reaper.analysis.pipeline import SCAN_GC_THRESHOLD, few_collections

    before = gc.get_threshold()
    try:
        first, second = few_collections(), few_collections()
        first.__enter__()
        second.__enter__()
        assert gc.get_threshold()[0] == max(before[0], SCAN_GC_THRESHOLD)
        first.__exit__(None, None, None)  # the first ends before the second
        assert gc.get_threshold()[0] == max(before[0], SCAN_GC_THRESHOLD), "the second still runs"
        second.__exit__(None, None, None)
        assert gc.get_threshold() == before
        gc.set_threshold(0)
        with few_collections():
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


def test_decoded_problems_keep_the_profiles_field_order_with_a_dotted_json_path(tmp_path):
    """A one-part JSON path is read with one lookup, a dotted one member by member; the fields still decode, and
    report their problems, in the profile's order (the name before the redirect URIs)."""
    builtin = Path(__file__).parent.parent / "reaper" / "profiles" / "builtin" / "authlib.toml"
    text = builtin.read_text(encoding="utf-8").replace('name = "authlib"', 'name = "authlib-dotted"', 1)
    text = text.replace('json = "client_name"', 'json = "a.b"', 1)
    custom = tmp_path / "authlib-dotted.toml"
    custom.write_text(text, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'unused.db'}"
    profile = bind_profile(make_config(url, profile=str(custom)))
    now = datetime.fromtimestamp(1_800_000_000, UTC)
    keys = list(build_query(profile, DatabaseImpl.for_backend("sqlite"), now).selected_columns.keys())
    values = dict.fromkeys(keys)
    values.update(k="c1", client_id="c1", f_0=1_700_000_000, is_dynamic=1, is_cimd=0)
    values["f_1"] = '{"a": {"b": "\udcff"}, "redirect_uris": "not json"}'
    row = RowDecoder(profile, now, 30.0, keys).decode(tuple(values[k] for k in keys))
    assert row.problems == ["client_metadata: name is not valid UTF-8", "client_metadata: redirect URIs unreadable"]
