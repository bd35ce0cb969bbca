"""`dcr-reaper report --format html`: one self-contained file (no script, nothing fetched), hostile client
names escaped, the timeline drawn per churning family, filters honoured."""

from __future__ import annotations

import io
import re
import time
from html.parser import HTMLParser

import pytest
from sqlalchemy.orm import Session

from kit.cli import run_cli
from kit.schemas.authlib import create_schema, register, token
from reaper.commands import classified
from reaper.config import load_config
from reaper.output import Filters, render
from reaper.output.html import VERDICT_COLORS

NOW = time.time()
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)> Evil\u202e\x07'


class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _seed(db, name: str = "Churny CLI", members: int = 6) -> list[str]:
    create_schema(db.engine)
    ids = []
    with Session(db.engine) as s:
        t = NOW - 20 * 3600
        for i in range(members):
            c = register(s, name, 50000 + i, t)
            s.flush()
            last = i == members - 1
            tok = token(s, c, t + 30, expires_in=3600 if not last else 10**6, revoked=not last)
            ids.append(c.client_id)
            t = tok.refresh_token_revoked_at + 3
        s.commit()
    return ids


def _html(db, filters: Filters | None = None, **classify: str) -> str:
    config = load_config(
        None,
        {"database_url": db.url, "profile": "authlib", "classify": {"young_for": "10m", **classify}},
        environ={},
    )
    out = io.StringIO()
    with classified(config) as (stream, snap):
        render("html", stream, snap, out, filters or Filters())
    return out.getvalue()


def test_self_contained_and_escaped(db):
    ids = _seed(db, HOSTILE)
    text = _html(db)
    parser = _Tags()
    parser.feed(text)
    tags = {t for t, _ in parser.tags}
    assert not tags & {"script", "img", "link", "iframe", "object", "embed", "base", "form"}
    for tag, attrs in parser.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert "src" not in attrs and "href" not in attrs, (tag, attrs)
    assert "url(" not in text and "@import" not in text
    # No resource address outside the evidence itself: redirect URIs are shown as escaped text in <code>.
    markup = re.sub(r'<code class="uri">[^<]*</code>', "", text)
    assert not re.search(r"(?<!xmlns=\")https?://", markup), "no resource address (the SVG namespace is a name)"
    assert '<code class="uri">http://localhost:' in text, "the redirect URIs are part of the evidence"
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'' in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, "the name is shown, escaped"
    assert "\\u202e" in text and "\\x07" in text, "control and bidi characters are shown as escapes"
    assert all(cid in text for cid in ids)


def test_timeline_per_churning_family(db):
    ids = _seed(db)
    text = _html(db)
    assert text.count('<svg xmlns="http://www.w3.org/2000/svg" class="timeline"') == 1
    svg = text[text.index("<svg") : text.index("</svg>")]
    assert svg.count("<circle") == len(ids), "one mark per registration"
    assert svg.count(f'fill="{VERDICT_COLORS["orphan"]}"') == len(ids) - 1
    assert svg.count(f'fill="{VERDICT_COLORS["live"]}"') == 1
    assert svg.count('<g class="revoked">') == len(ids) - 1, "one revocation mark per loop step"
    assert "Suspected re-auth loops: 1" in text


def test_quiet_database_says_so(db):
    _seed(db, members=1)
    text = _html(db)
    assert "<svg" not in text and "No family churns, loops or floods." in text


def test_family_and_verdict_filters(db):
    ids = _seed(db)
    with Session(db.engine) as s:  # a second churning family
        for i in range(6):
            register(s, "Other", 40000 + i, NOW - 7200 - i)
        s.commit()
    assert "Other" in _html(db)
    text = _html(db, Filters(frozenset({"live"}), "churny cli"))
    assert "Other" not in text, "--family keeps one family"
    listing = text[text.index("</svg>") :]
    assert ids[-1] in listing and not any(cid in listing for cid in ids[:-1]), "--verdict filters the rows"
    assert text.count("<circle") == len(ids), "the chart still shows every registration"


@pytest.mark.slow
@pytest.mark.parametrize("to_file", [True, False])
def test_cli_writes_html(sqlite_db, tmp_path, to_file):
    _seed(sqlite_db)
    args = ["report", "--profile", "authlib", "--database-url", sqlite_db.url, "--format", "html"]
    out = tmp_path / "report.html"
    res = run_cli(args + (["-o", str(out)] if to_file else []), tmp_path)
    assert res.returncode == 0, res.stderr
    text = out.read_text(encoding="utf-8") if to_file else res.stdout
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "Registration timelines" in text
