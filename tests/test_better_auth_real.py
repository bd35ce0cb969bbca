"""The better-auth and better-auth-legacy profiles on databases written by the real Better Auth server (npm: 1.7
with @better-auth/oauth-provider, 1.6 and 1.3 with the mcp plugin), driven over HTTP the way MCP clients drive
it: the same verdicts whatever the database's time zone (UTC, Pacific/Honolulu, Asia/Tokyo), because every
session the reaper opens runs in UTC and "now" is the database's own clock."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import sqlalchemy as sa

from kit.better_auth.driver import age_client
from kit.config import make_config
from reaper.analysis.model import Verdict
from reaper.commands import check, classified

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is needed to run the real Better Auth"),
]

HOUR, DAY = 3600, 86400
ZONES = ("UTC", "Pacific/Honolulu", "Asia/Tokyo")
NO_REFRESH = "openid profile email"  # no offline_access: the (opaque, stored) access token is the only credential


def _driver() -> Any:
    from kit.better_auth.driver import BetterAuthServer

    return BetterAuthServer


def _write(version: str, url: str) -> tuple[dict[str, str], dict[str, int]]:
    """A churning MCP client (a new registration every session, each logged in and refreshed), a desktop
    editor, a client whose only token expired, a registration never used, and one from a minute ago; with how
    long ago each happened."""
    ids: dict[str, str] = {}
    ages = {"churn0": 40 * DAY, "churn1": 35 * DAY, "churn2": 10 * 60, "editor": 5 * DAY, "expired": 2 * HOUR}
    ages["unused"] = 3 * DAY
    with _driver()(version, url, install=True) as ba:
        alice = ba.sign_up("alice@example.com")
        for i in range(3):
            c = ba.register("Claude Code (memory)")
            if i < 2:
                ba.refresh(c, ba.login(alice, c))  # rotation on 1.7, a new row on 1.6 and 1.3
            else:
                ba.login(alice, c, scope=NO_REFRESH)  # the newest: an access token with 50 minutes left
            ids[f"churn{i}"] = c.client_id
        editor = ba.register("Visual Studio Code", ["http://127.0.0.1:33418/"])
        ba.login(alice, editor)
        ids["editor"] = editor.client_id
        expired = ba.register("MCP Inspector")
        ba.login(alice, expired, scope=NO_REFRESH)
        ids["expired"] = expired.client_id
        ids["unused"] = ba.register("MCP CLI Proxy").client_id
        ids["young"] = ba.register("Cursor").client_id
    return ids, ages


def _verdicts(url: str, profile: str, ids: dict[str, str]) -> dict[str, tuple[Verdict, str]]:
    with classified(make_config(url, profile=profile)) as (stream, _):
        got = {i.row.client_id: (i.verdict, i.reason) for i in stream}
    return {label: got[cid] for label, cid in ids.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("version", "profile"), [("1.7", "better-auth"), ("1.6", "better-auth-legacy"), ("1.3", "better-auth-legacy")]
)
def test_real_better_auth_verdicts_do_not_depend_on_the_database_time_zone(pg_db, version, profile):
    ids, ages = _write(version, pg_db.url)
    for label, age in ages.items():
        age_client(pg_db.engine, ids[label], age)

    description, findings = check(make_config(pg_db.url, profile=profile))
    assert [f.message for f in findings if f.level == "error"] == []
    if version == "1.3":  # the column is spelled redirectURLs before 1.4: read either way
        assert any(f.code == "spelling" and "redirectURLs" in f.message for f in findings)
    assert not [f for f in findings if f.code == "encoding"], "the profiles read Better Auth's timestamptz columns"

    seen = {}
    for zone in ZONES:
        with pg_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            name = pg_db.engine.url.database
            conn.execute(sa.text(f"ALTER DATABASE {name} SET timezone = '{zone}'"))
        pg_db.engine.dispose()
        with pg_db.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW TimeZone")).scalar() == zone
        seen[zone] = _verdicts(pg_db.url, profile, ids)

    assert seen["Pacific/Honolulu"] == seen["UTC"] == seen["Asia/Tokyo"]
    got = {label: v for label, (v, _) in seen["UTC"].items()}
    assert got == {
        "churn0": Verdict.ORPHAN,
        "churn1": Verdict.ORPHAN,
        "churn2": Verdict.LIVE,
        "editor": Verdict.LIVE,
        # 1.7 stores the opaque access token alone: it expired, so the client is idle. On 1.3 and 1.6 one row
        # holds the access and the refresh token, and the refresh token has 7 days: live.
        "expired": Verdict.IDLE if version == "1.7" else Verdict.LIVE,
        "unused": Verdict.ABANDONED,
        "young": Verdict.YOUNG,
    }
