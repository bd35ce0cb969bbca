"""`serve`'s steady state: a full scan against an incremental tick on an unchanged PostgreSQL database
(`python -m bench.tick`; docs/performance.md, "Incremental ticks").

Both are timed in the same run on the cached Authlib datasets of bench/dataset.py; the tick is judged one scan
interval later than the scan before it, so grace periods and churn windows move as they do in production. The
state's size is measured with tracemalloc in a separate pass (tracing slows the scan, not what it keeps).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from typing import Any

from bench.dataset import ensure_pg
from bench.run import ADMIN_DSN, sqla_url
from reaper import commands
from reaper.backends import Backend, open_backend
from reaper.config import Config, load_config

TARGET = 0.10  # an incremental tick costs at most this share of a full scan
INTERVAL = 300.0  # seconds between ticks (service.scan_interval's default)
# The datasets were written around their `now`; judging the first scan this much later leaves the write time
# outside the watermark's overlap, as on a database nothing has changed in for a while.
QUIET = 900.0
# The dataset issued every live client's token a minute before its `now`, for an hour: their access tokens all
# expire at once (the refresh tokens keep the clients live), and the first tick after that re-reads every live
# client. The benchmark ticks every interval up to that one and reports it apart: a real server's expiries are
# spread over the hour, so a tick meets a share of this wave.
WAVE_AT = 3600.0 - 60.0


def _config(url: str) -> Config:
    return load_config(None, {"database_url": url, "profile": "authlib"}, environ={})


def _full_scan(config: Config, backend: Backend, now: float) -> float:
    """Seconds for one full scan as `serve` ran it before incremental ticks (no state kept)."""
    started = time.perf_counter()
    with commands.classified(config, backend, now=now) as (stream, _):
        for _ in stream:
            pass
    backend.close()
    return time.perf_counter() - started


def state_bytes(url: str, now: float) -> tuple[int, int]:
    """Bytes the state keeps, and its clients."""
    config = _config(url)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _, state = commands.tick(config, None, now=now)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert state is not None
    return kept, state.size()


def measure(url: str, now: float, repeats: int = 3, log: Any = None) -> dict[str, Any]:
    """Median seconds of a full scan and of an incremental tick on an unchanged database, and their ratio."""
    config = _config(url)
    # One backend for the run, closed after each scan and tick, as `serve` keeps it.
    backend = open_backend(config)
    full, build, ticks, waves = [], [], [], []
    wave = now - QUIET + WAVE_AT
    for _ in range(repeats):
        full.append(_full_scan(config, backend, now))
        started = time.perf_counter()
        snapshot, state = commands.tick(config, None, backend, now=now)
        backend.close()
        build.append(time.perf_counter() - started)
        at, these = now, []
        while at < wave:  # every interval, up to the first after the expiry wave
            at += INTERVAL
            started = time.perf_counter()
            again, kept = commands.tick(config, state, backend, now=at, new_since=snapshot.newest_registration)
            backend.close()
            these.append(time.perf_counter() - started)
            assert kept is state, "the tick scanned fully"
            assert again.clients == snapshot.clients
        ticks += these[:-1]
        waves.append(these[-1])
        if log:
            log(
                f"  full {full[-1]:.2f}s  full+state {build[-1]:.2f}s  ticks {min(these[:-1]):.3f} to "
                f"{max(these[:-1]):.3f}s (median {statistics.median(these[:-1]):.3f}s)  expiry wave {waves[-1]:.3f}s"
            )
    f, t = statistics.median(full), statistics.median(ticks)
    return {
        "clients": snapshot.clients,
        "full_s": f,
        "full_with_state_s": statistics.median(build),
        "tick_s": t,
        "ratio": t / f,
        "wave_tick_s": statistics.median(waves),
        "wave_ratio": statistics.median(waves) / f,
        "target": TARGET,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000", help="client counts on PostgreSQL")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for n in (int(s) for s in args.sizes.split(",") if s):
        dsn, now = ensure_pg(ADMIN_DSN, n, log)
        url = sqla_url(dsn)
        log(f"ticks, {n:,} clients (PostgreSQL):")
        r = measure(url, now + QUIET, args.repeats, log)
        kept, clients = state_bytes(url, now + QUIET) if n <= 100_000 else (0, 0)
        per = f", state {kept / clients:.0f} bytes/client" if clients else ""
        verdict = "ok" if r["ratio"] <= TARGET else "MISS"
        print(
            f"{n:>9,} clients: full scan {r['full_s']:.2f}s (with state {r['full_with_state_s']:.2f}s), "
            f"incremental tick {r['tick_s']:.3f}s = {r['ratio']:.3f} of a full scan "
            f"(target <= {TARGET}) {verdict}{per}; the tick after every live client's access token expired "
            f"at once {r['wave_tick_s']:.3f}s = {r['wave_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
