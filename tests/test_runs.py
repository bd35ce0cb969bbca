"""Runs in the ledger: listed with their counts, reconciled after a crash, named by unique prefixes; tombstones
sealed with a key and purged by age; Ctrl-C during a reap; the evidence report of a past run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kit.cli import assert_errors, kill9, poll, run_cli, start_cli
from kit.config import make_config, write_config
from kit.databases import client_ids, snapshot
from kit.ledger import tombstone_count, tombstones
from kit.schemas.authlib import AuthlibDB, create_schema, fill_families, seed_churn
from reaper.commands import apply, past_report, plan, purge, reap, restore, run_show, runs
from reaper.errors import ConfigError, ReaperError
from reaper.ledger import new_key


def _args(url: str, *extra: str) -> list[str]:
    return ["--profile", "authlib", "--database-url", url, *extra]


def _families(db, families: int = 6, orphans: int = 10) -> set[str]:
    fams = fill_families(AuthlibDB(db.engine), families=families, orphans_each=orphans, seed=5)
    return {c for f in fams for c in f.orphans}


@pytest.mark.slow
def test_a_killed_run_is_listed_interrupted_with_its_true_count_and_restores_whole(db, tmp_path: Path):
    """kill -9 mid-run: `runs` shows the run as interrupted with the count its tombstones prove (not 0), and
    restoring it brings every client back, column for column."""
    planned = _families(db, families=8, orphans=10)
    before = snapshot(db.engine)
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 4, "pause": 0.2})
    proc = start_cli(["reap", "--apply", "--no-progress", "--config", str(cfg), *_args(db.url)], tmp_path)
    try:
        poll(lambda: tombstone_count(db.engine) >= 12, 60, "a few batches to commit", proc=proc, interval=0.02)
    finally:
        kill9(proc)
    gone = planned - client_ids(db.engine)
    assert 0 < len(gone) < len(planned), "killed mid-run"

    res = run_cli(["runs", "--format", "json", *_args(db.url)], tmp_path)
    assert res.returncode == 0, res.stderr
    (run,) = json.loads(res.stdout)
    assert (run["status"], run["acted"], run["restored"]) == ("interrupted", len(gone), 0)
    assert "interrupted" in run["message"] and run["finished_at"] is not None
    table = run_cli(["runs", *_args(db.url)], tmp_path)
    assert run["id"] in table.stdout and "interrupted" in table.stdout

    back = run_cli(["restore", "--run", run["id"][:6], *_args(db.url)], tmp_path)
    assert back.returncode == 0, back.stderr
    assert f"restored {len(gone)} client(s)" in back.stdout
    assert f"restoring: {len(gone)}/{len(gone)} clients (100%)" in back.stderr, "progress, also when not a terminal"
    assert snapshot(db.engine) == before, "every client back, column for column"
    again = run_cli(["restore", "--run", run["id"][:6], *_args(db.url)], tmp_path)
    assert again.returncode == 0 and "nothing to restore" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
def test_ctrl_c_stops_between_batches_and_says_how_to_restore(sqlite_db, tmp_path: Path):
    planned = _families(sqlite_db, families=6, orphans=10)
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 5, "pause": 0.3})
    proc = start_cli(["reap", "--apply", "--no-progress", "--config", str(cfg), *_args(sqlite_db.url)], tmp_path)
    poll(lambda: tombstone_count(sqlite_db.engine) >= 5, 60, "a first batch", proc=proc, interval=0.02)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after this batch" in err and "dcr-reaper restore --run" in err
    assert "Traceback" not in err
    gone = planned - client_ids(sqlite_db.engine)
    assert 0 < len(gone) < len(planned)
    (info,) = runs(make_config(sqlite_db.url))
    assert (info.status, info.acted) == ("stopped", len(gone))
    assert info.id in err or info.id[:8] in err


def test_runs_and_restore_take_unique_prefixes_and_pasted_cut_ids(sqlite_db):
    _families(sqlite_db, families=2, orphans=4)
    config = make_config(sqlite_db.url, policy={"batch_size": 3})
    first = apply(config, plan(config))
    assert first.run_id
    listed = runs(config)
    assert [(r.id, r.status, r.planned, r.acted, r.restored) for r in listed] == [(first.run_id, "ok", 8, 8, 0)]
    detail = run_show(config, first.run_id[:5])
    assert detail.info.id == first.run_id and len(detail.clients) == 8
    one = detail.clients[0].client_id
    # As a report cuts it ("dcr-00001-…(+7)"), and as a plain prefix: either names the one client.
    back = restore(config, client_id=f"{one[:12]}…(+{len(one) - 12})")
    assert back.restored == [detail.clients[0].client_key]
    with pytest.raises(ReaperError, match="matches more than one reaped client"):
        restore(config, client_id="dcr-")
    with pytest.raises(ReaperError, match="no run matches 'ffff'"):
        restore(config, run_id="ffff")
    rest = restore(config, run_id=first.run_id[:4])
    assert len(rest.restored) == 7 and rest.already == 1
    assert runs(config)[0].restored == 8


def test_restores_are_marked_apart_and_a_ledger_from_before_keeps_its_marks(db):
    """A restore inserts a mark into <prefix>restores and leaves its tombstones unwritten; a ledger made before
    that table (its marks in tombstones.restored_at) still counts, lists and skips what it restored, and gains the
    table on its next restore; purge takes the marks with their tombstones."""
    _families(db, families=2, orphans=4)
    config = make_config(db.url, policy={"batch_size": 3})
    first = apply(config, plan(config))
    assert first.run_id and first.total_acted == 8
    one = run_show(config, first.run_id).clients[0]
    restore(config, client_id=one.client_id)
    with db.engine.begin() as conn:  # as an older release left it: the mark in the tombstone, no restores table
        (tomb_id, when) = conn.execute(sa.text("SELECT tombstone_id, restored_at FROM dcr_reaper_restores")).one()
        conn.execute(
            sa.text("UPDATE dcr_reaper_tombstones SET restored_at = :w WHERE id = :i"), {"w": when, "i": tomb_id}
        )
        conn.execute(sa.text("DROP TABLE dcr_reaper_restores"))

    assert runs(config)[0].restored == 1
    shown = {c.client_id: c.restored_at for c in run_show(config, first.run_id).clients}
    assert shown[one.client_id] == pytest.approx(when) and sum(v is not None for v in shown.values()) == 1
    rest = restore(config, run_id=first.run_id)
    assert (len(rest.restored), rest.already) == (7, 1)
    assert runs(config)[0].restored == 8
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dcr_reaper_restores")).scalar() == 7
        written = conn.execute(sa.text("SELECT count(*) FROM dcr_reaper_tombstones WHERE restored_at IS NOT NULL"))
        assert written.scalar() == 1, "a restore marks apart; the tombstones are not rewritten"
    assert restore(config, run_id=first.run_id).restored == [], "restoring a restored run is a no-op"
    time.sleep(0.01)
    assert purge(config, 0)[0] == 8
    with db.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dcr_reaper_restores")).scalar() == 0
        # A mark an older release's purge left behind: its tombstone id comes round again (SQLite reuses ids).
        stale = [{"i": i, "w": when} for i in range(1, 40)]
        conn.execute(sa.text("INSERT INTO dcr_reaper_restores VALUES (:i, 'a-run-long-gone', :w)"), stale)
    second = apply(config, plan(config))
    assert second.run_id and second.total_acted == 8
    assert runs(config)[0].restored == 0, "a stale mark makes no tombstone look restored"
    assert len(restore(config, run_id=second.run_id).restored) == 8


def test_sealed_tombstones_hold_no_plaintext_secret_and_restore_needs_the_key(db, tmp_path: Path):
    planned = _families(db, families=2, orphans=5)
    before = snapshot(db.engine)
    secrets = {r[2] for r in before["oauth2_client"] if r[1] in planned}  # client_secret
    tokens = {r[4] for r in before["oauth2_token"] if r[2] in planned} | {
        r[5] for r in before["oauth2_token"] if r[2] in planned and r[5]
    }
    assert secrets and tokens
    key, other = new_key(), new_key()
    sealed = make_config(db.url, ledger={"key": key})
    result = apply(sealed, plan(sealed))
    assert result.total_acted == len(planned)
    with db.engine.connect() as conn:
        payloads = [r[0] for r in conn.execute(sa.text("SELECT payload FROM dcr_reaper_tombstones"))]
    assert len(payloads) == len(planned) and all(p.startswith("fernet:") for p in payloads)
    text = "\n".join(payloads)
    assert not any(s in text for s in secrets | tokens), "no client secret or token value in the ledger"
    for name in planned:
        assert name not in text, "payloads are sealed whole"

    with pytest.raises(ConfigError, match=r"sealed: restoring needs the key.*DCR_REAPER_LEDGER__KEY"):
        restore(make_config(db.url), run_id=result.run_id)
    with pytest.raises(ConfigError, match="does not open with the configured ledger key"):
        restore(make_config(db.url, ledger={"key": other}), run_id=result.run_id)
    assert client_ids(db.engine).isdisjoint(planned), "nothing restored without the key"
    key_file = tmp_path / "ledger.key"
    key_file.write_text(f"{other}\n{key}\n")  # rotation: a new key first, the old one still opens
    back = restore(make_config(db.url, ledger={"key_file": str(key_file)}), run_id=result.run_id)
    assert len(back.restored) == len(planned)
    assert snapshot(db.engine) == before


@pytest.mark.slow
def test_a_bad_key_is_one_configuration_error(sqlite_db, tmp_path: Path):
    _families(sqlite_db, families=1, orphans=2)
    res = run_cli(["reap", "--apply", "--force", *_args(sqlite_db.url)], tmp_path)
    assert res.returncode == 0, res.stderr
    from kit.cli import clean_env

    bad = run_cli(["runs", *_args(sqlite_db.url)], tmp_path, env=clean_env(DCR_REAPER_LEDGER__KEY="not-a-key"))
    (line,) = assert_errors(bad, 2)
    assert line.startswith("ledger.key: not a Fernet key") and "ledger keygen" in line
    made = run_cli(["ledger", "keygen"], tmp_path)
    assert made.returncode == 0 and len(made.stdout.strip()) == 44


@pytest.mark.slow
def test_purge_deletes_old_tombstones_and_evidence_and_the_run_stays_listed(sqlite_db, tmp_path: Path):
    _families(sqlite_db, families=2, orphans=3)
    config = make_config(sqlite_db.url)
    result = reap(config, do_apply=True)
    assert result.run_id and result.total_acted == 6
    assert purge(config, 3600, dry_run=False) == (0, 0), "nothing is an hour old"
    res = run_cli(["ledger", "purge", "--older-than", "0s", "--dry-run", *_args(sqlite_db.url)], tmp_path)
    assert res.returncode == 0 and "would delete 6 tombstone(s) and 1 evidence record(s)" in res.stdout
    assert len(tombstones(sqlite_db.engine)) == 6
    time.sleep(0.01)
    assert purge(config, 0) == (6, 1)
    assert tombstones(sqlite_db.engine) == []
    (info,) = runs(config)
    assert info.purged and info.acted == 6
    with pytest.raises(ReaperError, match="purged; nothing can be restored"):
        restore(config, run_id=result.run_id)
    bad = run_cli(["ledger", "purge", "--older-than", "soon", *_args(sqlite_db.url)], tmp_path)
    assert_errors(bad, 2)


def test_the_evidence_of_a_run_outlives_its_clients(sqlite_db, tmp_path: Path):
    """The loop the reap acts on is gone from the database afterwards; the run keeps its evidence, and the HTML
    report of that run shows it: the loop, the family's redirect URIs, the database without its user."""
    create_schema(sqlite_db.engine)
    seed_churn(sqlite_db.engine)
    config = make_config(sqlite_db.url, policy={"min_age": "1h"}, classify={"young_for": "10m"}, loops={"window": "3h"})
    result = reap(config, do_apply=True)
    assert result.run_id and result.total_acted == 7
    info, snap, items = past_report(config, result.run_id[:8])
    assert info.id == result.run_id and snap.loops, "the loop is kept with the run"
    assert {i.row.client_id for i in items} >= {c.client_id for c in result.plan.candidates}
    out = tmp_path / "past.html"
    res = run_cli(
        ["runs", "show", result.run_id[:8], "--format", "html", "-o", str(out), *_args(sqlite_db.url)], tmp_path
    )
    assert res.returncode == 0, res.stderr
    html = out.read_text()
    assert f"Evidence kept with run <code>{result.run_id}</code>" in html
    assert "Suspected re-auth loops: 1" in html and 'class="uri">http://localhost:' in html
    assert "sqlite:" not in html and "dcr-reaper 0." in html
    # Today's report of the same database no longer sees the loop: the evidence lives on in the ledger only.
    from reaper.commands import report

    assert not report(config).loops


@pytest.mark.parametrize(
    ("description", "label"),
    [
        ("postgresql+psycopg://app:***@db.internal:5432/auth", "db.internal:5432/auth"),
        ("mariadb+pymysql://root@127.0.0.1:3306/auth?charset=utf8mb4", "127.0.0.1:3306/auth"),
        ("sqlite:////var/lib/mcp/oauth.db", "/var/lib/mcp/oauth.db"),
        ("redis://:***@cache:6379/0", "cache:6379/0"),
        ("/home/app/.fastmcp/oauth-proxy", "/home/app/.fastmcp/oauth-proxy"),
    ],
)
def test_reports_name_the_database_by_host_and_name_without_the_user(description: str, label: str):
    from reaper.output.text import database_label

    assert database_label(description) == label


def test_progress_lines_carry_the_rate_and_an_eta(capsys, monkeypatch):
    from reaper import cli

    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    progress = cli.Progress("restoring", enabled=True, every=0)
    progress(5_000, 20_000)  # 10 s in: 500/s, 15,000 left
    progress(20_000, 20_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "restoring: 5,000/20,000 clients (25%), 500/s, about 30s left",
        "restoring: 20,000/20,000 clients (100%), 1,000/s",
    ]
