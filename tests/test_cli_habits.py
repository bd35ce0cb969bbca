"""CLI habits that trip people: `-o FILE` names the format (and a contradiction is refused), global options work
on either side of the subcommand, and `restore --dry-run` says what would come back without writing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from kit.cli import assert_errors, run_cli
from kit.config import make_config, write_config
from kit.databases import snapshot
from kit.schemas.authlib import TABLES, AuthlibDB, fill_families
from reaper.commands import apply, plan, runs
from reaper.demo import build_demo

MCP = ["--profile", "mcp-memory-service"]
LEDGER = ("dcr_reaper_runs", "dcr_reaper_tombstones", "dcr_reaper_aliases")


def _everything(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the auth tables and of the ledger."""
    return snapshot(engine, (*TABLES, *LEDGER), {"dcr_reaper_aliases": "alias_client_id"})


@pytest.fixture
def demo_url(tmp_path: Path) -> str:
    return f"sqlite:///{build_demo(tmp_path / 'demo.sqlite')}"


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("out.json", lambda text: json.loads(text)["summary"]["clients"] > 0),
        ("out.csv", lambda text: next(csv.reader(io.StringIO(text)))[0] == "client_id"),
        ("out.md", lambda text: text.startswith("# dcr-reaper report")),
        ("evidence.html", lambda text: text.lstrip().lower().startswith("<!doctype html")),
        ("out.txt", lambda text: text.startswith("dcr-reaper report")),
    ],
)
def test_the_output_file_names_the_format(tmp_path, demo_url, name, check):
    res = run_cli(["report", *MCP, "--database-url", demo_url, "-o", name], tmp_path)
    assert res.returncode == 0, res.stderr
    assert check((tmp_path / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "table", "-o", "x.json"], "contradicts"),
        (["--format", "csv", "-o", "evidence.html"], "contradicts"),
        (["-o", "json"], "--format json"),
        (["-o", "report.pdf"], None),  # an unknown extension: the default table, as asked
    ],
)
def test_a_contradiction_is_refused_before_anything_is_read(tmp_path, demo_url, args, words):
    res = run_cli(["report", *MCP, "--database-url", demo_url, *args], tmp_path)
    if words is None:
        assert res.returncode == 0 and (tmp_path / "report.pdf").read_text().startswith("dcr-reaper report")
        return
    [line] = assert_errors(res, 2)
    assert words in line
    assert [p.name for p in tmp_path.iterdir()] == ["demo.sqlite"], "no file written"


@pytest.mark.slow
def test_debug_and_config_work_on_either_side_of_the_subcommand(tmp_path, demo_url):
    config = tmp_path / "c.toml"
    config.write_text(f'profile = "mcp-memory-service"\ndatabase_url = "{demo_url}"\n', encoding="utf-8")
    for args in (
        ["--config", str(config), "report", "--format", "json"],
        ["report", "--config", str(config), "--format", "json"],
        ["--debug", "report", "--config", str(config), "--format", "json"],
        ["report", "--format", "json", "--debug", "--config", str(config)],
    ):
        res = run_cli(args, tmp_path)
        assert res.returncode == 0, (args, res.stderr)
        assert json.loads(res.stdout)["summary"]["clients"] > 0

    other = tmp_path / "other.toml"
    other.write_text("", encoding="utf-8")
    [line] = assert_errors(run_cli(["--config", str(config), "check", "--config", str(other)], tmp_path), 2)
    assert "--config given twice" in line
    # --debug after the subcommand shows the traceback, as before it does.
    broken = run_cli(["report", "--debug", "--database-url", "sqlite:///nowhere.db", *MCP], tmp_path)
    assert broken.returncode == 1 and "Traceback" in broken.stderr


def test_restore_dry_run_says_what_comes_back_and_writes_nothing(sqlite_db, tmp_path):
    fams = fill_families(AuthlibDB(sqlite_db.engine), families=3, orphans_each=4, seed=11)
    config = make_config(sqlite_db.url)
    result = apply(config, plan(config))
    assert result.run_id and result.total_acted == 12
    cfg = write_config(tmp_path / "r.toml", {})
    args = ["--config", str(cfg), "--profile", "authlib", "--database-url", sqlite_db.url]
    before = _everything(sqlite_db.engine)

    res = run_cli(["restore", "--dry-run", "--run", result.run_id[:6], *args], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"would restore 12 client(s) of run {result.run_id}: oauth2_client 12")
    assert all(c in res.stdout for f in fams for c in f.orphans)
    assert _everything(sqlite_db.engine) == before, "a dry run writes nothing"

    # One of them registered again under its old client_id: the dry run names it, and exits as restore would.
    back = fams[0].orphans[0]
    again = AuthlibDB(sqlite_db.engine, create=False)
    again.client(back, "Claude Code", ["http://127.0.0.1:4242/cb"], 1_700_000_000)
    again.flush()
    [line] = assert_errors(run_cli(["restore", "--dry-run", "--run", result.run_id, *args], tmp_path), 1)
    assert "1 of them are in the store again" in line and back in line
    assert runs(config)[0].restored == 0
