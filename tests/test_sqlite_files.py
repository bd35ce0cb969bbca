"""SQLite: reading needs read access only. A report creates no file beside the database (no -wal, no -shm, no
lock file), works in a directory the reaper cannot write, and a read made without SQLite's locks (a WAL
database nobody has open) refuses a file that changed under it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from kit.cli import clean_env, cli_command, tool
from reaper.backends import open_backend
from reaper.commands import classified, report, tick
from reaper.config import load_config
from reaper.demo import CHURN_REGISTRATIONS, build_demo
from reaper.errors import DatabaseError


def _config(path: Path) -> object:
    return load_config(None, {"database_url": f"sqlite:///{path}", "profile": "mcp-memory-service"}, environ={})


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def without_write_access(cmd: list[str]) -> list[str]:
    """`cmd` run so that file permissions bind it: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return cmd
    setpriv = tool("setpriv", "util-linux")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", *cmd]


def test_report_on_a_wal_database_nobody_has_open_creates_no_file(tmp_path):
    db = build_demo(tmp_path / "oauth.db")  # WAL mode; closed, so its -wal and -shm are gone
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    before = _listing(tmp_path)
    snapshot = report(_config(db))  # type: ignore[arg-type]
    assert snapshot.clients == CHURN_REGISTRATIONS + 3
    assert _listing(tmp_path) == before, "no -wal, -shm or lock file beside the database, the file untouched"


def test_report_while_the_server_has_the_database_open_reads_through_its_wal(tmp_path):
    """The usual case: the auth server has the file open (its -wal and -shm exist); the reaper reads with
    SQLite's locks and sees rows only in the WAL."""
    db = build_demo(tmp_path / "oauth.db")
    server = sqlite3.connect(db)
    try:
        server.execute("PRAGMA journal_mode=WAL")
        server.execute("PRAGMA wal_autocheckpoint=0")  # the new row stays in the -wal file
        server.execute("INSERT INTO oauth_clients (client_id, client_name, created_at) VALUES ('new', 'x', 1)")
        server.commit()
        assert Path(f"{db}-wal").stat().st_size > 0
        snapshot = report(_config(db))  # type: ignore[arg-type]
    finally:
        server.close()
    assert snapshot.clients == CHURN_REGISTRATIONS + 4


def test_unlocked_read_refuses_a_file_that_changed_under_it(tmp_path):
    db = build_demo(tmp_path / "oauth.db")
    with pytest.raises(DatabaseError, match="changed while it was read without SQLite's locks"):
        with classified(_config(db)) as (stream, _):  # type: ignore[arg-type]
            next(stream)
            server = sqlite3.connect(db)  # the auth server starts and writes meanwhile
            try:
                server.execute("DELETE FROM oauth_refresh_tokens")
                server.commit()
            finally:
                server.close()
            list(stream)


@pytest.mark.slow
def test_report_in_a_directory_the_reaper_cannot_write(tmp_path):
    import subprocess

    data = tmp_path / "data"
    data.mkdir()
    db = build_demo(data / "oauth.db")
    before = _listing(data)
    data.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    db.chmod(0o444)
    try:
        args = ["report", "--profile", "mcp-memory-service", "--database-url", f"sqlite:///{db}", "--format", "json"]
        res = subprocess.run(
            without_write_access(cli_command(args)), cwd=tmp_path, env=clean_env(), capture_output=True, text=True
        )
        probe = subprocess.run(without_write_access(["touch", str(data / "probe")]), capture_output=True)
    finally:
        data.chmod(0o755)
    assert probe.returncode != 0, "the directory must really be read-only for the command"
    assert res.returncode == 0, res.stderr
    assert f'"clients": {CHURN_REGISTRATIONS + 3}' in res.stdout
    assert _listing(data) == before


@pytest.mark.slow
def test_serve_in_a_directory_the_reaper_cannot_write_scans_without_a_run_lock(tmp_path, monkeypatch):
    """Reading only, and no lock file can be made beside the database: serve leads without a lock (and says
    so) rather than never scanning."""
    import kit.cli
    from kit.cli import ServeProcess
    from kit.prometheus import value

    data = tmp_path / "data"
    data.mkdir()
    db = build_demo(data / "oauth.db")
    before = _listing(data)
    real = kit.cli.cli_command
    monkeypatch.setattr(kit.cli, "cli_command", lambda args: without_write_access(real(args)))
    data.chmod(0o555)
    try:
        args = ["--database-url", f"sqlite:///{db}", "--profile", "mcp-memory-service", "--interval", "1s"]
        with ServeProcess(args, tmp_path) as proc:
            proc.wait_started()
            text = proc.wait_metric("dcr_last_success_timestamp_seconds", lambda v: v > 0, timeout=20)
            assert value(text, "dcr_leader") == 1
            assert value(text, "dcr_last_scan_clients") == CHURN_REGISTRATIONS + 3
            status, why = proc.get("/readyz")
            assert status == 200 and why.startswith("leader without a run lock (cannot create the run lock file")
            rc, _ = proc.terminate(timeout=10)
            assert rc == 0, proc.output()
        (unlocked,) = proc.events("leadership_unlocked")
        assert "database.sqlite_lock_dir" in str(unlocked["reason"])
    finally:
        data.chmod(0o755)
    assert _listing(data) == before, "nothing created beside the database"


def test_serve_ticks_follow_the_server_opening_and_closing_the_file(tmp_path):
    """One backend across ticks, as `serve` keeps it: when the auth server starts after the reaper, the next tick
    reads through its WAL (not the file as immutable); when it stops again, the next tick leaves no -wal or -shm
    of its own beside the database."""
    db = build_demo(tmp_path / "oauth.db")
    config = _config(db)
    backend = open_backend(config)  # type: ignore[arg-type]
    try:
        snapshot, state = tick(config, None, backend)  # type: ignore[arg-type]
        backend.close()
        assert snapshot.clients == CHURN_REGISTRATIONS + 3
        server = sqlite3.connect(db)
        try:
            server.execute("PRAGMA journal_mode=WAL")
            server.execute("PRAGMA wal_autocheckpoint=0")
            server.execute("INSERT INTO oauth_clients (client_id, client_name, created_at) VALUES ('new', 'x', 1)")
            server.commit()
            for _ in range(2):
                snapshot, state = tick(config, state, backend)  # type: ignore[arg-type]
                backend.close()
                assert snapshot.clients == CHURN_REGISTRATIONS + 4
        finally:
            server.close()
        assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
        before = _listing(tmp_path)
        snapshot, state = tick(config, state, backend)  # type: ignore[arg-type]
        backend.close()
        assert snapshot.clients == CHURN_REGISTRATIONS + 4
        assert _listing(tmp_path) == before, "no -wal or -shm of the reaper's own"
    finally:
        backend.close()
