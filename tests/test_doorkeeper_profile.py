"""The doorkeeper profile on Doorkeeper's schema (PostgreSQL, foreign keys without ON DELETE): one test per
trap."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.doorkeeper import Doorkeeper
from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan
from reaper.db import check_schema
from reaper.profiles import bind_profile

HOUR, DAY = 3600, 86400
PROFILE = "doorkeeper"


def scan(url: str) -> dict[str, Any]:
    with classified(make_config(url, profile=PROFILE)) as (stream, _):
        return {i.row.client_id: i for i in stream}


def test_a_future_revoked_at_is_not_revoked_yet(pg_db):
    d = Doorkeeper(pg_db.engine)
    cases = {
        "scheduled": (dict(revoked_in=+HOUR), True),  # revocation scheduled for later: still works
        "revoked": (dict(revoked_in=-60), False),
        "not-revoked": (dict(revoked_in=None), True),
    }
    apps = {}
    for name, (kwargs, _) in cases.items():
        app_id, uid = d.application(name, [f"https://{name}.example.com/cb"], 10 * DAY, uid=name)
        d.token(app_id, age=60, expires_in=7200, **kwargs)
        apps[name] = uid
    got = scan(pg_db.url)
    assert {n: got[n].verdict is Verdict.LIVE for n in cases} == {n: live for n, (_, live) in cases.items()}


def test_created_at_plus_expires_in_and_null_means_never(pg_db):
    d = Doorkeeper(pg_db.engine)
    cases = {
        "fresh": (dict(age=600, expires_in=7200), True),
        "expired": (dict(age=3 * HOUR, expires_in=7200), False),
        "never-expires": (dict(age=400 * DAY, expires_in=None), True),
        "expired-with-refresh": (dict(age=3 * HOUR, expires_in=7200, refresh=True), True),
        "revoked-refresh": (dict(age=3 * HOUR, expires_in=7200, refresh=True, revoked_in=-HOUR), False),
    }
    for name, (kwargs, _) in cases.items():
        app_id, _ = d.application(name, [f"https://{name}.example.com/cb"], 500 * DAY, uid=name)
        d.token(app_id, **kwargs)
    pending, _ = d.application("pending", ["https://p.example.com/cb"], 10 * DAY, uid="pending")
    d.grant(pending, age=60, expires_in=600)
    stale, _ = d.application("stale-grant", ["https://s.example.com/cb"], 10 * DAY, uid="stale-grant")
    d.grant(stale, age=3600, expires_in=600)
    got = scan(pg_db.url)
    assert {n: got[n].verdict is Verdict.LIVE for n in cases} == {n: live for n, (_, live) in cases.items()}
    assert (got["pending"].verdict, got["pending"].reason) == (Verdict.LIVE, "live_code")
    assert got["stale-grant"].verdict is Verdict.IDLE


def test_reap_deletes_grants_and_tokens_before_the_application(pg_db):
    d = Doorkeeper(pg_db.engine)
    olds = []
    for i in range(3):
        app_id, uid = d.application("Claude Code (rails)", [f"http://localhost:{50100 + i}/callback"], (5 - i) * DAY)
        d.token(app_id, age=(5 - i) * DAY, expires_in=7200, refresh=True, revoked_in=-(4 - i) * DAY)
        d.grant(app_id, age=(5 - i) * DAY)
        olds.append(uid)
    new_id, new_uid = d.application("Claude Code (rails)", ["http://localhost:60000/callback"], 2 * HOUR)
    d.token(new_id, age=60, expires_in=7200, refresh=True)
    config = make_config(pg_db.url, profile=PROFILE)
    assert check_schema(pg_db.engine, bind_profile(config)) == []
    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == set(olds)
    assert apply(config, the_plan).total_acted == 3  # the foreign keys would refuse any other order
    with pg_db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(sa.text("SELECT uid FROM oauth_applications"))} == {new_uid}
        assert conn.execute(sa.text("SELECT count(*) FROM oauth_access_tokens")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM oauth_access_grants")).scalar() == 0


def test_check_lists_a_renamed_column(pg_db):
    Doorkeeper(pg_db.engine)
    bound = bind_profile(make_config(pg_db.url, profile=PROFILE))
    assert check_schema(pg_db.engine, bound) == []
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE oauth_access_tokens RENAME COLUMN revoked_at TO revoked_on"))
    assert check_schema(pg_db.engine, bound) == ["column 'oauth_access_tokens.revoked_at' not found"]
