"""The demo reproduces the original report: one churning family, one live member, the rest orphans."""

import json
import subprocess
import sys

import pytest

from reaper.analysis.model import Verdict
from reaper.commands import classified
from reaper.config import load_config
from reaper.demo import CHURN_NAME, CHURN_REGISTRATIONS, build_demo


def _classify(path):
    config = load_config(None, {"database_url": f"sqlite:///{path}", "profile": "mcp-memory-service"}, environ={})
    with classified(config) as (stream, snapshot):
        items = list(stream)
    return items, snapshot


def test_demo_reproduces_the_churn_report(tmp_path):
    path = build_demo(tmp_path / "demo.sqlite")
    items, snap = _classify(path)
    by_name = {}
    for item in items:
        by_name.setdefault(item.row.name, []).append(item)
    churn = by_name[CHURN_NAME]
    assert len(churn) == CHURN_REGISTRATIONS >= 30
    assert len({i.family for i in churn}) == 1, "loopback ports must not split the family"
    verdicts = [i.verdict for i in churn]
    assert verdicts.count(Verdict.LIVE) == 1
    assert verdicts.count(Verdict.ORPHAN) == CHURN_REGISTRATIONS - 1
    newest = max(churn, key=lambda i: i.row.created_at)
    assert newest.verdict is Verdict.LIVE
    family = snap.families[churn[0].family]
    assert (family.members, family.live, family.orphans) == (CHURN_REGISTRATIONS, 1, CHURN_REGISTRATIONS - 1)
    assert family.survivor == newest.row.client_id
    assert family.recent >= 5 and family.median_interval is not None
    assert [i.verdict for i in by_name["Visual Studio Code"]] == [Verdict.LIVE]
    assert [(i.verdict, i.reason) for i in by_name["MCP CLI Proxy"]] == [(Verdict.ABANDONED, "never_used")]
    assert [i.verdict for i in by_name["Cursor"]] == [Verdict.YOUNG]


@pytest.mark.slow
def test_demo_command_prints_report_and_database_path(tmp_path):
    db = tmp_path / "d.sqlite"
    out = subprocess.run(
        [sys.executable, "-m", "reaper", "demo", "--db", str(db)], capture_output=True, text=True, check=True
    ).stdout
    assert CHURN_NAME in out and "Visual Studio Code" in out
    assert f"Demo database: {db}" in out
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "reaper",
            "report",
            "--profile",
            "mcp-memory-service",
            "--database-url",
            f"sqlite:///{db}",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(report)
    assert data["summary"]["by_verdict"]["orphan"] == CHURN_REGISTRATIONS - 1
    assert data["summary"]["by_verdict"]["live"] == 2
