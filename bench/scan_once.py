"""One measured scan in a fresh process: `floor` (bare psycopg cursor, same SQL) or `reaper` (full classification).

Prints one JSON line: seconds, peak RSS in MB, rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from datetime import UTC, datetime

import psycopg
from sqlalchemy.dialects import postgresql

from reaper.backends.sql.scan import build_query
from reaper.commands import report
from reaper.config import load_config
from reaper.db import DatabaseImpl
from reaper.profiles import bind_profile


def floor(url: str, config_overrides: dict) -> int:
    config = load_config(None, {"database_url": url, **config_overrides}, environ={})
    profile = bind_profile(config)
    query = build_query(profile, DatabaseImpl.for_backend("postgresql"), datetime.now(UTC))
    compiled = query.compile(dialect=postgresql.psycopg.dialect())
    sql, params = str(compiled), compiled.params
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    rows = 0
    with psycopg.connect(dsn) as conn:
        conn.read_only = True
        # The same session settings the reaper uses for its scan (reaper/db/impl.py).
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        conn.execute("SET LOCAL jit = off")
        conn.execute(f"SET LOCAL work_mem = '{config.scan.work_mem_mb}MB'")
        with conn.cursor(name="floor") as cur:
            cur.itersize = config.scan.batch_size
            cur.execute(sql, params)
            for _row in cur:
                rows += 1
    return rows


def reaper_scan(url: str, config_overrides: dict) -> int:
    config = load_config(None, {"database_url": url, **config_overrides}, environ={})
    return report(config).clients


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["floor", "reaper"])
    ap.add_argument("url")
    ap.add_argument("--profile", default="authlib")
    args = ap.parse_args()
    overrides = {"profile": args.profile}
    started = time.perf_counter()
    rows = (floor if args.mode == "floor" else reaper_scan)(args.url, overrides)
    seconds = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "seconds": seconds, "rss_mb": rss_mb, "rows": rows}))


if __name__ == "__main__":
    main()
