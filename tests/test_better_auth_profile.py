"""The better-auth and better-auth-legacy profiles on Better Auth's schemas (PostgreSQL), in the migrator's
quoted camelCase and in Drizzle's snake_case: one test per trap."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.better_auth import BetterAuth
from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan, restore
from reaper.db import check_schema
from reaper.profiles import bind_profile

HOUR, DAY = 3600, 86400


def scan(url: str, profile: str = "better-auth", **overrides: Any) -> dict[str, Any]:
    with classified(make_config(url, profile=profile, **overrides)) as (stream, _):
        return {i.row.client_id: i for i in stream}


def loop(port: int) -> list[str]:
    return [f"http://localhost:{port}/callback"]


@pytest.mark.parametrize("naming", ["as_is", "snake_case"])
def test_camel_case_and_snake_case_schemas_read_the_same(pg_db, naming):
    b = BetterAuth(pg_db.engine, snake=naming == "snake_case")
    old = b.client("Claude Code (next)", loop(50001), 3 * DAY, software_id="claude-code")
    b.refresh(old, age=3 * DAY, ttl=30 * DAY, rotated_age=2 * DAY)
    new = b.client("Claude Code (next)", loop(61000), 2 * HOUR, software_id="claude-code")
    b.refresh(new, age=60, ttl=30 * DAY)
    options = {"options": {"naming": naming}} if naming != "as_is" else {}
    got = scan(pg_db.url, **options)
    assert (got[old].verdict, got[new].verdict) == (Verdict.ORPHAN, Verdict.LIVE)
    assert got[new].row.software_id == "claude-code" and got[new].row.subject == "alice"
    assert check_schema(pg_db.engine, bind_profile(make_config(pg_db.url, profile="better-auth", **options))) == []
    if naming == "snake_case":  # without the option the camelCase names are looked for, and not found
        problems = check_schema(pg_db.engine, bind_profile(make_config(pg_db.url, profile="better-auth")))
        assert "table 'oauthClient' not found (profile 'better-auth')" in problems


def test_refresh_tokens_carry_liveness(pg_db):
    b = BetterAuth(pg_db.engine)
    cases = {
        "refresh": (lambda c: b.refresh(c, age=60, ttl=30 * DAY), True),
        "rotated": (lambda c: b.refresh(c, age=DAY, ttl=30 * DAY, rotated_age=HOUR), False),
        "revoked": (lambda c: b.refresh(c, age=DAY, ttl=30 * DAY, revoked_age=HOUR), False),
        "expired": (lambda c: b.refresh(c, age=31 * DAY, ttl=30 * DAY), False),
        "opaque-access": (lambda c: b.access(c, age=60, ttl=HOUR), True),
        "expired-access": (lambda c: b.access(c, age=2 * HOUR, ttl=HOUR), False),
        "consent-only": (lambda c: b.consent(c, age=DAY), False),
    }
    made = {}
    for name, (setup, _) in cases.items():
        made[name] = b.client(name, [f"https://{name}.example.com/cb"], 40 * DAY)
        setup(made[name])
    got = scan(pg_db.url)
    assert {n: got[c].verdict is Verdict.LIVE for n, c in made.items()} == {n: v for n, (_, v) in cases.items()}


def test_client_discovery_id_marks_cimd(pg_db):
    b = BetterAuth(pg_db.engine)
    cimd = b.client("CIMD app", ["https://app.example.com/cb"], 30 * DAY, discovery="cimd")
    url_id = b.client(
        "CIMD by URL", ["https://x.example.com/cb"], 30 * DAY, client_id="https://x.example.com/client.json"
    )
    plain = b.client("DCR app", ["https://y.example.com/cb"], 30 * DAY)
    got = scan(pg_db.url)
    assert (got[cimd].verdict, got[cimd].reason) == (Verdict.PROTECTED, "cimd")
    assert (got[url_id].verdict, got[url_id].reason) == (Verdict.PROTECTED, "cimd")
    assert got[plain].verdict is Verdict.ABANDONED


def test_disable_sets_the_disabled_flag_and_restore_clears_it(pg_db):
    b = BetterAuth(pg_db.engine)
    olds = []
    for i in range(2):
        cid = b.client("Claude Code (next)", loop(50100 + i), (4 - i) * DAY)
        b.refresh(cid, age=(4 - i) * DAY, ttl=DAY)
        olds.append(cid)
    new = b.client("Claude Code (next)", loop(50200), 2 * HOUR)
    b.refresh(new, age=60, ttl=30 * DAY)
    config = make_config(pg_db.url, profile="better-auth", policy={"actions": {"orphan": "disable"}})
    result = apply(config, plan(config))
    assert result.total_acted == 2
    got = scan(pg_db.url)
    assert {c: got[c].row.disabled for c in [*olds, new]} == {olds[0]: True, olds[1]: True, new: False}
    restore(config, run_id=result.run_id)
    assert not any(i.row.disabled for i in scan(pg_db.url).values())


def test_delete_cascades_with_children_in_the_tombstone(pg_db):
    b = BetterAuth(pg_db.engine, snake=True)
    old = b.client("Claude Code (next)", loop(50300), 3 * DAY)
    rid = b.refresh(old, age=3 * DAY, ttl=DAY)
    b.access(old, age=3 * DAY, ttl=HOUR, refresh_id=rid)
    b.consent(old, age=3 * DAY)
    new = b.client("Claude Code (next)", loop(50301), HOUR * 2)
    b.refresh(new, age=60, ttl=30 * DAY)
    config = make_config(pg_db.url, profile="better-auth", options={"naming": "snake_case"})
    result = apply(config, plan(config))
    assert result.total_acted == 1
    with pg_db.engine.connect() as conn:
        counts = {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t} WHERE client_id = :c"), {"c": old}).scalar()
            for t in ("oauth_refresh_token", "oauth_access_token", "oauth_consent")
        }
    assert counts == dict.fromkeys(counts, 0)
    restore(config, run_id=result.run_id)
    back = scan(pg_db.url, options={"naming": "snake_case"})[old]
    assert back.verdict is Verdict.ORPHAN and back.row.total_credentials == 3  # refresh, access, consent


def test_legacy_single_row_tokens_and_comma_joined_redirects(pg_db):
    b = BetterAuth(pg_db.engine, legacy=True)
    old = b.application("Claude Code (legacy)", [*loop(50400), "https://app.example.com/cb"], 3 * DAY)
    b.legacy_token(old, age=3 * DAY, access_ttl=HOUR, refresh_ttl=DAY)
    refresh_alive = b.application("Cursor", loop(50500), 3 * DAY)
    b.legacy_token(refresh_alive, age=2 * DAY, access_ttl=HOUR, refresh_ttl=7 * DAY)
    new = b.application("Claude Code (legacy)", [*loop(61000), "https://app.example.com/cb"], 2 * HOUR)
    b.legacy_token(new, age=60, access_ttl=HOUR, refresh_ttl=7 * DAY)
    got = scan(pg_db.url, profile="better-auth-legacy")
    assert got[old].row.redirect_uris == (*loop(50400), "https://app.example.com/cb")
    assert got[old].family == got[new].family
    assert (got[old].verdict, got[refresh_alive].verdict, got[new].verdict) == (
        Verdict.ORPHAN,
        Verdict.LIVE,
        Verdict.LIVE,
    )
    config = make_config(pg_db.url, profile="better-auth-legacy")
    assert check_schema(pg_db.engine, bind_profile(config)) == []
    assert apply(config, plan(config)).total_acted == 1
    assert old not in scan(pg_db.url, profile="better-auth-legacy")


def test_check_lists_a_renamed_column(pg_db):
    BetterAuth(pg_db.engine)
    bound = bind_profile(make_config(pg_db.url, profile="better-auth"))
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text('ALTER TABLE "oauthRefreshToken" RENAME COLUMN "rotatedAt" TO rotated_at'))
    assert check_schema(pg_db.engine, bound) == ["column 'oauthRefreshToken.rotatedAt' not found"]
