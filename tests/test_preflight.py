"""`check` is the preflight: beyond the schema, what the operator must decide before a reap, each with its fix.

An Authlib application with its own table names (the real mixins, which index no token's client_id), on every
database: the index warning carries a statement that, run as printed, silences it. On PostgreSQL, a read-only
role is told which ledger right it lacks; under a clock an hour off, check warns that a reap would refuse.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kit.cli import assert_errors, clean_env, run_cli
from kit.schemas.authlib import make_models
from reaper.config import LedgerConfig
from reaper.ledger import Ledger

RENAMED = {"oauth2_client": "client", "oauth2_token": "token", "oauth2_code": "code"}


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "dcr-reaper.toml"
    lines = ['profile = "authlib"', f"database_url = {json.dumps(url)}", "[tables]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in RENAMED.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _check(tmp_path: Path, url: str, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    config = _config(tmp_path, url)
    cmd = [*(prefix or []), sys.executable, "-m", "reaper", "check", "--config", str(config), "--format", "json"]
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)


def _findings(res: subprocess.CompletedProcess[str], code: str) -> list[dict[str, Any]]:
    doc = json.loads(res.stdout)
    return [f for f in doc["findings"] if f["code"] == code]


@pytest.mark.slow
def test_check_prints_the_missing_index_and_the_statement_that_adds_it(any_db, tmp_path):
    make_models("client", "token", "code").create_all(any_db.engine)

    res = _check(tmp_path, any_db.url)
    assert res.returncode == 7, res.stderr  # matches, with warnings
    assert json.loads(res.stdout)["status"] == "warnings"
    by_table = {f["message"].split()[3].rstrip(":"): f for f in _findings(res, "index")}
    assert set(by_table) == {"token.client_id", "code.client_id"}, by_table
    fixes = [f["fix"] for f in by_table.values()]
    if any_db.kind == "postgresql":
        assert all(f.startswith("CREATE INDEX CONCURRENTLY") for f in fixes)  # no write lock on a live server
    if any_db.kind == "mariadb":
        assert all("ALGORITHM=INPLACE" in f and "LOCK=NONE" in f for f in fixes)

    # The statements, run as printed (CONCURRENTLY cannot run in a transaction): the warnings go away.
    with any_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for fix in fixes:
            conn.exec_driver_sql(fix)
    again = _check(tmp_path, any_db.url)
    assert _findings(again, "index") == [], again.stdout


@pytest.mark.slow
def test_check_without_a_match_is_json_with_exit_3(sqlite_db, tmp_path):
    make_models().create_all(sqlite_db.engine)  # the default names: the renamed tables are missing
    res = _check(tmp_path, sqlite_db.url)
    assert res.returncode == 3, res.stderr
    doc = json.loads(res.stdout)
    assert doc["status"] == "mismatch" and any(f["level"] == "error" for f in doc["findings"])

    text = run_cli(["check", "--config", str(tmp_path / "dcr-reaper.toml")], tmp_path)
    assert any("client" in line for line in assert_errors(text, 3, count=None))


@pytest.mark.slow
def test_check_says_where_the_ledger_is_and_what_a_read_only_role_may_not_do(pg_db, tmp_path):
    make_models("client", "token", "code").create_all(pg_db.engine)
    role = f"reaper_ro_{secrets.token_hex(4)}"
    with pg_db.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT ON client, token, code TO {role}")
    url = pg_db.url.replace("://postgres@", f"://{role}@")
    try:
        res = _check(tmp_path, url)
        assert res.returncode == 7, res.stderr
        [where, rights] = _findings(res, "ledger")
        assert where["level"] == "info" and "dcr_reaper_*" in where["message"]
        assert rights["level"] == "warning" and "create tables in public" in rights["message"]
        assert f"GRANT USAGE, CREATE ON SCHEMA public TO {role}" in rights["fix"]

        # A first run as a superuser made the ledger; the role may read the auth tables, not the ledger's.
        Ledger(pg_db.engine, LedgerConfig()).create()
        res = _check(tmp_path, url)
        [_, rights] = _findings(res, "ledger")
        assert "read and write public.dcr_reaper_runs" in rights["message"], rights
        with pg_db.engine.begin() as conn:
            conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        res = _check(tmp_path, url)
        assert [f["level"] for f in _findings(res, "ledger")] == ["info"], res.stdout
        # A ledger an older release made has no restores table: the next reap or restore creates it (CREATE).
        with pg_db.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE dcr_reaper_restores")
        res = _check(tmp_path, url)
        [_, rights] = _findings(res, "ledger")
        assert rights["level"] == "warning" and "create tables in public" in rights["message"], rights

        # check itself wrote nothing: no ledger table appeared for the role, nothing was created anywhere.
        with pg_db.engine.connect() as conn:
            owned = conn.exec_driver_sql(f"SELECT count(*) FROM pg_tables WHERE tableowner = '{role}'").scalar()
        assert owned == 0
    finally:
        with pg_db.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed (Debian package faketime)")
def test_check_warns_that_a_reap_would_refuse_under_a_skewed_clock(pg_db, tmp_path):
    make_models("client", "token", "code").create_all(pg_db.engine)
    with pg_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("token", "code"):
            conn.exec_driver_sql(f"CREATE INDEX ON {table} (client_id)")
    res = _check(tmp_path, pg_db.url, prefix=["faketime", "-f", "+1h"])
    assert res.returncode == 7, res.stderr
    [clock] = _findings(res, "clock")
    assert clock["level"] == "warning" and "exit 6" in clock["message"] and "NTP" in clock["fix"]

    calm = _check(tmp_path, pg_db.url)
    assert calm.returncode == 0, calm.stdout  # indexed, the ledger creatable, the clocks agree: nothing to decide
    assert [f["level"] for f in _findings(calm, "clock")] == ["info"]
