"""What the CLI does to files: `report -o` replaces its file only once the report is complete (a failure leaves
the previous one, and no partial file beside it); `demo` never replaces a database it did not make unless asked.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import reaper.output
from kit.cli import assert_errors, run_cli
from reaper.cli import main
from reaper.demo import CHURN_NAME, build_demo


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


def _report(db: Path, out: Path) -> list[str]:
    return ["report", "--profile", "mcp-memory-service", "--database-url", f"sqlite:///{db}", "-o", str(out)]


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_report_file_appears_whole_and_keeps_the_mode_of_the_one_it_replaces(tmp_path):
    db = build_demo(tmp_path / "oauth.db")
    out = tmp_path / "out" / "report.txt"
    out.parent.mkdir()
    out.write_text("old\n")
    out.chmod(0o640)
    assert _run(_report(db, out)) == 0
    assert CHURN_NAME in out.read_text() and out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.txt"]


def test_report_that_fails_midway_leaves_the_previous_file_and_nothing_else(tmp_path, monkeypatch, capsys):
    db = build_demo(tmp_path / "oauth.db")
    out = tmp_path / "out" / "report.txt"
    out.parent.mkdir()
    out.write_text("the previous report\n")
    real = reaper.output.render

    def render_then_fail(fmt: str, stream: Any, snapshot: Any, fh: Any, *args: Any) -> None:
        fh.write("half a report\n")
        fh.flush()
        assert [p.name for p in out.parent.iterdir() if p.name != "report.txt"], "written beside it meanwhile"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reaper.output, "render", render_then_fail)
    assert _run(_report(db, out)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == "the previous report\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.txt"], "no partial file left"
    monkeypatch.setattr(reaper.output, "render", real)


def test_report_to_a_missing_directory_is_one_line_before_any_scan(tmp_path):
    db = build_demo(tmp_path / "oauth.db")
    res = run_cli(_report(db, tmp_path / "nope" / "report.txt"), tmp_path)
    (line,) = assert_errors(res, 2)
    assert line.startswith("--output ") and "No such file or directory" in line


# --- demo ------------------------------------------------------------------------------------------------------


def _real_database(path: Path, clients: int = 280) -> None:
    """Somebody's own SQLite database in WAL mode, open (its -wal and -shm exist)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE oauth_clients (client_id TEXT PRIMARY KEY)")
    con.executemany("INSERT INTO oauth_clients VALUES (?)", [(f"c{i}",) for i in range(clients)])
    con.commit()
    con.close()


@pytest.mark.slow
def test_demo_refuses_to_replace_a_database_it_did_not_make(tmp_path):
    db = tmp_path / "oauth.db"
    _real_database(db)
    Path(f"{db}-wal").write_bytes(b"not ours")
    Path(f"{db}-shm").write_bytes(b"not ours either")
    before = {p.name: _hash(p) for p in tmp_path.iterdir()}
    res = run_cli(["demo", "--db", str(db)], tmp_path)
    (line,) = assert_errors(res, 2)
    assert "exists and is not a demo database" in line and "--overwrite" in line
    assert {p.name: _hash(p) for p in tmp_path.iterdir()} == before, "the database and its -wal, -shm untouched"
    res = run_cli(["demo", "--db", str(db), "--overwrite"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert CHURN_NAME in res.stdout


def test_demo_replaces_an_earlier_demo_database_without_asking(tmp_path):
    db = build_demo(tmp_path / "demo.sqlite")
    again = build_demo(db)
    assert again == db
    with pytest.raises(FileExistsError):
        _real_database(tmp_path / "mine.db")
        build_demo(tmp_path / "mine.db")
    con = sqlite3.connect(tmp_path / "mine.db")
    try:
        assert con.execute("SELECT count(*) FROM oauth_clients").fetchone() == (280,)
    finally:
        con.close()
