"""The benchmark harness: `python -m bench.run` (see docs/performance.md).

Everything is measured in one run, as ratios against a floor measured in the same run:
scan vs a bare psycopg cursor, peak RSS at 100k vs 1M, t(1M)/t(100k), reap throughput, and the p99 latency of
a concurrent token-issuing load when idle, during a scan and during a reap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.dataset import copy_pg, drop_pg, ensure_pg, make_sqlite

ADMIN_DSN = os.environ.get("REAPER_BENCH_ADMIN_DSN", "host=127.0.0.1 user=postgres dbname=test")
TARGETS = {
    "scan_vs_floor": 1.5,
    "rss_1m_mb": 150,
    "rss_1m_vs_100k": 1.3,
    "t1m_vs_t100k": 11,
    "reap_clients_per_s": 5000,
    "p99_vs_idle": 2.0,
}


def sqla_url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    return f"postgresql+psycopg://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}/{parts['dbname']}"


def one_scan(mode: str, url: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.scan_once", mode, url], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def scans(url: str, repeats: int, log) -> dict[str, Any]:
    """Alternate floor and reaper runs; report medians and the worst peak RSS."""
    floor, reaper = [], []
    for _ in range(repeats):
        floor.append(one_scan("floor", url))
        reaper.append(one_scan("reaper", url))
        log(
            f"  floor {floor[-1]['seconds']:.2f}s  reaper {reaper[-1]['seconds']:.2f}s "
            f"rss {reaper[-1]['rss_mb']:.0f} MB"
        )
    f = statistics.median(r["seconds"] for r in floor)
    r = statistics.median(r["seconds"] for r in reaper)
    return {
        "rows": reaper[0]["rows"],
        "floor_s": f,
        "reaper_s": r,
        "ratio": r / f,
        "rss_mb": max(x["rss_mb"] for x in reaper),
        "floor_rss_mb": max(x["rss_mb"] for x in floor),
    }


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def reap_run(url: str, clients: int | None, log) -> dict[str, Any]:
    from reaper.commands import apply, plan
    from reaper.config import load_config

    config = load_config(
        None,
        {
            "database_url": url,
            "profile": "authlib",
            "policy": {
                "max_per_run": 10_000_000,
                "max_fraction": 1.0,
                "batch_size": 500,
                "pause": 0,
                "late_token_sweep": 0,
                "min_age": "1h",
            },
        },
        environ={},
    )
    the_plan = plan(config)
    if clients is not None:
        the_plan.candidates = the_plan.candidates[:clients]
    t0 = time.perf_counter()
    result = apply(config, the_plan, force=True)
    seconds = time.perf_counter() - t0
    log(f"  reaped {result.total_acted:,} clients in {seconds:.2f}s")
    return {"clients": result.total_acted, "seconds": seconds, "clients_per_s": result.total_acted / seconds}


def latency_during(dsn: str, seconds: float, action) -> tuple[list[float], Any]:
    """Run the load for the duration of `action` (or `seconds` when action is None); return latencies."""
    holder: dict[str, Any] = {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.auth_load", dsn, "--seconds", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # connections up, load running
    start = time.time()
    if action is not None:
        holder["result"] = action()
    end = time.time() if action is not None else start + max(0.5, seconds - 1.5)
    if action is not None:
        proc.terminate()  # the load prints its samples and exits
    out, _ = proc.communicate(timeout=seconds + 60)
    samples = json.loads(out.strip().splitlines()[-1])
    return [lat for (t0, lat) in samples if start <= t0 <= end], holder.get("result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000", help="client counts on PostgreSQL")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reap-clients", type=int, default=20000)
    ap.add_argument("--sqlite", type=int, default=100000, help="client count on SQLite (0 = skip)")
    ap.add_argument("--no-load", action="store_true", help="skip the auth-load latency phases")
    ap.add_argument("--idle-seconds", type=float, default=8.0, help="length of the idle latency phase")
    ap.add_argument("--out", default="bench/results/latest.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "targets": TARGETS,
        "scan": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for n in sizes:
        dsn, _ = ensure_pg(ADMIN_DSN, n, log)
        log(f"scan, {n:,} clients (PostgreSQL):")
        results["scan"][str(n)] = scans(sqla_url(dsn), args.repeats, log)
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.sqlite"
            make_sqlite(path, args.sqlite)
            log(f"scan, {args.sqlite:,} clients (SQLite):")
            runs = [one_scan("reaper", f"sqlite:///{path}") for _ in range(args.repeats)]
            results["sqlite"] = {
                "clients": args.sqlite,
                "reaper_s": statistics.median(r["seconds"] for r in runs),
                "rss_mb": max(r["rss_mb"] for r in runs),
            }
    small = str(min(sizes))
    copy = f"dcr_bench_reap_{os.getpid()}"
    try:
        dsn = copy_pg(ADMIN_DSN, int(small), copy)
        url = sqla_url(dsn)
        log(f"reap, up to {args.reap_clients:,} clients (PostgreSQL):")
        if args.no_load:
            results["reap"] = reap_run(url, args.reap_clients, log)
        else:
            idle, _ = latency_during(dsn, args.idle_seconds, None)
            scan_lat, _ = latency_during(dsn, 120.0, lambda: one_scan("reaper", url))
            reap_lat, reap = latency_during(dsn, 300.0, lambda: reap_run(url, args.reap_clients, log))
            results["reap"] = reap
            results["load"] = {
                "idle_p99_ms": p99(idle) * 1000,
                "scan_p99_ms": p99(scan_lat) * 1000,
                "reap_p99_ms": p99(reap_lat) * 1000,
                "samples": {"idle": len(idle), "scan": len(scan_lat), "reap": len(reap_lat)},
            }
    finally:
        drop_pg(ADMIN_DSN, copy)
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"written {args.out}")


def report(r: dict[str, Any]) -> None:
    rows = []
    for n, s in r["scan"].items():
        rows.append(
            (
                f"scan {int(n):,} clients",
                f"{s['reaper_s']:.2f}s vs floor {s['floor_s']:.2f}s",
                f"{s['ratio']:.2f}x",
                f"<= {TARGETS['scan_vs_floor']}x",
            )
        )
        rows.append(
            (
                f"peak RSS {int(n):,}",
                f"{s['rss_mb']:.0f} MB (floor process {s['floor_rss_mb']:.0f} MB)",
                "",
                f"< {TARGETS['rss_1m_mb']} MB at 1M",
            )
        )
    sizes = sorted(r["scan"], key=int)
    if len(sizes) >= 2:
        a, b = r["scan"][sizes[0]], r["scan"][sizes[-1]]
        rows.append(
            (
                f"t({int(sizes[-1]):,})/t({int(sizes[0]):,})",
                "",
                f"{b['reaper_s'] / a['reaper_s']:.2f}",
                f"<= {TARGETS['t1m_vs_t100k']}",
            )
        )
        rows.append(
            (
                f"RSS({int(sizes[-1]):,})/RSS({int(sizes[0]):,})",
                "",
                f"{b['rss_mb'] / a['rss_mb']:.2f}",
                f"<= {TARGETS['rss_1m_vs_100k']}",
            )
        )
    if "sqlite" in r:
        s = r["sqlite"]
        rows.append((f"scan {s['clients']:,} clients (SQLite)", f"{s['reaper_s']:.2f}s", f"{s['rss_mb']:.0f} MB", ""))
    if "reap" in r:
        rows.append(
            (
                "reap throughput",
                f"{r['reap']['clients']:,} clients in {r['reap']['seconds']:.2f}s",
                f"{r['reap']['clients_per_s']:,.0f}/s",
                f">= {TARGETS['reap_clients_per_s']:,}/s",
            )
        )
    if "load" in r:
        ld = r["load"]
        rows.append(("auth p99 idle", f"{ld['idle_p99_ms']:.2f} ms", "", ""))
        for phase in ("scan", "reap"):
            rows.append(
                (
                    f"auth p99 during {phase}",
                    f"{ld[f'{phase}_p99_ms']:.2f} ms",
                    f"{ld[f'{phase}_p99_ms'] / ld['idle_p99_ms']:.2f}x idle",
                    f"<= {TARGETS['p99_vs_idle']}x",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
