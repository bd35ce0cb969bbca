"""The report in every format: no secret leaves (S8), filters filter, CSV and Markdown are well-formed."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from kit.cli import run_cli
from kit.schemas.mcp_memory import create_mcp_schema, insert_client, insert_tokens, mcp_profile
from reaper.output import CLIENT_FIELDS

pytestmark = pytest.mark.slow  # every test runs the real CLI in a subprocess, several times

DAY = 86400.0
CHURN = "Claude Code (scalarly-memory)"
ALL_VERDICTS = "live,young,orphan,abandoned,idle,protected"
FORMATS = ["table", "json", "csv", "markdown"]
# Distinctive markers stored in every secret-bearing column; none may appear in any output.
SECRET_MARKERS = ("SECRET-abc123", "TOKEN-xyz", "CODE-xyz")


def _populate(db) -> dict[str, str]:
    """8 clients: a churned family of 5 (newest live, 4 orphans), a live editor, an abandoned and a young one.
    Every client has a client_secret and, where used, tokens and codes, all with distinctive values."""
    now = time.time()
    create_mcp_schema(db.engine, db.kind)
    expected = {}
    with db.engine.begin() as conn:

        def client(cid: str, name: str, port: int, at: float, verdict: str, host: str = "localhost") -> None:
            uris = json.dumps([f"http://{host}:{port}/callback"])
            insert_client(conn, cid, name, uris, at, secret=f"SECRET-abc123-{cid}")
            expected[cid] = verdict

        def tokens(cid: str, at: float, live: bool) -> None:
            insert_tokens(
                conn,
                cid,
                at,
                f"TOKEN-xyz-access-{cid}",
                f"TOKEN-xyz-refresh-{cid}",
                f"CODE-xyz-{cid}",
                expires_in=3600 if live else 60,
                revoked=not live,
            )

        for i in range(5):
            at = now - (5 - i) * 6 * 3600  # one registration every 6 hours, the newest 6 hours ago
            client(f"churn-{i}", CHURN, 49152 + 97 * i, at, "live" if i == 4 else "orphan")
            tokens(f"churn-{i}", at + 20, live=i == 4)
        client("vscode", "Visual Studio Code", 33418, now - 10 * DAY, "live", host="127.0.0.1")
        tokens("vscode", now - 3600, live=True)
        client("proxy", "MCP CLI Proxy", 50001, now - 3 * DAY, "abandoned")
        client("cursor", "Cursor", 50002, now - 60, "young", host="127.0.0.1")
    return expected


def _report(db, tmp_path: Path, *args: str, ok: bool = True):
    res = run_cli(["report", "--profile", mcp_profile(db.kind, tmp_path), "--database-url", db.url, *args], tmp_path)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def _csv_rows(text: str) -> list[dict[str, str]]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(CLIENT_FIELDS)
    assert all(len(r) == len(CLIENT_FIELDS) for r in rows)
    return [dict(zip(CLIENT_FIELDS, r, strict=True)) for r in rows[1:]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_secret_or_token_in_any_format(db, tmp_path, fmt):
    expected = _populate(db)
    for extra in ([], ["--verdict", ALL_VERDICTS]):
        res = _report(db, tmp_path, "--format", fmt, *extra)
        everything = res.stdout + res.stderr
        assert "churn-0" in everything  # the report did list clients...
        for marker in SECRET_MARKERS:
            assert marker not in everything, f"{marker} leaked into the {fmt} report"
    out = tmp_path / f"report.{fmt}"
    res = _report(db, tmp_path, "--format", fmt, "--verdict", ALL_VERDICTS, "-o", str(out))
    written = out.read_text(encoding="utf-8")
    assert all(cid in written for cid in expected)
    for marker in SECRET_MARKERS:
        assert marker not in written + res.stdout + res.stderr


def test_the_fixture_classifies_as_intended(db, tmp_path):
    expected = _populate(db)
    data = json.loads(_report(db, tmp_path, "--format", "json").stdout)
    assert {c["client_id"]: c["verdict"] for c in data["clients"]} == expected
    churn = {c["family"] for c in data["clients"] if c["name"] == CHURN}
    assert len(churn) == 1, "loopback ports must not split the family"


@pytest.mark.parametrize("fmt", ["csv", "json", "table", "markdown"])
def test_verdict_filter(db, tmp_path, fmt):
    _populate(db)
    res = _report(db, tmp_path, "--format", fmt, "--verdict", "orphan")
    if fmt == "csv":
        rows = _csv_rows(res.stdout)
        assert sorted(r["client_id"] for r in rows) == [f"churn-{i}" for i in range(4)]
        assert {r["verdict"] for r in rows} == {"orphan"}
    elif fmt == "json":
        data = json.loads(res.stdout)
        assert sorted(c["client_id"] for c in data["clients"]) == [f"churn-{i}" for i in range(4)]
        assert data["summary"]["clients"] == 8  # the filter narrows the list, not the statistics
        assert data["summary"]["by_verdict"]["orphan"] == 4
    else:
        listed = [
            line
            for line in res.stdout.splitlines()
            if line.lstrip("|` ").startswith(("churn-", "vscode", "proxy", "cursor"))
        ]
        # Markdown shows client IDs as code spans: exact, for pasting.
        assert sorted(line.lstrip("|` ").split()[0].strip("`") for line in listed) == [f"churn-{i}" for i in range(4)]
        assert all("orphan" in line for line in listed)
    both = _csv_rows(_report(db, tmp_path, "--format", "csv", "--verdict", "orphan,abandoned").stdout)
    assert sorted(r["client_id"] for r in both) == ["churn-0", "churn-1", "churn-2", "churn-3", "proxy"]
    repeated = _csv_rows(_report(db, tmp_path, "--format", "csv", "--verdict", "young", "--verdict", "live").stdout)
    assert sorted(r["client_id"] for r in repeated) == ["churn-4", "cursor", "vscode"]


def test_family_filter_by_id_prefix_and_name(db, tmp_path):
    _populate(db)
    every = _csv_rows(_report(db, tmp_path, "--format", "csv").stdout)
    family = {r["family"] for r in every if r["name"] == CHURN}.pop()
    members = sorted(f"churn-{i}" for i in range(5))
    for selector in (family, family[:6], "claude code (scalarly-memory)", CHURN):
        rows = _csv_rows(_report(db, tmp_path, "--format", "csv", "--family", selector).stdout)
        assert sorted(r["client_id"] for r in rows) == members, selector
        assert {r["family"] for r in rows} == {family}
    orphans = _csv_rows(_report(db, tmp_path, "--format", "csv", "--family", family, "--verdict", "orphan").stdout)
    assert len(orphans) == 4
    unknown = _report(db, tmp_path, "--format", "csv", "--family", "claude code (scalarly-memroy)", ok=False)
    assert unknown.returncode == 2 and "no family" in unknown.stderr and "scalarly-memory" in unknown.stderr
    data = json.loads(_report(db, tmp_path, "--format", "json", "--family", family).stdout)
    assert sorted(c["client_id"] for c in data["clients"]) == members


def test_csv_has_a_header_and_one_line_per_client(db, tmp_path):
    expected = _populate(db)
    res = _report(db, tmp_path, "--format", "csv")
    lines = res.stdout.splitlines()
    assert lines[0] == ",".join(CLIENT_FIELDS)
    assert len(lines) == 1 + len(expected)
    rows = _csv_rows(res.stdout)
    assert {r["client_id"]: r["verdict"] for r in rows} == expected
    assert {r["name"] for r in rows if r["client_id"] == "vscode"} == {"Visual Studio Code"}


def test_markdown_has_tables(db, tmp_path):
    _populate(db)
    res = _report(db, tmp_path, "--format", "markdown")
    lines = res.stdout.splitlines()
    assert lines[0].startswith("# dcr-reaper report")
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[0] == "## Clients by verdict" and len(headings) >= 3
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and "---" in lines[i + 1]:
            tables += 1
            width = line.count(" | ")
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].endswith("|") and lines[j].replace("\\|", "").count(" | ") == width, lines[j]
                j += 1
            assert j - i >= 3, "a header, its alignment row and at least one row"
    assert tables >= 3
    assert "| verdict | clients | reasons |" in lines
    assert any(line.startswith("| orphan | 4 |") for line in lines)
    family_rows = [line for line in lines if "claude code" in line.lower() and line.startswith("|")]
    assert family_rows, "the churned family is listed in a table"
