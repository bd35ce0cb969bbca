"""Partitions (S10): a black-hole proxy between the reaper and PostgreSQL stops forwarding and keeps every socket
open, so neither end sees a close or a reset and the proxy's kernel answers TCP keepalives. Only the reaper's own
bounds can notice.

- `report` exits non-zero within its configured bound, with one line on stderr and no partial output file.
- SIGINT or SIGTERM in the middle of a black-holed fetch ends the process within 5 s; SIGINT during an acting
  reap lets the batch in flight finish and stops between batches.
- `serve` steps down while it cannot confirm its lock, leads again within two intervals of the partition
  healing, and two replicas never lead at once.

Each test prints what it measured (`-s`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit.cli import ServeProcess, assert_errors, poll, start_cli, try_get
from kit.config import write_config
from kit.databases import pg_advisory_locks
from kit.ledger import runs, tombstone_count
from kit.prometheus import value
from kit.proxy import FaultProxy, pg_port_of, via_proxy
from kit.schemas.authlib import AuthlibDB, fill_churning, fill_families

pytestmark = pytest.mark.slow  # real processes and timeouts: seconds each

BIG = {"families": 100, "orphans_per_family": 100}  # about 3 MB of scan results


@pytest.fixture
def proxy(pg_db) -> Iterator[FaultProxy]:
    with FaultProxy(pg_port_of(pg_db.url)) as p:
        yield p


def _config(path: Path, **sections: dict[str, object]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _report_args(url: str, cfg: Path, out: Path) -> list[str]:
    return [
        "report", "--profile", "authlib", "--database-url", url, "--config", str(cfg),
        "--format", "json", "--no-progress", "-o", str(out),
    ]  # fmt: skip


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _wait(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - t0


# --- report through a partition -------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["mid-fetch", "before connecting"])
@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_partitioned_report_exits_within_its_bound_with_one_line_and_no_partial_file(server, when, request, tmp_path):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    with FaultProxy(pg_port_of(db.url)) as proxy:
        _partitioned_report(db, proxy, tmp_path, f"{server}, {when}")


def _partitioned_report(db, proxy: FaultProxy, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    pg_db = db
    when = case.split(", ")[1]
    fill_churning(pg_db.engine, **BIG)
    cfg = _config(
        tmp_path / "reaper.toml",
        database={"connect_timeout": "2s", "read_timeout": "2s"},
        scan={"statement_timeout": "2s", "batch_size": 1000},
    )
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "report.json").write_text("the previous report\n")
    before = _files(outdir)
    if when == "mid-fetch":
        proxy.arm_blackhole_after(1_000_000)
    else:
        proxy.blackhole()
    proc = start_cli(_report_args(via_proxy(pg_db.url, proxy), cfg, outdir / "report.json"), tmp_path)
    try:
        poll(lambda: proxy.holding, 60, "the black hole", proc=proc)
        assert proxy.held_at is not None
        rc, out, err, _ = _wait(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - proxy.held_at
    # Bound: a scan round trip waits scan.statement_timeout + database.read_timeout (4 s); connecting waits
    # connect_timeout (2 s), and the first statement read_timeout (2 s).
    print(f"report ({case}) exited {took:.2f}s into the partition: {err.strip()}")
    res = subprocess.CompletedProcess(proc.args, rc, out, err)
    (line,) = assert_errors(res, 1)
    assert "no answer from the server within" in line or "timed out" in line or "timeout" in line, line
    assert took < 4.0 + 2.0
    if when == "before connecting":  # connecting waits connect_timeout, whatever the driver reads it with
        assert took < 2.0 + 2.5, f"{took:.2f}s: connecting must not wait a round trip's bound"
    assert _files(outdir) == before, "the previous report untouched, no partial file beside it"


# --- signals in the middle of a black-holed fetch ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "signum"),
    [("postgresql", signal.SIGINT), ("postgresql", signal.SIGTERM), ("mariadb", signal.SIGINT)],
)
def test_signal_mid_fetch_ends_report_within_5_seconds(server, signum, request, tmp_path):
    db = request.getfixturevalue("pg_db" if server == "postgresql" else "mariadb_db")
    with FaultProxy(pg_port_of(db.url)) as proxy:
        _signal_mid_fetch(db, proxy, tmp_path, signum)


def _signal_mid_fetch(pg_db, proxy: FaultProxy, tmp_path: Path, signum: int) -> None:  # type: ignore[no-untyped-def]
    fill_churning(pg_db.engine, **BIG)
    # Bounds far longer than the test: only the signal can end it.
    cfg = _config(
        tmp_path / "reaper.toml", database={"read_timeout": "5m"}, scan={"statement_timeout": "5m", "batch_size": 1000}
    )
    out = tmp_path / "report.json"
    proxy.arm_blackhole_after(1_000_000)
    proc = start_cli(_report_args(via_proxy(pg_db.url, proxy), cfg, out), tmp_path)
    try:
        poll(lambda: proxy.holding, 60, "the black hole", proc=proc)
        time.sleep(0.5)  # the scan is now waiting on the silent network
        assert proc.poll() is None
        partial = [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.json.")]
        assert partial, "the report was being written to a temporary file"
        sent = time.monotonic()
        proc.send_signal(signum)
        rc, stdout, err, _ = _wait(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - sent
    name = signal.Signals(signum).name
    print(f"{name} mid-fetch ({pg_db.kind}): exited {took:.2f}s later, rc {rc}: {err.strip()}")
    assert took < 5.0
    res = subprocess.CompletedProcess(proc.args, rc, stdout, err)
    assert assert_errors(res, 128 + signum) == [f"interrupted by {name}"]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".report.json.")]


def test_sigint_during_an_acting_reap_stops_between_batches(pg_db, tmp_path):
    adb = AuthlibDB(pg_db.engine)
    fams = fill_families(adb, families=5, orphans_each=10, seed=47)
    planned = {c for f in fams for c in f.orphans}
    batch = 4
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": batch, "pause": 0.3})
    args = ["reap", "--apply", "--no-progress", "--profile", "authlib", "--database-url", pg_db.url]
    proc = start_cli([*args, "--config", str(cfg)], tmp_path)
    try:
        poll(lambda: tombstone_count(pg_db.engine) > 0, 60, "the reap to be acting", proc=proc, interval=0.01)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc, out, err, _ = _wait(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - sent
    print(f"SIGINT during reap --apply: exited {took:.2f}s later")
    assert took < 5.0
    lines = err.strip().splitlines()
    assert rc == 130 and lines[-1] == "dcr-reaper: error: interrupted by SIGINT", err
    assert "stopping after this batch" in err and "dcr-reaper restore --run" in err and "Traceback" not in err
    (run,) = runs(pg_db.engine)
    assert run.status == "stopped" and 0 < run.acted < len(planned)
    assert tombstone_count(pg_db.engine) == run.acted and run.acted % batch == 0, "whole batches only"
    assert "stopped" in out.lower()
    assert pg_advisory_locks(pg_db.engine) == 0


# --- serve through a partition ---------------------------------------------------------------------------------

INTERVAL = 1.0
SERVE = {
    "database": {"connect_timeout": "1s", "read_timeout": "1s", "stranded_after": "3s"},
    "scan": {"statement_timeout": "1s"},
    "service": {"database_timeout": "1s"},
}


def _serve_args(url: str, cfg: Path) -> list[str]:
    return ["--database-url", url, "--profile", "authlib", "--interval", f"{INTERVAL:g}s", "--config", str(cfg)]


def _leader(proc: ServeProcess) -> float | None:
    got = try_get(proc.port, "/metrics")
    return value(got[1], "dcr_leader") if got and got[0] == 200 else None


class Sampler:
    """dcr_leader of every replica, every 50 ms, in the background: [(time, (leader of each))]."""

    def __init__(self, procs: list[ServeProcess]):
        self.procs = procs
        self.samples: list[tuple[float, tuple[float | None, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), tuple(_leader(p) for p in self.procs)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def first(self, since: float, pred) -> float | None:  # type: ignore[no-untyped-def]
        return next((t - since for t, leaders in self.samples if t >= since and pred(leaders)), None)


def test_serve_leads_again_within_two_intervals_after_a_partition_heals(pg_db, proxy, tmp_path):
    fill_churning(pg_db.engine, families=3, orphans_per_family=5)
    cfg = _config(tmp_path / "reaper.toml", **SERVE)
    with ServeProcess(_serve_args(via_proxy(pg_db.url, proxy), cfg), tmp_path) as proc:
        proc.wait_started()
        proc.wait_metric("dcr_last_success_timestamp_seconds", lambda v: v > 0, timeout=20)
        sampler = Sampler([proc])
        try:
            proxy.blackhole()
            cut = time.monotonic()
            proc.poll(lambda: _leader(proc) == 0, 10, "the leader to step down")
            stepped_down = time.monotonic() - cut
            status, why = proc.get("/readyz")
            assert status == 503, why
            time.sleep(max(0.0, 4.0 - (time.monotonic() - cut)))  # a 4-second partition
            proxy.heal()
            healed = time.monotonic()
            proc.poll(lambda: _leader(proc) == 1, 2 * INTERVAL + 1, "leadership again after the heal")
            releader = time.monotonic() - healed
            scanned = time.time()
            proc.wait_metric("dcr_last_success_timestamp_seconds", lambda v: v > scanned, timeout=10)
            proc.poll(lambda: proc.get("/readyz")[0] == 200, 5, "ready again")
        finally:
            sampler.close()
        print(f"partition: stepped down {stepped_down:.2f}s in; led again {releader:.2f}s after the heal")
        assert stepped_down < 3.0, "within two check-ins (a third of stranded_after each)"
        assert releader <= 2 * INTERVAL, f"led again {releader:.2f}s after the heal"
        assert pg_advisory_locks(pg_db.engine) == 1
        rc, _ = proc.terminate(timeout=10)
        assert rc == 0, proc.output()
    events = [e["event"] for e in proc.events() if e["event"].startswith("leadership")]
    assert events[0] == "leadership_acquired" and events.count("leadership_lost") >= 1
    assert events[-1] == "leadership_acquired"
    print("readiness during the partition:", why.strip())


def test_two_replicas_never_both_lead_across_a_partition_of_the_leader(pg_db, tmp_path):
    fill_churning(pg_db.engine, families=3, orphans_per_family=5)
    cfg = _config(tmp_path / "reaper.toml", **SERVE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        FaultProxy(pg_port_of(pg_db.url)) as pa,
        FaultProxy(pg_port_of(pg_db.url)) as pb,
        ServeProcess(_serve_args(via_proxy(pg_db.url, pa), cfg), tmp_path / "a", "a") as a,
        ServeProcess(_serve_args(via_proxy(pg_db.url, pb), cfg), tmp_path / "b", "b") as b,
    ):
        a.wait_started()
        b.wait_started()
        poll(lambda: sorted((_leader(a) or 0, _leader(b) or 0)) == [0, 1], 20, "one leader")
        leader, standby, hole = (a, b, pa) if _leader(a) == 1 else (b, a, pb)
        sampler = Sampler([a, b])
        try:
            time.sleep(1.0)
            hole.blackhole()
            cut = time.monotonic()
            poll(lambda: _leader(standby) == 1, 15, "the standby to take over")
            time.sleep(8.0 - (time.monotonic() - cut))  # an 8-second partition of the leader
            hole.heal()
            healed = time.monotonic()
            time.sleep(3 * INTERVAL)
        finally:
            sampler.close()
        both = [(t - cut, s) for t, s in sampler.samples if s == (1, 1)]
        assert not both, f"both led at once: {both[:5]}"
        down = sampler.first(cut, lambda s: s[(a, b).index(leader)] == 0)
        up = sampler.first(cut, lambda s: s[(a, b).index(standby)] == 1)
        assert down is not None and up is not None and down < up
        after = [s for t, s in sampler.samples if t >= healed + 2 * INTERVAL]
        assert after and all(sorted(x or 0 for x in s) == [0, 1] for s in after), "one leader after the heal"
        print(
            f"leader partitioned: stepped down {down:.2f}s in, the standby led {up:.2f}s in; "
            f"{len(sampler.samples)} samples, never both"
        )
        assert pg_advisory_locks(pg_db.engine) == 1
        for proc in (a, b):
            rc, _ = proc.terminate(timeout=10)
            assert rc == 0, proc.output()


def test_sigterm_ends_serve_stuck_in_a_black_holed_scan_at_once(pg_db, proxy, tmp_path):
    fill_churning(pg_db.engine, **BIG)
    cfg = _config(
        tmp_path / "reaper.toml",
        database={"read_timeout": "5m"},
        scan={"statement_timeout": "5m", "batch_size": 1000},
        service={"grace": "30s"},
    )
    with ServeProcess(_serve_args(via_proxy(pg_db.url, proxy), cfg), tmp_path) as proc:
        proc.wait_started()
        proxy.arm_blackhole_after(1_000_000)
        proc.poll(lambda: proxy.holding, 30, "the black hole mid-scan")
        time.sleep(0.5)
        rc, took = proc.terminate(timeout=10)
        print(f"SIGTERM with a scan waiting on a black hole: exited in {took:.2f}s (grace 30 s)")
        assert rc == 0 and took < 5.0, proc.output()
    assert proc.events("stopped") == [{"event": "stopped", "clean": True}]


def test_the_proxy_really_black_holes(pg_db, proxy):
    """Control: through the black hole a plain connection neither answers nor fails (for 3 s at least)."""
    import psycopg

    proxy.blackhole()
    done = threading.Event()

    def connect() -> None:
        try:
            psycopg.connect(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=test", connect_timeout=30)
        except Exception:  # noqa: BLE001
            pass
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    assert not done.wait(3.0)
    assert proxy.open_connections == 1
    os.environ.get("CI")  # nothing else to check: the connection thread ends with its own timeout
