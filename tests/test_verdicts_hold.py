"""Verdicts that do not depend on an assumption the operator never stated: the database's clock, every credential
table, hostile or odd stored values, never-expiring tokens, and loops in the demo."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from kit.cli import clean_env
from kit.config import make_config
from kit.schemas.authlib import Base, Client, Token
from kit.schemas.hydra import Hydra
from kit.schemas.mcp_memory import create_mcp_schema, insert_client, insert_tokens
from reaper.analysis.classify import Classifier
from reaper.analysis.model import ClientRow, Snapshot, Verdict
from reaper.commands import check, classified, plan, report
from reaper.config import ClassifyConfig
from reaper.demo import CHURN_NAME, build_demo

HOUR, DAY = 3600, 86400


# --- the database's clock -------------------------------------------------------------------------------


def _authlib_orphans(engine: sa.Engine, n: int = 4) -> list[str]:
    """A churning family on Authlib's own models: old members whose tokens died, a newest live one."""
    Base.metadata.create_all(engine)
    now = time.time()
    ids = []
    with Session(engine) as s:
        for i in range(n + 1):
            age = (n - i) * DAY + HOUR if i < n else 60
            c = Client(client_id=f"c{i}", client_id_issued_at=int(now - age - 10 * DAY * (i < n)))
            c.set_client_metadata(
                {"client_name": "Claude Code (clock)", "redirect_uris": [f"http://localhost:{50000 + i}/cb"]}
            )
            s.add(c)
            issued = int(now - age) if i < n else int(now - 60)
            s.add(
                Token(client_id=f"c{i}", token_type="Bearer", access_token=f"a{i}", issued_at=issued, expires_in=3600)
            )
            ids.append(f"c{i}")
        s.commit()
    return ids


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed (Debian package faketime)")
@pytest.mark.parametrize("offset", ["+1h", "-1h"])
def test_reap_refuses_to_act_when_the_clocks_disagree(pg_db, tmp_path, offset):
    ids = _authlib_orphans(pg_db.engine)
    config = make_config(pg_db.url)
    assert {c.client_id for c in plan(config).candidates} == set(ids[:-1]), "the plan has orphans to reap"
    args = [
        "faketime",
        "-f",
        offset,
        sys.executable,
        "-m",
        "reaper",
        "reap",
        "--apply",
        "--profile",
        "authlib",
        "--database-url",
        pg_db.url,
        "--no-progress",
    ]
    res = subprocess.run(args, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 6, res.stderr
    assert "clock" in res.stderr and "classify.clock_skew" in res.stderr and "nothing acted on" in res.stderr
    with pg_db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar() == len(ids)


def test_verdicts_use_the_database_clock_not_the_hosts(pg_db, monkeypatch):
    """The reaper's clock an hour ahead: an access token with 50 minutes left still keeps its client live."""
    _authlib_orphans(pg_db.engine)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + HOUR)
    snap = report(make_config(pg_db.url))
    assert snap.by_verdict.get("live") == 1 and snap.clock_skew < -3000


# --- every credential table counts ----------------------------------------------------------------------

DEVICE_DDL = """
CREATE TABLE hydra_oauth2_device_auth_codes (
    device_code_signature VARCHAR(255) NOT NULL, user_code_signature VARCHAR(255) NOT NULL,
    request_id VARCHAR(40) NOT NULL, requested_at TIMESTAMP NOT NULL DEFAULT NOW(),
    client_id VARCHAR(255) NOT NULL, scope VARCHAR(1024) NOT NULL, granted_scope VARCHAR(1024) NOT NULL,
    form_data VARCHAR(4096) NOT NULL, session_data TEXT NOT NULL, subject VARCHAR(255) NOT NULL DEFAULT '',
    device_code_active BOOL NOT NULL DEFAULT true, user_code_state SMALLINT NOT NULL DEFAULT 0,
    requested_audience VARCHAR(1024) NOT NULL, granted_audience VARCHAR(1024) NOT NULL,
    challenge_id VARCHAR(40) NULL, expires_at TIMESTAMP NULL, nid UUID NOT NULL,
    PRIMARY KEY (device_code_signature, nid),
    FOREIGN KEY (client_id, nid) REFERENCES hydra_client (id, nid) ON DELETE CASCADE
)"""


def _device_code(engine: sa.Engine, nid: str, client: str, state: int, expires_in: float | None) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO hydra_oauth2_device_auth_codes (device_code_signature, user_code_signature, request_id,"
                " requested_at, client_id, scope, granted_scope, form_data, session_data, user_code_state,"
                " requested_audience, granted_audience, expires_at, nid) VALUES (:d, :u, :r,"
                " timezone('UTC', now()) - interval '1 minute', :c, 'openid', '', '', '{}', :s, '', '',"
                " CASE WHEN CAST(:e AS float8) IS NULL THEN NULL"
                " ELSE timezone('UTC', now()) + make_interval(secs => CAST(:e AS float8)) END, :n)"
            ),
            {
                "d": uuid.uuid4().hex,
                "u": uuid.uuid4().hex,
                "r": uuid.uuid4().hex[:40],
                "c": client,
                "s": state,
                "e": expires_in,
                "n": nid,
            },
        )


def test_a_hydra_client_mid_device_flow_is_live(pg_db):
    h = Hydra(pg_db.engine)
    nid = h.network()
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text(DEVICE_DDL))
    old = h.client(nid, "TV app", ["http://localhost:1/cb"], 3 * DAY)
    pending = h.client(nid, "TV app", ["http://localhost:2/cb"], 2 * DAY)  # the user is entering the code now
    denied = h.client(nid, "TV app", ["http://localhost:3/cb"], 2 * DAY - 60)
    expired = h.client(nid, "Kiosk", ["http://localhost:4/cb"], 2 * DAY)
    h.token("hydra_oauth2_refresh", nid, old, 3 * DAY, DAY)
    _device_code(pg_db.engine, nid, pending, 0, 600)
    _device_code(pg_db.engine, nid, denied, 2, 600)  # rejected: not usable
    _device_code(pg_db.engine, nid, expired, 1, -60)
    config = make_config(pg_db.url, profile="ory-hydra", options={"nid": nid})
    _, findings = check(config)
    assert not [f for f in findings if f.code in ("schema", "optional_table")]
    with classified(config) as (stream, _):
        got = {i.row.client_id: (i.verdict, i.reason) for i in stream}
    assert got[pending] == (Verdict.LIVE, "live_code")
    assert got[denied][0] is not Verdict.LIVE  # a rejected user code works no more
    assert got[expired][0] is not Verdict.LIVE


def test_hydra_graceful_rotation_keeps_a_rotated_token_live_for_the_grace_period(pg_db):
    h = Hydra(pg_db.engine)
    nid = h.network()
    client = h.client(nid, "Claude Code (hydra)", ["http://localhost:5/cb"], 3 * DAY)
    h.token("hydra_oauth2_refresh", nid, client, 3 * DAY, DAY, active=False)  # rotated two days ago
    with pg_db.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE hydra_oauth2_refresh SET first_used_at = timezone('UTC', now()) - interval '2 minutes'")
        )
    strict = make_config(pg_db.url, profile="ory-hydra", options={"nid": nid})
    graceful = make_config(pg_db.url, profile="ory-hydra", options={"nid": nid, "refresh_grace_period": "5m"})
    with classified(strict) as (stream, _):
        assert next(iter(stream)).verdict is not Verdict.LIVE
    with classified(graceful) as (stream, _):
        assert next(iter(stream)).verdict is Verdict.LIVE


def test_check_warns_about_a_table_that_references_clients_but_is_not_mapped(pg_db):
    h = Hydra(pg_db.engine)
    nid = h.network()
    with pg_db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE app_device_sessions (id serial PRIMARY KEY, client_id VARCHAR(255), nid UUID,"
                " FOREIGN KEY (client_id, nid) REFERENCES hydra_client (id, nid))"
            )
        )
    _, findings = check(make_config(pg_db.url, profile="ory-hydra", options={"nid": nid}))
    unmapped = [f for f in findings if f.code == "unmapped_table"]
    assert len(unmapped) == 1 and "app_device_sessions" in unmapped[0].message and unmapped[0].level == "warning"
    assert "a foreign key to hydra_client" in unmapped[0].message and unmapped[0].fix
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "reaper",
            "check",
            "--profile",
            "ory-hydra",
            "--database-url",
            pg_db.url,
            "--option",
            f"nid={nid}",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # 7: the profile matches, with a warning to decide on
    assert res.returncode == 7 and "warning: table 'app_device_sessions' references clients" in res.stdout


# --- decoding never gives up a scan ----------------------------------------------------------------------


def test_authlib_metadata_with_nan_is_read_as_python_reads_it_and_a_burst_is_a_flood(db):
    Base.metadata.create_all(db.engine)
    now = time.time()
    with Session(db.engine) as s:
        for i in range(100):
            c = Client(client_id=f"nan{i:03d}", client_id_issued_at=int(now - 2 * DAY + i * 0.3))
            c.set_client_metadata(
                {"client_name": "Scanner", "redirect_uris": ["http://localhost:7/cb"], "contacts": [math.nan]}
            )
            s.add(c)
        s.commit()
    with db.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT client_metadata FROM oauth2_client LIMIT 1")).scalar()
    assert "NaN" in raw, "Authlib wrote what Python's json writes"
    snap = report(make_config(db.url))
    assert snap.problem_count == 0
    assert snap.by_verdict["abandoned"] == 100
    assert [(f.scope, f.registrations) for f in snap.floods] == [("family", 100)]


def _hostile_sqlite(path: Path) -> float:
    """mcp-memory-service's schema with a name that is not UTF-8, a year-10000 registration and a token issued at
    2^63 - 1, next to two ordinary clients."""
    engine = sa.create_engine(f"sqlite:///{path}")
    create_mcp_schema(engine, "sqlite")
    now = time.time()
    with engine.begin() as conn:
        insert_client(conn, "good", "Good App", json.dumps(["http://localhost:1/cb"]), now - 5 * DAY)
        insert_tokens(conn, "good", now - 60, "a1", "r1", "k1")
        insert_client(conn, "gone", "Good App", json.dumps(["http://localhost:2/cb"]), now - 9 * DAY)
        insert_tokens(conn, "gone", now - 8 * DAY, "a2", "r2", "k2")
        insert_client(conn, "future", "Far Away", json.dumps(["http://localhost:3/cb"]), 253402300800.0)
        insert_client(conn, "tokens", "Odd Token", json.dumps(["http://localhost:4/cb"]), now - 3 * DAY)
        conn.execute(
            sa.text("INSERT INTO oauth_access_tokens VALUES ('odd', 'tokens', 'read', :e, :c)"),
            {"e": now + 600, "c": float(2**63 - 1)},
        )
    engine.dispose()
    raw = sqlite3.connect(path)
    raw.execute(
        "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, created_at) "
        "VALUES ('latin1', CAST(X'4dfc6c6c6572ff1b5b33316d' AS TEXT), '[]', ?)",
        (now - 4 * DAY,),
    )
    raw.commit()
    raw.close()
    return now


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown", "html"])
def test_odd_stored_values_make_one_problem_row_each_and_valid_output(tmp_path, fmt):
    db = tmp_path / "oauth.db"
    _hostile_sqlite(db)
    out = tmp_path / f"report.{fmt}"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "reaper",
            "report",
            "--profile",
            "mcp-memory-service",
            "--database-url",
            str(db),
            "--format",
            fmt,
            "-o",
            str(out),
            "--verdict",
            "live,orphan,protected,abandoned,idle,young",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    text = out.read_text(encoding="utf-8")
    assert "\x1b" not in text and "\ufffd" not in text and "\udcff" not in text
    if fmt == "json":
        data = json.loads(text)
        rows = {c["client_id"]: c for c in data["clients"]}
        assert rows["good"]["verdict"] == "live" and rows["gone"]["verdict"] != "protected"
        for cid in ("latin1", "future", "tokens"):
            assert rows[cid]["verdict"] == "protected" and len(rows[cid]["problems"]) == 1, rows[cid]
        assert rows["future"]["registered_at"] is None and "time" in rows["future"]["problems"][0]
        assert "UTF-8" in rows["latin1"]["problems"][0] and "out of range" in rows["tokens"]["problems"][0]
    elif fmt == "csv":
        parsed = list(csv.DictReader(io.StringIO(text)))
        assert {r["client_id"] for r in parsed} == {"good", "gone", "latin1", "future", "tokens"}
    elif fmt != "html":  # the evidence report lists families with loops, floods or churn only
        assert "latin1" in text and "future" in text and "tokens" in text


def _peak_rss_mb(args: list[str], cwd: Path) -> float:
    """Run the CLI in a fresh interpreter and return its peak RSS. VmHWM, not getrusage: on Linux a child's
    maxrss starts from its parent's size at fork, the test process's own."""
    code = (
        "import re, sys\n"
        "from reaper.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "with open('/proc/self/status') as f:\n    hwm = re.search(r'VmHWM:\\s+(\\d+)', f.read()).group(1)\n"
        "sys.stderr.write(f'MAXRSS {hwm}\\n')\n"
        "sys.exit(code)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MAXRSS"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_two_hundred_one_megabyte_names_stay_under_100_mb(pg_db, tmp_path):
    Base.metadata.create_all(pg_db.engine)
    now = time.time()
    big = "N" * (1 << 20)
    with pg_db.engine.begin() as conn:
        for i in range(200):
            meta = json.dumps({"client_name": f"{i:03d}{big}", "redirect_uris": [f"http://localhost:{i}/cb"]})
            conn.execute(
                sa.text(
                    "INSERT INTO oauth2_client (client_id, client_id_issued_at, client_secret_expires_at,"
                    " client_metadata) VALUES (:c, :t, 0, :m)"
                ),
                {"c": f"big{i}", "t": int(now - 3 * DAY), "m": meta},
            )
    for fmt in ("json", "table"):
        rss = _peak_rss_mb(
            ["report", "--profile", "authlib", "--database-url", pg_db.url, "--format", fmt, "-o", str(tmp_path / fmt)],
            tmp_path,
        )
        print("RSS", fmt, rss, sorted(k for k in os.environ if "MALLOC" in k or "PYTHON" in k))
        assert rss < 100, f"{fmt}: peak RSS {rss:.0f} MB"
    data = json.loads((tmp_path / "json").read_text(encoding="utf-8"))
    assert len(data["clients"]) == 200 and data["summary"]["problems"] == 0
    assert all(len(c["name"]) == 1024 for c in data["clients"]), "a name is read up to its bound, and kept"


# --- never-expiring refresh tokens ------------------------------------------------------------------------


def _cursor_family(engine: sa.Engine) -> None:
    """Three Cursor registrations, 1-3 days old, each used in its first hour, each holding an unrevoked refresh
    token that never expires (Authlib's default)."""
    Base.metadata.create_all(engine)
    now = time.time()
    with Session(engine) as s:
        for i, days in enumerate((3, 2, 1)):
            c = Client(client_id=f"cursor{i}", client_id_issued_at=int(now - days * DAY))
            c.set_client_metadata({"client_name": "Cursor", "redirect_uris": [f"http://127.0.0.1:{4000 + i}/cb"]})
            s.add(c)
            s.add(
                Token(
                    client_id=f"cursor{i}",
                    token_type="Bearer",
                    access_token=f"a{i}",
                    refresh_token=f"r{i}",
                    issued_at=int(now - days * DAY + 600),
                    expires_in=3600,
                )
            )
        s.commit()


def test_never_expiring_refresh_tokens_are_counted_and_stale_after_reaps_the_superseded(db, tmp_path):
    _cursor_family(db.engine)
    snap = report(make_config(db.url))
    assert snap.by_verdict["live"] == 3 and snap.live_forever_only == 3
    _, findings = check(make_config(db.url))
    [forever] = [f for f in findings if f.code == "refresh_lifetime"]
    assert "3 client(s) are live only because" in forever.message
    assert "options.refresh_lifetime" in forever.fix and "classify.stale_after" in forever.fix
    res = subprocess.run(
        [sys.executable, "-m", "reaper", "report", "--profile", "authlib", "--database-url", db.url],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "NOTE: 3 client(s) are live only because their credentials never expire" in res.stdout

    stale = make_config(db.url, classify={"stale_after": "12h"}, policy={"min_age": "1h"})
    with classified(stale) as (stream, _):
        got = {i.row.client_id: (i.verdict, i.reason) for i in stream}
    assert got == {
        "cursor0": (Verdict.ORPHAN, "stale"),
        "cursor1": (Verdict.ORPHAN, "stale"),
        "cursor2": (Verdict.LIVE, "live_token"),  # the newest member is never stale
    }
    # The statement re-checks it: a refresh issued to cursor1 after the plan saves it.
    from reaper.commands import apply

    the_plan = plan(stale)
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE oauth2_token SET issued_at = :t WHERE client_id = 'cursor1'"), {"t": int(time.time())}
        )
    result = apply(stale, the_plan)
    assert result.total_acted == 1 and result.skipped["changed_since_scan"] == 1
    with db.engine.connect() as conn:
        left = {r[0] for r in conn.execute(sa.text("SELECT client_id FROM oauth2_client"))}
    assert left == {"cursor1", "cursor2"}


# --- ties, and loops in the demo ------------------------------------------------------------------------


def test_a_tie_on_registration_time_goes_to_the_member_with_the_newest_activity(db):
    Base.metadata.create_all(db.engine)
    now = time.time()
    with Session(db.engine) as s:
        for cid, used in (("zzz-unused-since", 5 * DAY), ("aaa-used-now", 60)):
            c = Client(client_id=cid, client_id_issued_at=int(now - 6 * DAY))  # the same second
            c.set_client_metadata({"client_name": "Burst", "redirect_uris": ["http://localhost:9/cb"]})
            s.add(c)
            s.add(Token(client_id=cid, token_type="Bearer", access_token=cid, issued_at=int(now - used), expires_in=1))
        s.commit()
    with classified(make_config(db.url)) as (stream, snap):
        got = {i.row.client_id: i.verdict for i in stream}
    # Neither holds a live token; the one used a minute ago is the family's newest, not the higher client_id.
    assert got == {"zzz-unused-since": Verdict.ORPHAN, "aaa-used-now": Verdict.IDLE}
    [fam] = snap.families.values()
    assert fam.newest_client_id == "aaa-used-now"


def test_the_demo_flags_its_churning_family_as_a_loop_and_only_that_one(tmp_path):
    path = build_demo(tmp_path / "demo.sqlite")
    snap = report(make_config(f"sqlite:///{path}", profile="mcp-memory-service"))
    assert snap.loop_detection == "on" and snap.loop_evidence == "rotation"
    [loop] = snap.loops.values()
    assert loop.name == CHURN_NAME and loop.cycles == 31 and len(loop.steps) == 31
    assert all(step.verdict == "orphan" for step in loop.steps)


def test_the_demo_command_shows_the_loop(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "reaper", "demo", "--db", str(tmp_path / "d.sqlite")],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "Suspected re-auth loops: 1" in res.stdout


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(5)))
def test_a_familys_newest_member_and_name_do_not_depend_on_arrival_order(order):
    """Members whose times cannot be trusted (a future registration, no registration time) still give the family
    one newest member and one name, whatever order the scan reads them in."""
    now = 1_750_000_000.0
    rows = [
        ClientRow(f"k{i}", f"c{i}", created, name=name, redirect_uris=("http://localhost:9/cb",), problems=problems)
        for i, (created, name, problems) in enumerate(
            [
                (now + 1000, "Burst", ["registered in the future"]),
                (now + 1000, "burst", ["registered in the future"]),
                (None, "BURST", []),
                (now + 2000, "Burst ", ["registered in the future"]),
                (None, "burst", []),
            ]
        )
    ]
    snap = Snapshot(profile="authlib", database="test", started_at=now)
    list(Classifier(ClassifyConfig(), snap, now).run([rows[i] for i in order]))
    [fam] = snap.families.values()
    assert (fam.newest_client_id, fam.name) == ("c4", "burst")
