"""Bad input gets one clear line on stderr, a documented exit code, no traceback, no secret, and no write.

Every test runs the real CLI (`python -m reaper`) in a subprocess with DCR_REAPER_* removed from the
environment and the working directory set to tmp_path, so no ./dcr-reaper.toml is picked up by accident.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from kit.cli import assert_errors, clean_env, run_cli, stderr_lines
from kit.databases import sqlite_state
from kit.schemas.mcp_memory import create_mcp_schema, mcp_profile
from reaper.demo import build_demo

pytestmark = pytest.mark.slow  # every test runs the real CLI in a subprocess

MCP = ["--profile", "mcp-memory-service"]
DEMO_CLIENTS = 35  # 1 editor + 32 churned registrations + 1 abandoned + 1 young


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """The demo database (mcp-memory-service schema, SQLite) in its own directory."""
    (tmp_path / "db").mkdir()
    return build_demo(tmp_path / "db" / "demo.sqlite")


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


# --- configuration: exit 2 -------------------------------------------------------------------------------


def test_missing_config_file(tmp_path, demo):
    before = sqlite_state(demo)
    res = run_cli(["report", "--config", "nope.toml", *MCP, "--database-url", _url(demo)], tmp_path)
    [line] = assert_errors(res, 2)
    assert "nope.toml" in line and "not found" in line
    assert res.stdout == ""
    assert sqlite_state(demo) == before


def test_missing_config_file_named_by_environment(tmp_path):
    res = run_cli(["report"], tmp_path, env=clean_env(DCR_REAPER_CONFIG=str(tmp_path / "gone.toml")))
    [line] = assert_errors(res, 2)
    assert "gone.toml" in line


def test_malformed_toml_names_file_and_line(tmp_path, demo):
    (tmp_path / "bad.toml").write_text('profile = "mcp-memory-service"\n[classify\nyoung_for = "1h"\n')
    res = run_cli(["report", "--config", "bad.toml", "--database-url", _url(demo)], tmp_path)
    [line] = assert_errors(res, 2)
    assert "bad.toml" in line and "malformed TOML" in line and "line 2" in line


@pytest.mark.parametrize(
    ("content", "keys"),
    [
        ("bogus = 1\n", ["'bogus'"]),
        ("[classify]\nbogus = 1\n", ["'classify.bogus'"]),
        # Every problem is listed, one per line, not just the first.
        ("bogus = 1\n[classify]\nbogus = 1\n", ["'bogus'", "'classify.bogus'"]),
        (
            'databse_url = "x"\n[classify]\nyoung_for = "1h"\nyuong_for = "2h"\n[report]\ncolour = "red"\n',
            ["'databse_url'", "'classify.yuong_for'", "'report.colour'"],
        ),
    ],
)
def test_unknown_config_keys_are_all_listed(tmp_path, demo, content, keys):
    (tmp_path / "c.toml").write_text(content)
    before = sqlite_state(demo)
    res = run_cli(["report", "--config", "c.toml", *MCP, "--database-url", _url(demo)], tmp_path)
    lines = assert_errors(res, 2, count=len(keys))
    for key in keys:
        [match] = [line for line in lines if key in line]
        assert "unknown key" in match and "c.toml" in match
    assert sqlite_state(demo) == before


@pytest.mark.parametrize(
    ("content", "key", "detail"),
    [
        ('[classify]\nyoung_for = "abc"\n', "classify.young_for", "abc"),
        ("[classify]\nchurn_min_registrations = 1\n", "classify.churn_min_registrations", "2"),
        ('[report]\ntop_families = "ten"\n', "report.top_families", "integer"),
        ("classify = 5\n", "classify", "dictionary"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, content, key, detail):
    (tmp_path / "c.toml").write_text(content)
    res = run_cli(["check", "--config", "c.toml"], tmp_path)
    [line] = assert_errors(res, 2)
    assert line.startswith(f"c.toml: {key}: ") and detail in line


def test_bad_value_from_environment_names_the_variable_not_the_file(tmp_path):
    # A valid ./dcr-reaper.toml is picked up; the bad value comes from the environment, and the message must
    # blame the variable, not the file.
    (tmp_path / "dcr-reaper.toml").write_text('profile = "mcp-memory-service"\n[classify]\nyoung_for = "1h"\n')
    env = clean_env(DCR_REAPER_CLASSIFY__YOUNG_FOR="abc", DCR_REAPER_BOGUS="1")
    res = run_cli(["check"], tmp_path, env=env)
    lines = assert_errors(res, 2, count=2)
    assert any(line.startswith("DCR_REAPER_CLASSIFY__YOUNG_FOR: classify.young_for:") for line in lines), lines
    assert any(line.startswith("DCR_REAPER_BOGUS: unknown key 'bogus'") for line in lines), lines
    assert not any("dcr-reaper.toml" in line for line in lines), lines


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--format", "xml"],
        ["report", "--no-such-flag"],
        ["no-such-command"],
        ["report", "--verdict", "zombie"],
        ["report", "--table", "oauth2_client"],
    ],
)
def test_usage_errors_are_one_line(tmp_path, demo, args):
    res = run_cli([*args, *MCP, "--database-url", _url(demo)] if args[0] == "report" else args, tmp_path)
    [line] = assert_errors(res, 2)
    assert args[-1] in line


# --- databases: exit 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "check"])
def test_unreachable_database(tmp_path, command):
    res = run_cli(
        [command, "--profile", "authlib", "--database-url", "postgresql://reaper@127.0.0.1:1/auth"],
        tmp_path,
        timeout=60,
    )
    [line] = assert_errors(res, 1)
    assert line.startswith("cannot connect to postgresql+psycopg://reaper@127.0.0.1:1/auth:"), line
    assert "refused" in line.lower()
    assert res.stdout == ""


PASSWORD = "s3cret-Value"


@pytest.mark.parametrize(
    ("url", "exit_code"),
    [
        (f"postgresql://reaper:{PASSWORD}@127.0.0.1:1/auth", 1),
        (f"postgresql://reaper@127.0.0.1:1/auth?password={PASSWORD}", 1),  # libpq takes it as a parameter too
        (f"mysql://reaper:{PASSWORD}@127.0.0.1:1/auth", 1),
        (f"postgresql://reaper:{PASSWORD}@127.0.0.1:99999/auth", 1),
        (f"postgresql://reaper:{PASSWORD}@127.0.0.1:notaport/auth", 2),  # not a URL: a config error
        (f"postgresql://reaper:{PASSWORD}@no-such-host.invalid/auth", 1),
    ],
)
@pytest.mark.parametrize("debug", [False, True])
def test_password_is_never_echoed(tmp_path, url, exit_code, debug):
    args = ["--debug"] if debug else []
    res = run_cli([*args, "report", "--profile", "authlib", "--database-url", url], tmp_path, timeout=60)
    assert res.returncode == exit_code, res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    if debug:
        assert "Traceback" in res.stderr
    else:
        [line] = assert_errors(res, exit_code)
        assert "reaper" in line or "database_url" in line


def test_wrong_password_postgres_never_echoed(tmp_path, pg_db):
    # The local test server trusts every TCP connection from 127.0.0.1
    # (pg_hba.conf `host all all 127.0.0.1 trust`), so a wrong password is not rejected there. The test works
    # either way: with password authentication the connection fails ("password authentication failed"); under
    # trust it succeeds and the scan fails because the role may not read the tables ("permission denied").
    # Both are exit 1, one line, and neither the role's real password nor the wrong one may appear anywhere.
    role = f"reaper_pw_{uuid.uuid4().hex[:8]}"
    real, wrong = "s3cret-Value", "Wr0ng-Pa55word"
    create_mcp_schema(pg_db.engine, "postgresql")
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{real}'"))
    try:
        url = make_url(pg_db.url).set(username=role, password=wrong).render_as_string(hide_password=False)
        assert wrong in url
        profile = mcp_profile("postgresql", tmp_path)
        res = run_cli(["report", "--profile", profile, "--database-url", url], tmp_path, timeout=60)
        [line] = assert_errors(res, 1)
        assert "password authentication failed" in line or "permission denied" in line, line
        assert f"{role}:***@" in line
        res_check = run_cli(["check", "--profile", profile, "--database-url", url], tmp_path, timeout=60)
        assert res_check.returncode in (0, 1), res_check.stderr  # ok under trust, refused under password auth
        for r in (res, res_check):
            assert real not in r.stdout + r.stderr and wrong not in r.stdout + r.stderr
        assert f"{role}:***@" in res_check.stdout + res_check.stderr
    finally:
        with pg_db.engine.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))


def test_wrong_password_mariadb_is_refused_and_never_echoed(tmp_path, mariadb_db):
    # MariaDB checks the password (root has none here): a real "Access denied" from the server.
    wrong = "Wr0ng-Pa55word"
    url = make_url(mariadb_db.url).set(password=wrong).render_as_string(hide_password=False)
    res = run_cli(["check", "--profile", "authlib", "--database-url", url], tmp_path, timeout=60)
    [line] = assert_errors(res, 1)
    assert "Access denied" in line and ":***@" in line
    assert wrong not in res.stdout + res.stderr


@pytest.mark.parametrize("form", ["url", "bare path"])
def test_missing_sqlite_file_is_an_error_and_is_not_created(tmp_path, form):
    target = tmp_path / "missing.sqlite"
    raw = _url(target) if form == "url" else "missing.sqlite"
    res = run_cli(["report", *MCP, "--database-url", raw], tmp_path)
    [line] = assert_errors(res, 1)
    assert str(target) in line and "no such SQLite database file" in line
    assert list(tmp_path.glob("missing.sqlite*")) == []


def test_sqlite_file_that_is_not_a_database(tmp_path):
    junk = tmp_path / "notes.sqlite"
    junk.write_text("this is not a database\n")
    res = run_cli(["report", *MCP, "--database-url", _url(junk)], tmp_path)
    [line] = assert_errors(res, 1)
    assert "notes.sqlite" in line and "not a database" in line
    assert junk.read_text() == "this is not a database\n"


def test_environment_database_url_and_flag_precedence(tmp_path, demo):
    env = clean_env(DCR_REAPER_DATABASE_URL=_url(demo), DCR_REAPER_PROFILE="mcp-memory-service")
    res = run_cli(["report", "--format", "json"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["summary"]["clients"] == DEMO_CLIENTS

    missing = tmp_path / "env-missing.sqlite"
    env = clean_env(DCR_REAPER_DATABASE_URL=_url(missing), DCR_REAPER_PROFILE="mcp-memory-service")
    res = run_cli(["report"], tmp_path, env=env)
    [line] = assert_errors(res, 1)
    assert str(missing) in line
    assert not missing.exists()

    res = run_cli(["report", "--format", "json", "--database-url", _url(demo)], tmp_path, env=env)
    assert res.returncode == 0, res.stderr  # the flag beats the environment
    assert json.loads(res.stdout)["summary"]["clients"] == DEMO_CLIENTS


# --- profiles and schemas: exit 2 / 3 --------------------------------------------------------------------


def test_unknown_profile(tmp_path, demo):
    res = run_cli(["report", "--profile", "keycloack", "--database-url", _url(demo)], tmp_path)
    [line] = assert_errors(res, 2)
    assert "unknown profile 'keycloack'" in line and "authlib" in line and "mcp-memory-service" in line


def test_missing_profile_file(tmp_path, demo):
    res = run_cli(["report", "--profile", "./mine.toml", "--database-url", _url(demo)], tmp_path)
    [line] = assert_errors(res, 2)
    assert "mine.toml" in line and "not found" in line


@pytest.mark.parametrize("command", ["report", "check"])
def test_profile_that_does_not_match_the_schema(tmp_path, demo, command):
    before = sqlite_state(demo)
    res = run_cli([command, "--profile", "authlib", "--database-url", _url(demo)], tmp_path)
    lines = assert_errors(res, 3, count=None)
    for table in ("oauth2_client", "oauth2_token", "oauth2_code"):
        assert sum(table in line for line in lines) == 1, lines
    assert len(lines) == 3  # one line per problem
    assert res.stdout == ""
    assert sqlite_state(demo) == before


def _rename_columns(path: Path, *renames: tuple[str, str, str]) -> None:
    con = sqlite3.connect(path)
    try:
        for table, old, new in renames:
            con.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
        con.commit()
    finally:
        con.close()


def test_check_lists_one_renamed_column(tmp_path, demo):
    ok = run_cli(["check", *MCP, "--database-url", _url(demo)], tmp_path)
    # It matches; the one warning is real: mcp-memory-service indexes client_id on its token tables only.
    assert ok.returncode == 7 and ok.stdout.startswith("ok: profile 'mcp-memory-service' matches"), ok.stderr
    assert ok.stderr == ""
    [warning] = [line for line in ok.stdout.splitlines() if line.startswith("warning:")]
    assert "oauth_authorization_codes.client_id" in warning

    _rename_columns(demo, ("oauth_clients", "client_name", "display_name"))
    before = sqlite_state(demo)
    res = run_cli(["check", *MCP, "--database-url", _url(demo)], tmp_path)
    [line] = assert_errors(res, 3)
    assert "oauth_clients.client_name" in line and "not found" in line
    assert sqlite_state(demo) == before


def test_check_lists_every_missing_column_on_its_own_line(tmp_path, demo):
    _rename_columns(
        demo,
        ("oauth_clients", "created_at", "registered"),
        ("oauth_refresh_tokens", "revoked", "is_revoked"),
        ("oauth_authorization_codes", "expires_at", "expiry"),
    )
    res = run_cli(["check", *MCP, "--database-url", _url(demo)], tmp_path)
    lines = assert_errors(res, 3, count=3)
    for column in (
        "oauth_clients.created_at",
        "oauth_refresh_tokens.revoked",
        "oauth_authorization_codes.expires_at",
    ):
        assert sum(column in line for line in lines) == 1, lines


def test_debug_shows_the_traceback(tmp_path, demo):
    res = run_cli(["--debug", "report", "--profile", "authlib", "--database-url", _url(demo)], tmp_path)
    assert res.returncode == 3
    assert "Traceback" in res.stderr and "SchemaError" in res.stderr
    assert sum(line.startswith("dcr-reaper: error: table 'oauth2_") for line in stderr_lines(res)) == 3


# --- a closed pipe ---------------------------------------------------------------------------------------


@pytest.fixture
def big_db(tmp_path: Path) -> Path:
    """The demo plus 4,000 clients: far more output than a pipe buffer holds."""
    path = build_demo(tmp_path / "big.sqlite")
    now = time.time()
    con = sqlite3.connect(path)
    con.executemany(
        "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, created_at) VALUES (?,?,?,?)",
        [
            (
                f"client-{i:06d}",
                f"Tool {i % 40}",
                json.dumps([f"http://localhost:{1024 + i}/cb"]),
                now - 9 * 86400 - i,
            )
            for i in range(4000)
        ],
    )
    con.commit()
    con.close()
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_broken_pipe_exits_quietly(tmp_path, big_db, fmt):
    rc_file = tmp_path / "rc"
    command = [
        sys.executable,
        "-m",
        "reaper",
        "report",
        *MCP,
        "--database-url",
        _url(big_db),
        "--format",
        fmt,
        "--verdict",
        "orphan,abandoned,live,young,idle,protected",
    ]
    rc_out = shlex.quote(str(rc_file))
    script = f"set +o pipefail; {shlex.join(command)} | head -1; echo ${{PIPESTATUS[0]}} > {rc_out}"
    env = clean_env()
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert res.stderr == "", res.stderr
    assert len(res.stdout.splitlines()) == 1
    # Quiet, and not a crash while flushing at exit (Python's 120) or an uncaught error.
    assert int(rc_file.read_text()) in (0, 1)
