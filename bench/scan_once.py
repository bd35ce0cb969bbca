"""One measured scan in a fresh process: `floor` (bare psycopg server-side cursor, same SQL, an empty loop),
`table` (`report`, the table written), `json` (`report --format json`, written to a file) or `state` (`serve`'s
first tick: a full scan that keeps the state incremental ticks read, with no memory bound; rows: clients kept).

Prints one JSON line: seconds, peak RSS in MB, rows, and the CPU seconds the scan's PostgreSQL backends used
(read from /proc, so only when the server runs on this host).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from reaper import commands
from reaper.backends.sql.scan import build_query
from reaper.commands import classified
from reaper.config import load_config
from reaper.db import DatabaseImpl
from reaper.output import Filters, render
from reaper.profiles import bind_profile

TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a PostgreSQL backend on this host (None when it is elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of stat(5)


class BackendCpu:
    """The CPU used by every PostgreSQL backend the reaper's engines open, read when each connection goes back to
    its pool (cumulative per backend, so the last reading of each counts)."""

    def __init__(self) -> None:
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        sa.event.listen(sa.engine.Engine, "connect", self._connected)
        sa.event.listen(sa.engine.Engine, "checkin", self._checked_in)

    def _connected(self, dbapi_conn: Any, _record: Any) -> None:
        pid = getattr(getattr(dbapi_conn, "info", None), "backend_pid", None)
        cpu = backend_cpu(pid) if pid else None
        if pid and cpu is not None:
            self.start[pid] = self.last[pid] = cpu

    def _checked_in(self, dbapi_conn: Any, _record: Any) -> None:
        pid = getattr(getattr(dbapi_conn, "info", None), "backend_pid", None)
        cpu = backend_cpu(pid) if pid in self.start else None
        if cpu is not None:
            self.last[pid] = cpu

    def seconds(self) -> float | None:
        return sum(self.last[p] - self.start[p] for p in self.start) if self.start else None


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's `ru_maxrss` starts a child at its parent's RSS when it forks (and keeps
    it across exec): bench.run's process, grown by the in-process tick measurements, would be reported as the scan's.
    `VmHWM` is the peak of this process's own memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor(url: str, config_overrides: dict) -> tuple[int, float | None]:
    config = load_config(None, {"database_url": url, **config_overrides}, environ={})
    profile = bind_profile(config)
    query = build_query(profile, DatabaseImpl.for_backend("postgresql"), datetime.now(UTC))
    compiled = query.compile(dialect=postgresql.psycopg.dialect())
    sql, params = str(compiled), compiled.params
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    rows = 0
    with psycopg.connect(dsn) as conn:
        before = backend_cpu(conn.info.backend_pid)
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
        after = backend_cpu(conn.info.backend_pid)
    return rows, (after - before) if before is not None and after is not None else None


def reaper_scan(url: str, config_overrides: dict, fmt: str) -> tuple[int, float | None]:
    """`report` in this format, as the CLI writes it: the table to a terminal-sized sink, JSON to a file."""
    config = load_config(None, {"database_url": url, **config_overrides}, environ={})
    cpu = BackendCpu()
    rep = config.report
    filters = Filters(reapable=frozenset(config.policy.verdicts))
    with tempfile.TemporaryDirectory() as tmp:
        with (
            open(Path(tmp) / f"report.{fmt}", "w", encoding="utf-8") as out,
            classified(config) as (stream, snapshot),
        ):
            render(fmt, stream, snapshot, out, filters, rep.top_families, rep.max_rows, rep.show_ips)
    return snapshot.clients, cpu.seconds()


def state_build(url: str, config_overrides: dict) -> tuple[int, float | None]:
    """`serve`'s first tick, whatever the memory limit of the machine it runs on."""
    overrides = {**config_overrides, "service": {"state_max_rss_mb": 1e9}}
    config = load_config(None, {"database_url": url, **overrides}, environ={})
    cpu = BackendCpu()
    _, state = commands.tick(config)
    assert state is not None, "the state was not kept"
    return state.size(), cpu.seconds()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["floor", "table", "json", "state"])
    ap.add_argument("url")
    ap.add_argument("--profile", default="authlib")
    ap.add_argument("--max-rows-per-second", type=int, default=None, help="scan.max_rows_per_second")
    args = ap.parse_args()
    overrides: dict[str, Any] = {"profile": args.profile}
    if args.max_rows_per_second:
        overrides["scan"] = {"max_rows_per_second": args.max_rows_per_second}
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.mode == "floor":
        rows, db_cpu = floor(args.url, overrides)
    elif args.mode == "state":
        rows, db_cpu = state_build(args.url, overrides)
    else:
        rows, db_cpu = reaper_scan(args.url, overrides, args.mode)
    seconds = time.perf_counter() - started
    rss_mb = peak_rss_mb()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "seconds": seconds,
                "rss_mb": rss_mb,
                "rows": rows,
                "cpu_s": time.process_time() - cpu_started,
                "db_cpu_s": db_cpu,
            }
        )
    )


if __name__ == "__main__":
    main()
