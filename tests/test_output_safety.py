"""Every field of every output format is safe for its consumer: hostile values registered as a client's id,
name, redirect URIs and software id come out as text, never as a spreadsheet formula, a terminal escape, HTML,
a link or an image.

A DCR client chooses its own name, redirect URIs and software id; on SQLite its client_id too (Authlib's
column is plain text). Each hostile value is put in each of those fields of its own client."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import time
import unicodedata
from pathlib import Path

import orjson
import pytest
from markdown_it import MarkdownIt
from sqlalchemy.orm import Session

from kit.cli import clean_env
from kit.config import make_config
from kit.schemas.authlib import Client
from kit.schemas.authlib import create_schema as create_authlib
from reaper.analysis.model import VERDICTS
from reaper.commands import classified
from reaper.output import Filters, render
from reaper.output.records import client_record, raw_client_record
from reaper.output.text import ISO_OPTIONS

CHROMIUM = Path("/usr/bin/chromium")
MARK = "data-pwned"
HOSTILE = [
    '=HYPERLINK("https://evil.example/x","click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\tTAB=1",
    "\x1b]0;pwned-title\x07",
    "\x1b[31mRED\x1b[0m",
    "line\nbreak\rreturn",
    "nul\x00byte",
    "bidi\u202eoverride",
    "zero\u200bwidth",
    f"<svg onload=\"document.documentElement.setAttribute('{MARK}','svg')\">",
    f"<img src=x onerror=\"document.documentElement.setAttribute('{MARK}','img')\">",
    "<script>document.documentElement.setAttribute('data-pwned','script')</script>",
    "![t](https://tracker.example/pixel.png)",
    "[click](javascript:document.documentElement.setAttribute('data-pwned','link'))",
    "<https://evil.example/autolink>",
    "a | b | c",
    "`code` *em* _em_ \\ backslash",
    "&lt;entity&gt; &amp;",
]
FIELDS = ("client_id", "client_name", "redirect_uris", "software_id")
HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _hostile_db(db) -> dict[str, str]:
    """One client per (field, hostile value), all old and never used (abandoned: listed by default)."""
    create_authlib(db.engine)
    now = time.time()
    labels = {}
    with Session(db.engine) as s:
        for f, field in enumerate(FIELDS):
            for h, value in enumerate(HOSTILE):
                if db.kind != "sqlite" and "\x00" in value:
                    continue  # PostgreSQL text holds no NUL
                label = f"f{f}h{h}"
                meta = {"client_name": f"name {label}", "redirect_uris": [f"http://localhost:1/{label}"]}
                client_id = f"id-{label}"
                if field == "client_id":
                    client_id = f"{value[:36]}-{label}"  # Authlib's client_id is varchar(48)
                elif field == "redirect_uris":
                    meta["redirect_uris"] = [value, f"http://localhost:1/{label}"]
                else:
                    meta[field] = f"{value} {label}"
                c = Client(client_id=client_id, client_id_issued_at=int(now - 3 * 86400 - f * 100 - h))
                c.set_client_metadata(meta)
                s.add(c)
                labels[label] = client_id
        s.commit()
    return labels


def _render(db, fmt: str) -> str:
    out = io.StringIO()
    with classified(make_config(db.url)) as (stream, snap):
        render(fmt, stream, snap, out, Filters(frozenset(str(v) for v in VERDICTS)), max_rows=0)
    return out.getvalue()


def _no_hidden(text: str, allowed: str = "\n") -> list[str]:
    return sorted({repr(ch) for ch in text if unicodedata.category(ch) in HIDDEN and ch not in allowed})


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown", "json", "html"])
def test_every_field_of_every_format_is_safe(db, fmt):
    labels = _hostile_db(db)
    text = _render(db, fmt)
    if fmt == "json":
        # JSON is for programs: the data stays exact, control characters escaped by JSON itself; format characters
        # (a bidi override) are data, and no lone surrogate can reach a UTF-8 writer.
        assert not [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs") and ch != "\n"]
    else:
        assert not _no_hidden(text), f"control or format characters reached the {fmt} output"
    if fmt != "html":  # the evidence report lists families with loops, floods or churn; its own test covers XSS
        for label in labels:  # every hostile client was rendered (its label is plain text)
            assert label in text, label
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert len(rows) == len(labels) + 1
        for row in rows:
            for cell in row:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    elif fmt == "markdown":
        html = MarkdownIt("commonmark").enable("table").render(text)
        for tag in ("<svg", "<img", "<script", "<a ", "<iframe"):
            assert tag not in html, f"{tag} came through the Markdown"
        assert "javascript:" not in html.split("<pre")[0] or "href" not in html
    elif fmt == "json":
        data = json.loads(text)
        names = {c["name"] for c in data["clients"]}
        assert any(n.startswith("=HYPERLINK") for n in names), "JSON keeps the data exact (escaped by JSON itself)"
    elif fmt == "table":
        assert "\x1b" not in text


@pytest.mark.slow
@pytest.mark.chromium
def test_markdown_rendered_by_commonmark_runs_no_script_in_chromium(sqlite_db, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    _hostile_db(sqlite_db)
    body = MarkdownIt("commonmark").enable("table").render(_render(sqlite_db, "markdown"))
    page = tmp_path / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8></head><body>{body}</body></html>", "utf-8")
    control = tmp_path / "control.html"  # the same markup unescaped would run: the check can fail
    control.write_text(f"<!doctype html><html><body>{HOSTILE[11]}{HOSTILE[12]}</body></html>", encoding="utf-8")

    def dom(path: Path) -> str:
        profile = tmp_path / f"profile-{path.stem}"
        cmd = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            path.resolve().as_uri(),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env(HOME=str(profile)))
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    ran = re.compile(rf"<html[^>]*{MARK}=")  # the payloads mark the document element when they run
    assert ran.search(dom(control)), "control: unescaped, the payload runs"
    rendered = dom(page)
    assert not ran.search(rendered) and "<table>" in rendered and "f0h11" in rendered


def test_text_that_is_not_utf8_reaches_the_json_report_escaped(sqlite_db):
    """SQLite keeps bytes that are not UTF-8 as text: the JSON report shows them as escapes (the record orjson
    refuses is written guarded) and stays valid UTF-8, and its neighbours are written the fast way."""
    create_authlib(sqlite_db.engine)
    now = int(time.time()) - 86400 * 30
    with sqlite_db.engine.begin() as conn:
        raw = conn.connection.driver_connection
        for cid, meta in (
            ("bad-bytes", b'{"client_name": "M\xfcller App", "redirect_uris": ["http://127.0.0.1/cb"]}'),
            ("plain", b'{"client_name": "Plain App", "redirect_uris": ["http://127.0.0.1/cb"]}'),
        ):
            raw.execute(
                "INSERT INTO oauth2_client (client_id, client_secret, client_id_issued_at, client_secret_expires_at,"
                " client_metadata) VALUES (?, 's', ?, 0, CAST(? AS TEXT))",
                (cid, now, meta),
            )
    text = _render(sqlite_db, "json")
    text.encode("utf-8")  # no lone surrogate got through
    by_id = {c["client_id"]: c for c in json.loads(text)["clients"]}
    assert by_id["bad-bytes"]["name"] == "M\\xfcller App"
    assert any("not valid UTF-8" in p for p in by_id["bad-bytes"]["problems"])
    assert by_id["plain"]["name"] == "Plain App" and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", by_id["plain"]["registered_at"]
    )


def test_the_record_orjson_writes_is_the_guarded_record(db):
    """`raw_client_record` (the JSON report's fast path) says what `client_record` says, field for field, for
    every hostile client orjson accepts; the others take the guarded path."""
    _hostile_db(db)
    compared = 0
    with classified(make_config(db.url)) as (stream, _snap):
        for item in stream:
            try:
                fast = orjson.dumps(raw_client_record(item), option=ISO_OPTIONS)
            except orjson.JSONEncodeError:
                continue
            assert orjson.loads(fast) == json.loads(json.dumps(client_record(item))), item.row.client_id
            compared += 1
    assert compared >= len(HOSTILE) * len(FIELDS) - 4
