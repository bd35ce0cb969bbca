"""The benchmark harness: `python -m bench.run` (see docs/performance.md).

Everything is measured in one run, as ratios against a floor measured in the same run, at each size: `report`
(table) against a bare psycopg cursor over the same query, `report --format json` against the table, peak RSS and
its growth from the smallest size to the largest, what a scan costs PostgreSQL (backend CPU, temp files,
buffers), the p99 latency of a concurrent token-issuing load when idle and during a scan (also a rate-limited
one), reap throughput, and `serve`'s incremental ticks and the peak memory of building their state.
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

import psycopg

from bench.dataset import copy_pg, drop_pg, ensure_pg, make_sqlite

ADMIN_DSN = os.environ.get("REAPER_BENCH_ADMIN_DSN", "host=127.0.0.1 user=postgres dbname=test")
TARGETS = {
    "table_vs_floor": 1.5,  # report (table) / the floor
    "json_overhead": 0.20,  # report --format json / report (table) - 1
    "rss_json_1m_mb": 100,  # peak RSS of the JSON report at the largest size
    "rss_largest_vs_smallest": 1.2,
    "p99_vs_idle": 1.5,  # auth token p99 during a scan / idle
    "reap_clients_per_s": 5000,
}
MODES = ("floor", "table", "json")
STATS = ("temp_files", "temp_bytes", "blks_read", "blks_hit")


def sqla_url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    return f"postgresql+psycopg://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}/{parts['dbname']}"


def one_scan(mode: str, url: str, rate: int | None = None) -> dict[str, Any]:
    extra = ["--max-rows-per-second", str(rate)] if rate else []
    out = subprocess.run(
        [sys.executable, "-m", "bench.scan_once", mode, url, *extra], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def db_stats(dsn: str) -> dict[str, int]:
    """The database's own counters (pg_stat_database): temp files and bytes, blocks read and found in cache."""
    dbname = dict(p.split("=", 1) for p in dsn.split())["dbname"]
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {', '.join(STATS)} FROM pg_stat_database WHERE datname = %s",  # noqa: S608 - fixed names
            (dbname,),
        ).fetchone()
    assert row is not None
    return dict(zip(STATS, (int(v) for v in row), strict=True))


def measured(mode: str, dsn: str) -> dict[str, Any]:
    """One scan, with the database's counters around it (a backend reports them as it exits)."""
    before = db_stats(dsn)
    result = one_scan(mode, sqla_url(dsn))
    time.sleep(0.5)
    after = db_stats(dsn)
    result.update({k: after[k] - before[k] for k in STATS})
    return result


def scans(dsn: str, repeats: int, log) -> dict[str, Any]:
    """Alternate floor, table and JSON runs; medians of times and costs, the worst peak RSS."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(measured(mode, dsn))
        log(
            "  "
            + "  ".join(f"{m} {runs[m][-1]['seconds']:.2f}s/{runs[m][-1]['rss_mb']:.0f}MB" for m in MODES)
            + f"  (load average {os.getloadavg()[0]:.1f})"
        )
    out: dict[str, Any] = {"rows": runs["table"][0]["rows"]}
    for mode in MODES:
        out[mode] = {
            "seconds": statistics.median(r["seconds"] for r in runs[mode]),
            "rss_mb": max(r["rss_mb"] for r in runs[mode]),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs[mode]),
            "db_cpu_s": statistics.median(r["db_cpu_s"] or 0.0 for r in runs[mode]),
            **{k: statistics.median(r[k] for r in runs[mode]) for k in STATS},
        }
    out["table_vs_floor"] = out["table"]["seconds"] / out["floor"]["seconds"]
    out["json_overhead"] = out["json"]["seconds"] / out["table"]["seconds"] - 1
    return out


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


def latency_phases(n: int, scanned: dict[str, Any], args, log) -> dict[str, Any]:
    """On a throw-away copy of the N-client dataset (the load writes tokens): the auth load's p99 idle, during a
    `report`, during one limited to half the rows a second the unlimited scan read, and during the floor's query
    alone (what the database's side of any scan costs the load)."""
    copy = f"dcr_bench_load_{n}_{os.getpid()}"
    try:
        dsn = copy_pg(ADMIN_DSN, n, copy)
        url = sqla_url(dsn)
        rate = max(1000, int(scanned["rows"] / scanned["table"]["seconds"] / 2))
        idle, _ = latency_during(dsn, args.idle_seconds, None)
        during, scan = latency_during(dsn, 900.0, lambda: one_scan("table", url))
        limited, slow = latency_during(dsn, 900.0, lambda: one_scan("table", url, rate))
        floor_lat, floor = latency_during(dsn, 900.0, lambda: one_scan("floor", url))
        reap = None
        if args.reap_clients and n == min(int(s) for s in args.sizes.split(",")):
            log(f"reap, up to {args.reap_clients:,} clients (PostgreSQL, {n:,}):")
            reap_lat, reap = latency_during(dsn, 900.0, lambda: reap_run(url, args.reap_clients, log))
        out = {
            "idle_p99_ms": p99(idle) * 1000,
            "scan_p99_ms": p99(during) * 1000,
            "scan_s": scan["seconds"],
            "limited_rate": rate,
            "limited_p99_ms": p99(limited) * 1000,
            "limited_s": slow["seconds"],
            "floor_p99_ms": p99(floor_lat) * 1000,
            "floor_s": floor["seconds"],
            "samples": {
                "idle": len(idle),
                "scan": len(during),
                "limited": len(limited),
                "floor": len(floor_lat),
            },
        }
        if reap is not None:
            out.update(reap=reap, reap_p99_ms=p99(reap_lat) * 1000)
            out["samples"]["reap"] = len(reap_lat)
        log(
            f"  auth p99 idle {out['idle_p99_ms']:.2f} ms, during a scan {out['scan_p99_ms']:.2f} ms, "
            f"during a scan at {rate:,} rows/s {out['limited_p99_ms']:.2f} ms ({slow['seconds']:.1f}s), "
            f"during the floor's query alone {out['floor_p99_ms']:.2f} ms"
        )
        return out
    finally:
        drop_pg(ADMIN_DSN, copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000", help="client counts on PostgreSQL")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reap-clients", type=int, default=20000, help="clients reaped at the smallest size (0 = skip)")
    ap.add_argument("--sqlite", type=int, default=100000, help="client count on SQLite (0 = skip)")
    ap.add_argument("--no-load", action="store_true", help="skip the auth-load latency phases (and the reap)")
    ap.add_argument("--idle-seconds", type=float, default=8.0, help="length of the idle latency phase")
    ap.add_argument("--no-ticks", action="store_true", help="skip the incremental tick phase (bench.tick)")
    ap.add_argument(
        "--issue-families",
        type=int,
        default=50,
        help="also compare floor, table and JSON with the clients in this many families (the issue's 1M "
        "dataset: 50 families of 20,000; 0 = skip)",
    )
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
        "load": {},
        "ticks": {},
        "few_families": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for n in sizes:
        dsn, generated_at = ensure_pg(ADMIN_DSN, n, log)
        log(f"scan, {n:,} clients (PostgreSQL):")
        results["scan"][str(n)] = scans(dsn, args.repeats, log)
        if not args.no_ticks:
            from bench import tick  # it imports this module's settings: only once they exist

            log(f"serve ticks, {n:,} clients (PostgreSQL):")
            results["ticks"][str(n)] = tick.measure(sqla_url(dsn), generated_at + tick.QUIET, args.repeats, log)
            built = one_scan("state", sqla_url(dsn))  # in a fresh process: its own peak memory
            results["ticks"][str(n)].update(state_rss_mb=built["rss_mb"], state_clients=built["rows"])
        if not args.no_load:
            results["load"][str(n)] = latency_phases(n, results["scan"][str(n)], args, log)
        if args.issue_families:
            few, _ = ensure_pg(ADMIN_DSN, n, log, family_count=args.issue_families)
            log(f"scan, {n:,} clients in {args.issue_families} families (PostgreSQL):")
            results["few_families"][str(n)] = {"families": args.issue_families, **scans(few, args.repeats, log)}
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.sqlite"
            make_sqlite(path, args.sqlite)
            log(f"scan, {args.sqlite:,} clients (SQLite):")
            runs = [one_scan("table", f"sqlite:///{path}") for _ in range(args.repeats)]
            results["sqlite"] = {
                "clients": args.sqlite,
                "table_s": statistics.median(r["seconds"] for r in runs),
                "rss_mb": max(r["rss_mb"] for r in runs),
            }
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"written {args.out}")


def _met(value: float, target: float, below: bool = True) -> str:
    return "met" if (value <= target if below else value >= target) else "MISSED"


def report(r: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, str]] = [("measure", "figures", "result", "target", "")]
    for n, s in r["scan"].items():
        size = f"{int(n):,}"
        fl, tb, js = s["floor"], s["table"], s["json"]
        rows.append(
            (
                f"report (table) vs floor, {size}",
                f"{tb['seconds']:.2f}s vs {fl['seconds']:.2f}s",
                f"{s['table_vs_floor']:.2f}x",
                f"<= {TARGETS['table_vs_floor']}x",
                _met(s["table_vs_floor"], TARGETS["table_vs_floor"]),
            )
        )
        rows.append(
            (
                f"JSON output overhead, {size}",
                f"{js['seconds']:.2f}s vs table {tb['seconds']:.2f}s",
                f"{s['json_overhead'] * 100:+.0f}%",
                f"<= +{TARGETS['json_overhead'] * 100:.0f}%",
                _met(s["json_overhead"], TARGETS["json_overhead"]),
            )
        )
        rows.append(
            (
                f"peak RSS JSON, {size}",
                f"table {tb['rss_mb']:.0f} MB, floor process {fl['rss_mb']:.0f} MB",
                f"{js['rss_mb']:.0f} MB",
                f"< {TARGETS['rss_json_1m_mb']} MB",
                _met(js["rss_mb"], TARGETS["rss_json_1m_mb"]),
            )
        )
        per_m = 1e6 / s["rows"]
        rows.append(
            (
                f"PostgreSQL per 1M clients, {size}",
                f"backend CPU {tb['db_cpu_s'] * per_m:.1f}s (floor {fl['db_cpu_s'] * per_m:.1f}s), "
                f"temp {tb['temp_files']:.0f} files/{tb['temp_bytes'] * per_m / 2**20:.0f} MB, "
                f"blocks read {tb['blks_read'] * per_m:,.0f} hit {tb['blks_hit'] * per_m:,.0f}",
                f"reaper CPU {tb['cpu_s'] * per_m:.1f}s",
                "",
                "",
            )
        )
        ld = r["load"].get(n)
        if ld:
            ratio = ld["scan_p99_ms"] / ld["idle_p99_ms"]
            rows.append(
                (
                    f"auth p99 during a scan, {size}",
                    f"{ld['scan_p99_ms']:.2f} ms vs idle {ld['idle_p99_ms']:.2f} ms",
                    f"{ratio:.2f}x",
                    f"<= {TARGETS['p99_vs_idle']}x",
                    _met(ratio, TARGETS["p99_vs_idle"]),
                )
            )
            rows.append(
                (
                    f"  ... scan at {ld['limited_rate']:,} rows/s",
                    f"{ld['limited_p99_ms']:.2f} ms, scan {ld['limited_s']:.1f}s (unlimited {ld['scan_s']:.1f}s)",
                    f"{ld['limited_p99_ms'] / ld['idle_p99_ms']:.2f}x",
                    "",
                    "",
                )
            )
            if "floor_p99_ms" in ld:
                rows.append(
                    (
                        "  ... during the floor's query alone",
                        f"{ld['floor_p99_ms']:.2f} ms, query {ld['floor_s']:.1f}s",
                        f"{ld['floor_p99_ms'] / ld['idle_p99_ms']:.2f}x",
                        "",
                        "",
                    )
                )
            if "reap" in ld:
                rows.append(
                    (
                        f"reap throughput, {size}",
                        f"{ld['reap']['clients']:,} clients in {ld['reap']['seconds']:.2f}s, "
                        f"auth p99 {ld['reap_p99_ms']:.2f} ms",
                        f"{ld['reap']['clients_per_s']:,.0f}/s",
                        f">= {TARGETS['reap_clients_per_s']:,}/s",
                        _met(ld["reap"]["clients_per_s"], TARGETS["reap_clients_per_s"], below=False),
                    )
                )
    for n, t in r.get("ticks", {}).items():
        rows.append(
            (
                f"serve tick on an unchanged database, {int(n):,}",
                f"incremental {t['tick_s']:.3f}s vs full scan {t['full_s']:.2f}s",
                f"{t['ratio']:.3f}",
                f"<= {t['target']}",
                _met(t["ratio"], t["target"]),
            )
        )
        rows.append(
            (
                f"... the tick after {int(n) // 30:,} access tokens expired at once, {int(n):,}",
                f"incremental {t['wave_tick_s']:.3f}s vs full scan {t['full_s']:.2f}s",
                f"{t['wave_ratio']:.3f}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"serve's state build, peak RSS, {int(n):,}",
                f"{t['state_rss_mb']:.0f} MB for {t['state_clients']:,} clients",
                "",
                "",
                "",
            )
        )
    sizes = sorted(r["scan"], key=int)
    if len(sizes) >= 2:
        a, b = r["scan"][sizes[0]]["json"]["rss_mb"], r["scan"][sizes[-1]]["json"]["rss_mb"]
        rows.append(
            (
                f"peak RSS JSON {int(sizes[-1]):,} / {int(sizes[0]):,}",
                f"{b:.0f} / {a:.0f} MB",
                f"{b / a:.2f}",
                f"<= {TARGETS['rss_largest_vs_smallest']}",
                _met(b / a, TARGETS["rss_largest_vs_smallest"]),
            )
        )
    few = r.get("few_families", {})
    for n, f in few.items():
        where = f"{int(n):,} in {f['families']} families"
        fl, tb, js = f["floor"], f["table"], f["json"]
        rows += [
            (
                f"report (table) vs floor, {where}",
                f"{tb['seconds']:.2f}s vs {fl['seconds']:.2f}s",
                f"{f['table_vs_floor']:.2f}x",
                f"<= {TARGETS['table_vs_floor']}x",
                _met(f["table_vs_floor"], TARGETS["table_vs_floor"]),
            ),
            (
                f"JSON output overhead, {where}",
                f"{js['seconds']:.2f}s vs table {tb['seconds']:.2f}s",
                f"{f['json_overhead'] * 100:+.0f}%",
                f"<= +{TARGETS['json_overhead'] * 100:.0f}%",
                _met(f["json_overhead"], TARGETS["json_overhead"]),
            ),
            (
                f"peak RSS JSON, {where}",
                f"table {tb['rss_mb']:.0f} MB, floor process {fl['rss_mb']:.0f} MB",
                f"{js['rss_mb']:.0f} MB",
                f"< {TARGETS['rss_json_1m_mb']} MB",
                _met(js["rss_mb"], TARGETS["rss_json_1m_mb"]),
            ),
        ]
    few_sizes = sorted(few, key=int)
    if len(few_sizes) >= 2:
        a, b = few[few_sizes[0]]["json"]["rss_mb"], few[few_sizes[-1]]["json"]["rss_mb"]
        rows.append(
            (
                f"  ... {int(few_sizes[-1]):,} / {int(few_sizes[0]):,}, {few[few_sizes[0]]['families']} families",
                f"{b:.0f} / {a:.0f} MB",
                f"{b / a:.2f}",
                f"<= {TARGETS['rss_largest_vs_smallest']}",
                _met(b / a, TARGETS["rss_largest_vs_smallest"]),
            )
        )
    if "sqlite" in r:
        s = r["sqlite"]
        rows.append(
            (
                f"report (table), {s['clients']:,} clients, SQLite",
                f"{s['rss_mb']:.0f} MB",
                f"{s['table_s']:.2f}s",
                "",
                "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
