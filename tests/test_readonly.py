"""Safety invariant S1: report never writes, and the database itself enforces it.

(a) a read-only engine's writes fail at the database; (b) a write slipped into the report path fails and
changes nothing; (c) `python -m reaper report` leaves the database exactly as it found it. Each refusal has a
control showing the same write succeeds on a read-write connection: they fail if read-only mode goes away.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InternalError, OperationalError
from sqlalchemy.orm import Session

from kit.schemas.authlib import AuthorizationCode, Base, Client, Token
from reaper.analysis.model import Verdict
from reaper.backends.sql import SqlBackend, SqlScan
from reaper.backends.sql import backend as backend_module
from reaper.commands import classified, plan, report, statements
from reaper.config import load_config
from reaper.db import make_engine
from reaper.errors import DatabaseError
from reaper.profiles import bind_profile

TABLES = ("oauth2_client", "oauth2_token", "oauth2_code")


CHURN = 6  # registrations of one CLI; the newest has a live token


def populate(engine: sa.Engine) -> None:
    """An Authlib server's tables after a re-auth loop, written through Authlib's models."""
    Base.metadata.create_all(engine)
    now = int(time.time())
    with Session(engine) as session:
        for i in range(CHURN):
            age = 2 * 3600 + (CHURN - 1 - i) * 1800
            client = Client(client_id=f"churn-{i}", client_id_issued_at=now - age)
            client.set_client_metadata(
                {
                    "client_name": "Claude Code (wiki)",
                    "token_endpoint_auth_method": "none",
                    "redirect_uris": [f"http://localhost:{50000 + i}/callback"],
                }
            )
            session.add(client)
            expires = 3600 if i < CHURN - 1 else 0
            session.add(
                Token(
                    client_id=client.client_id,
                    access_token=f"at-{i}",
                    issued_at=now - age + 5,
                    expires_in=expires,
                    user_id=1,
                )
            )
        static = Client(client_id="dashboard")
        static.set_client_metadata({"client_name": "Dashboard", "redirect_uris": ["https://dash.example.com/cb"]})
        session.add(static)
        session.add(AuthorizationCode(code="c-1", client_id="dashboard", auth_time=now - 30, user_id=1))
        session.commit()


def state(engine: sa.Engine) -> dict[str, Any]:
    """Everything a write would change: the tables that exist, and every row of ours, as read read-write."""
    with engine.connect() as conn:
        out: dict[str, Any] = {"tables": sorted(sa.inspect(conn).get_table_names())}
        for table in TABLES:
            if table not in out["tables"]:
                continue
            out[table] = [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))]
            if engine.dialect.name == "postgresql":
                # xmin changes on any UPDATE, even one that writes the same values back.
                out[f"{table}.xmin"] = conn.execute(sa.text(f"SELECT xmin::text FROM {table} ORDER BY id")).all()
    return out


def file_hash(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def sqlite_files(db: Any) -> tuple[str, list[str]]:
    """The SQLite file's hash and the files beside it (the engine closed first, so nothing of ours is open)."""
    db.engine.dispose()
    path = db.engine.url.database
    return file_hash(path), sorted(os.listdir(os.path.dirname(path)))


def reaper_config(url: str) -> Any:
    return load_config(None, {"database_url": url, "profile": "authlib"}, environ={})


WRITES = {
    "insert": "INSERT INTO oauth2_client (client_id, client_id_issued_at, client_secret_expires_at) "
    "VALUES ('intruder', 1, 0)",
    "update": "UPDATE oauth2_client SET client_metadata = '{}'",
    "delete": "DELETE FROM oauth2_token",
    "create": "CREATE TABLE reaper_intruder (x integer)",
    "drop": "DROP TABLE oauth2_code",
}
REFUSAL = {
    "sqlite": (OperationalError, "readonly database"),
    "postgresql": (InternalError, "read-only transaction"),
}


@pytest.mark.parametrize("kind", list(WRITES))
def test_readonly_engine_refuses_writes_at_the_database(db, kind):
    populate(db.engine)
    before = state(db.engine)
    engine = make_engine(db.url, readonly=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar_one() == CHURN + 1
            with pytest.raises(DBAPIError) as err:
                conn.execute(sa.text(WRITES[kind]))
                conn.commit()
            conn.rollback()
    finally:
        engine.dispose()
    error_class, message = REFUSAL[db.kind]
    assert isinstance(err.value, error_class), err.value
    assert message in str(err.value.orig)
    assert state(db.engine) == before


def test_readwrite_engine_accepts_the_same_writes(db):
    """Control: the statements above are valid writes; only the read-only mode stops them."""
    populate(db.engine)
    before = state(db.engine)
    engine = make_engine(db.url, readonly=False)
    try:
        with engine.begin() as conn:
            for stmt in WRITES.values():
                conn.execute(sa.text(stmt))
    finally:
        engine.dispose()
    after = state(db.engine)
    assert "reaper_intruder" in after["tables"] and "oauth2_code" not in after["tables"]
    assert after["oauth2_token"] == [] and len(after["oauth2_client"]) == len(before["oauth2_client"]) + 1


def _sabotage(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the report path delete every client, and commit, on the connection it scans with."""
    calls: list[str] = []
    real_rows = SqlScan.rows

    def rows_that_write(self: SqlScan) -> Any:
        calls.append(self.conn.engine.dialect.name)
        self.conn.execute(sa.text("DELETE FROM oauth2_token"))
        self.conn.execute(sa.text("DELETE FROM oauth2_client"))
        self.conn.commit()
        return real_rows(self)

    monkeypatch.setattr(SqlScan, "rows", rows_that_write)
    return calls


def test_write_slipped_into_report_fails_at_the_database(db, monkeypatch):
    populate(db.engine)
    before = state(db.engine)
    calls = _sabotage(monkeypatch)

    with pytest.raises(DatabaseError) as err:
        report(reaper_config(db.url))

    assert calls == [db.kind], "the sabotaged scan ran on the report's connection"
    assert REFUSAL[db.kind][1] in str(err.value)
    assert "scan of" in str(err.value)
    assert state(db.engine) == before


def test_slipped_write_would_succeed_on_a_readwrite_source(db, monkeypatch):
    """Control: the same sabotage through a read-write source really deletes, so the test above can fail."""
    populate(db.engine)
    calls = _sabotage(monkeypatch)
    config = reaper_config(db.url)
    backend = SqlBackend(config, bind_profile(config))
    backend._engines["read"] = make_engine(db.url, readonly=False)  # what S1 forbids, to show the sabotage bites
    try:
        with classified(config, backend) as (stream, snapshot):
            assert list(stream) == []
    finally:
        backend.close()
    assert calls == [db.kind] and snapshot.clients == 0
    after = state(db.engine)
    assert after["oauth2_client"] == [] and after["oauth2_token"] == []


def _run_report(url: str, cwd: Any) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCR_REAPER_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reaper",
            "report",
            "--profile",
            "authlib",
            "--database-url",
            url,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_report(data: dict[str, Any]) -> None:
    verdicts = data["summary"]["by_verdict"]
    assert data["summary"]["clients"] == CHURN + 1
    assert (verdicts[Verdict.LIVE], verdicts[Verdict.ORPHAN], verdicts[Verdict.PROTECTED]) == (
        1,
        CHURN - 1,
        1,
    )


@pytest.mark.slow
def test_report_command_leaves_sqlite_file_byte_identical(sqlite_db, tmp_path):
    populate(sqlite_db.engine)
    before = sqlite_files(sqlite_db)

    _check_report(_run_report(sqlite_db.url, tmp_path))

    assert sqlite_files(sqlite_db) == before, "the file byte-identical, no journal or WAL left behind"
    assert len(state(sqlite_db.engine)["oauth2_client"]) == CHURN + 1


@pytest.mark.slow
def test_report_command_leaves_postgres_rows_untouched(pg_db, tmp_path):
    populate(pg_db.engine)
    before = state(pg_db.engine)

    _check_report(_run_report(pg_db.url, tmp_path))

    assert state(pg_db.engine) == before


def test_reap_sql_opens_no_read_write_connection(db, monkeypatch):
    """`reap --sql` plans and prints each batch's statements on read-only connections only: no read-write engine
    is ever made, and the store is as it was."""
    populate(db.engine)
    before = state(db.engine)
    made: list[bool] = []
    real = backend_module.make_engine

    def recording(url: str, readonly: bool, **kw: Any) -> sa.Engine:
        made.append(readonly)
        return real(url, readonly=readonly, **kw)

    monkeypatch.setattr(backend_module, "make_engine", recording)
    config = load_config(None, {"database_url": db.url, "profile": "authlib", "policy": {"min_age": 60}}, {})
    the_plan = plan(config)
    batches = statements(config, the_plan)

    assert len(the_plan.candidates) == CHURN - 1
    text = "\n".join(s for batch in batches for s in batch)
    assert "DELETE FROM oauth2_client" in text
    assert made and all(made), f"engines made (readonly flags): {made}"
    assert state(db.engine) == before


@pytest.mark.slow
def test_reap_sql_command_leaves_the_sqlite_file_byte_identical(sqlite_db, tmp_path):
    populate(sqlite_db.engine)
    before = sqlite_files(sqlite_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCR_REAPER_")}
    env["DCR_REAPER_POLICY__MIN_AGE"] = "60"
    proc = subprocess.run(
        [sys.executable, "-m", "reaper", "reap", "--sql", "--profile", "authlib", "--database-url", sqlite_db.url],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-- batch 1") and "DELETE FROM oauth2_client" in proc.stdout
    assert sqlite_files(sqlite_db) == before, "the file byte-identical, no journal, WAL or ledger left behind"
