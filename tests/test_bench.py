"""The benchmark harness at small N, so it never rots (it asserts that it ran, not how fast)."""

import json
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from kit.cli import REPO, clean_env
from kit.databases import SERVER_URLS, require


@pytest.mark.pg
@pytest.mark.slow
def test_bench_harness_runs_end_to_end(tmp_path):
    require("postgresql")
    url = make_url(SERVER_URLS["postgresql"])
    admin = f"host={url.host or '127.0.0.1'} user={url.username or 'postgres'} dbname={url.database}"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--sizes",
            "3000,6000",
            "--repeats",
            "1",
            "--sqlite",
            "2000",
            "--reap-clients",
            "1000",
            "--idle-seconds",
            "3",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(REAPER_BENCH_ADMIN_DSN=admin),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["scan"]) == set(result["load"]) == {"3000", "6000"}
    for figures in result["scan"].values():
        assert figures["rows"] > 0 and figures["table_vs_floor"] > 0 and figures["json_overhead"] > -1
        for mode in ("floor", "table", "json"):
            assert figures[mode]["seconds"] > 0 and figures[mode]["rss_mb"] > 0
            assert figures[mode]["blks_hit"] + figures[mode]["blks_read"] > 0  # the database's counters moved
        # The backend's CPU, read from /proc (same host): clock ticks of 10 ms, which a scan of 3,000 rows on a
        # quiet machine may not reach.
        assert figures["table"]["db_cpu_s"] is not None and figures["table"]["db_cpu_s"] >= 0
    for load in result["load"].values():
        assert load["samples"]["idle"] > 0 and load["limited_rate"] >= 1000 and load["limited_p99_ms"] > 0
        assert load["samples"]["floor"] > 0 and load["floor_p99_ms"] > 0
    assert set(result["few_families"]) == {"3000", "6000"}
    for figures in result["few_families"].values():
        assert figures["families"] == 50 and figures["table_vs_floor"] > 0 and figures["json"]["rss_mb"] > 0
    assert result["sqlite"]["clients"] == 2000
    reap = result["load"]["3000"]["reap"]
    assert reap["clients"] == 1000 and reap["clients_per_s"] > 0
    for line in (
        "report (table) vs floor, 6,000",
        "JSON output overhead",
        "peak RSS JSON 6,000 / 3,000",
        "peak RSS JSON, 6,000 in 50 families",
        "report (table) vs floor, 6,000 in 50 families",
        "during the floor's query alone",
    ):
        assert line in proc.stdout
    assert "auth p99 during a scan" in proc.stdout and "reap throughput" in proc.stdout
    for ticks in result["ticks"].values():  # bench.tick's phase, at each size
        assert ticks["full_s"] > 0 and 0 < ticks["tick_s"] and ticks["ratio"] > 0 and ticks["wave_tick_s"] > 0
        assert ticks["state_rss_mb"] > 0 and ticks["state_clients"] > 0
    assert set(result["ticks"]) == {"3000", "6000"} and "serve tick on an unchanged database, 6,000" in proc.stdout
    assert "serve's state build, peak RSS, 6,000" in proc.stdout
    assert "access tokens expired at once, 6,000" in proc.stdout


@pytest.mark.pg
@pytest.mark.slow
def test_reap_bench_runs_end_to_end(tmp_path):
    """bench.reap at small N: Authlib's mixins under renamed tables, reap without and with the index, restore,
    the floor; it asserts that every phase ran and reaped and restored the same clients, not how fast."""
    require("postgresql")
    url = make_url(SERVER_URLS["postgresql"])
    admin = f"host={url.host or '127.0.0.1'} user={url.username or 'postgres'} dbname={url.database}"
    out = tmp_path / "reap.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reap", "--clients", "3000", "--unindexed", "500", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(REAPER_BENCH_ADMIN_DSN=admin),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    indexed = result["indexed"]
    assert result["unindexed"]["clients"] == 500
    assert indexed["clients"] == indexed["restore"]["clients"] == result["floor"]["clients"] > 2500
    assert indexed["clients_per_s"] > 0 and indexed["restore"]["clients_per_s"] > 0
    assert "reap, indexes" in proc.stdout and "restore of that run" in proc.stdout


@pytest.mark.pg
@pytest.mark.slow
def test_tick_bench_runs_end_to_end():
    """bench.tick at small N: a full scan and incremental ticks on the cached dataset, and the state's size."""
    require("postgresql")
    url = make_url(SERVER_URLS["postgresql"])
    admin = f"host={url.host or '127.0.0.1'} user={url.username or 'postgres'} dbname={url.database}"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.tick", "--sizes", "3000", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(REAPER_BENCH_ADMIN_DSN=admin),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "incremental tick" in proc.stdout and "bytes/client" in proc.stdout
