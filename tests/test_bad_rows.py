"""Bad rows never crash a scan: they are reported, protected, and rendered safely (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from kit.cli import run_cli
from kit.schemas.mcp_memory import create_mcp_schema, insert_client, insert_tokens, mcp_profile
from reaper.output.text import md_cell

pytestmark = pytest.mark.slow  # every test runs the real CLI in a subprocess

DAY = 86400.0
ACTIONABLE = {"orphan", "abandoned"}
LONG_NAME = "LongName-" + "x" * 9991


def evil_name(kind: str) -> str:
    """Terminal escape, newline, carriage return, RTL override and (where the database stores it) NUL."""
    nul = "\x00" if kind == "sqlite" else ""  # PostgreSQL refuses NUL in text
    return f"E\u202eR\x1b[31mX\nINJ\rC{nul}"


def evil_name_escaped(kind: str) -> str:
    return "E\\u202eR\\x1b[31mX\\x0aINJ\\x0dC" + ("\\x00" if kind == "sqlite" else "")


def _populate(db) -> float:
    now = time.time()
    create_mcp_schema(db.engine, db.kind)
    uris = json.dumps(["http://localhost:5555/callback"])
    with db.engine.begin() as conn:
        # A healthy, live client: the scan must still see it.
        insert_client(conn, "good-live", "Good App", uris, now - 5 * DAY)
        insert_tokens(conn, "good-live", now - 60, "tok-a", "tok-r", "code-1")
        # Malformed JSON in redirect_uris, old and never used: would be "abandoned" if it were readable.
        insert_client(conn, "bad-json", "Broken Meta", '["http://localhost:1/cb", ', now - 10 * DAY)
        # Registered tomorrow (clock or data gone wrong), never used.
        insert_client(conn, "future", "From The Future", uris, now + DAY)
        # A name is optional in RFC 7591: NULL is not a bad row, it just has no name.
        insert_client(conn, "no-name", None, uris, now - 10 * DAY)
        # No registration time at all: its age is unknown, so it must never be reaped.
        insert_client(conn, "no-time", "Timeless", uris, None)
        # Hostile or huge names, each twice so their family appears in the family table too.
        for i in (1, 2):
            insert_client(conn, f"long-{i}", LONG_NAME, uris, now - (10 + i) * DAY)
            insert_client(conn, f"evil-{i}", evil_name(db.kind), uris, now - (10 + i) * DAY)
    return now


def _report(db, tmp_path: Path, *args: str):
    profile = mcp_profile(db.kind, tmp_path)
    return run_cli(["report", "--profile", profile, "--database-url", db.url, *args], tmp_path, timeout=120)


def _json_report(db, tmp_path: Path) -> dict:
    res = _report(db, tmp_path, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return json.loads(res.stdout)


def test_bad_rows_are_reported_protected_and_never_crash(db, tmp_path):
    _populate(db)
    data = _json_report(db, tmp_path)
    clients = {c["client_id"]: c for c in data["clients"]}
    assert set(clients) == {
        "good-live",
        "bad-json",
        "future",
        "no-name",
        "no-time",
        "long-1",
        "long-2",
        "evil-1",
        "evil-2",
    }

    assert (clients["good-live"]["verdict"], clients["good-live"]["problems"]) == ("live", [])

    for cid, column in (("bad-json", "redirect_uris"), ("future", "created_at")):
        c = clients[cid]
        assert (c["verdict"], c["reason"]) == ("protected", "bad_row"), c
        assert len(c["problems"]) == 1 and c["problems"][0].startswith(column), c
    assert "future" in clients["future"]["problems"][0]

    assert clients["no-name"]["name"] is None and clients["no-name"]["problems"] == []
    assert clients["no-name"]["verdict"] == "abandoned"
    assert clients["no-time"]["verdict"] == "protected" and clients["no-time"]["registered_at"] is None
    assert clients["no-time"]["reason"] == "bad_row" and "NULL" in clients["no-time"]["problems"][0]

    summary = data["summary"]
    assert summary["clients"] == 9
    assert summary["problems"] == 3
    assert sorted((p["client_id"], p["problem"].split(":")[0]) for p in data["problems"]) == [
        ("bad-json", "redirect_uris"),
        ("future", "created_at"),
        ("no-time", "created_at"),
    ]
    assert summary["by_verdict"]["protected"] == 3  # bad-json, future, no-time


def test_hostile_and_huge_names_keep_the_table_readable(db, tmp_path):
    _populate(db)
    res = _report(db, tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for raw in ("\x1b", "\r", "\u202e", "\x00"):
        assert raw not in out, f"raw {raw!r} from a client name reached the terminal"
    lines = out.split("\n")
    assert max(len(line) for line in lines) < 400
    # The name's newline did not start a line of its own: "INJ" only appears next to the start of the name.
    injected = [line for line in lines if "INJ" in line]
    assert injected and all("E\\u202eR\\x1b[31mX\\x0aINJ" in line for line in injected)
    # Shown escaped in the client list (both members are abandoned) and in the family table.
    assert out.count(evil_name_escaped(db.kind)) >= 3
    long_lines = [line for line in lines if "LongName-xxx" in line]
    assert len(long_lines) >= 3 and all("…(+" in line for line in long_lines)
    assert "x" * 100 not in out
    assert "Rows with problems (skipped, never reaped): 3" in out


@pytest.mark.parametrize("fmt", ["csv", "markdown"])
def test_hostile_names_in_csv_and_markdown(db, tmp_path, fmt):
    _populate(db)
    res = _report(db, tmp_path, "--format", fmt, "--verdict", "live,young,orphan,abandoned,idle,protected")
    assert res.returncode == 0, res.stderr
    for raw in ("\x1b", "\r", "\u202e", "\x00"):
        assert raw not in res.stdout
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert len(res.stdout.splitlines()) == len(rows) == 1 + 9  # header, then one line per client
        names = {r[0]: r[1] for r in rows[1:]}
        assert names["evil-1"] == evil_name_escaped(db.kind)
        assert len(names["long-1"]) == 1024 and names["long-1"].startswith("LongName-x")  # the scan's bound
    else:  # escaped for the terminal, then for Markdown (its backslashes are escaped in turn)
        assert md_cell(evil_name(db.kind)) in res.stdout
        assert "\\\\x1b\\[31mX" in res.stdout


def test_json_is_valid_and_keeps_the_exact_name(db, tmp_path):
    _populate(db)
    data = _json_report(db, tmp_path)
    names = {c["client_id"]: c["name"] for c in data["clients"]}
    assert names["evil-1"] == evil_name(db.kind)
    # What a field may cost is bounded (docs/classification.md): a name keeps its first 1024 characters.
    assert names["long-1"] == LONG_NAME[:1024] and len(LONG_NAME) == 10_000


def test_bad_rows_are_never_actionable(db, tmp_path):
    # Make every bad row old enough and unused enough that it would be reaped if its data were believed.
    now = _populate(db)
    with db.engine.begin() as conn:
        insert_client(conn, "future-far", "Churny", json.dumps(["http://127.0.0.1:1/cb"]), now + 400 * DAY)
        insert_client(conn, "bad-json-2", "Churny", "{not json", now - 40 * DAY)
        insert_tokens(conn, "bad-json-2", now - 39 * DAY, "old-a", "old-r", "old-c", expires_in=60, revoked=True)
    data = _json_report(db, tmp_path)
    verdicts = {c["client_id"]: c["verdict"] for c in data["clients"]}
    for cid in ("bad-json", "future", "no-time", "future-far", "bad-json-2"):
        assert verdicts[cid] not in ACTIONABLE and verdicts[cid] == "protected", (cid, verdicts[cid])
    assert data["summary"]["problems"] == 5  # "no-time" (a NULL registration time) is a problem too


def test_a_bad_row_does_not_make_its_siblings_orphans(db, tmp_path):
    now = _populate(db)
    uris = json.dumps(["http://localhost:7777/cb"])
    with db.engine.begin() as conn:
        # A real client of "Sibling App", used once and now without live credentials...
        insert_client(conn, "sibling-old", "Sibling App", uris, now - 30 * DAY)
        insert_tokens(conn, "sibling-old", now - 30 * DAY, "s-a", "s-r", "s-c", expires_in=60, revoked=True)
        # ...and a row of the same family whose registration time is in the future.
        insert_client(conn, "sibling-future", "Sibling App", uris, now + 30 * DAY)
    data = _json_report(db, tmp_path)
    verdicts = {c["client_id"]: (c["verdict"], c["reason"]) for c in data["clients"]}
    assert verdicts["sibling-future"] == ("protected", "bad_row")
    # Only the bad row claims to be newer: the old client has no trustworthy newer sibling, so it is idle.
    assert verdicts["sibling-old"] == ("idle", "no_newer_sibling")
