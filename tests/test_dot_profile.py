"""The django-oauth-toolkit profile against the REAL package: DOT 3.4's migrations make the schema, its own
DCR, authorize and token endpoints make the rows (kit/schemas/dot.py, a subprocess per database), on SQLite,
PostgreSQL and MariaDB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.dot import build
from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan, restore, statements
from reaper.db import check_schema
from reaper.ledger import decode_payload
from reaper.profiles import bind_profile

pytestmark = pytest.mark.slow  # every test runs the real Django OAuth Toolkit in a subprocess

HOUR, DAY = 3600, 86400
APP = "oauth2_provider_application"
CHILDREN = (
    "oauth2_provider_refreshtoken",
    "oauth2_provider_accesstoken",
    "oauth2_provider_idtoken",
    "oauth2_provider_grant",
)


def loop(port: int) -> str:
    return f"http://localhost:{port}/callback"


def verdicts(url: str, **overrides: Any) -> dict[str, Any]:
    with classified(make_config(url, profile="django-oauth-toolkit", **overrides)) as (stream, _snap):
        return {i.row.client_id: i for i in stream}


CHURN = [
    # Four superseded registrations of one CLI: each logged in, refreshed once, then replayed the old refresh
    # token, so DOT revoked the whole token family. Their registration tokens still "expire" in year 9999.
    *(
        {
            "label": f"old{i}",
            "name": "Claude Code (wiki)",
            "redirect": loop(50001 + i),
            "age": (5 - i) * DAY,
            "flow": "reused",
        }
        for i in range(4)
    ),
    {
        "label": "newest",
        "name": "Claude Code (wiki)",
        "redirect": loop(50100),
        "age": 2 * HOUR,
        "flow": "live",
    },
    {
        "label": "never",
        "name": "MCP CLI Proxy",
        "redirect": "http://localhost:6000/oauth/callback",
        "age": 3 * DAY,
    },
    {
        "label": "manual",
        "source": "manual",
        "name": "Back office",
        "redirect": "https://bo.example.com/cb",
        "age": 300 * DAY,
    },
    {
        "label": "cimd",
        "source": "cimd",
        "client_id": "https://app.example.com/client.json",
        "name": "CIMD app",
        "redirect": "https://app.example.com/cb",
        "age": 30 * DAY,
    },
]


def test_real_dot_registrations_are_classified_and_orphans_reaped(any_db, tmp_path: Path):
    made = build(any_db.url, CHURN)
    cid = {label: v["client_id"] for label, v in made.items()}
    assert check_schema(any_db.engine, bind_profile(make_config(any_db.url, profile="django-oauth-toolkit"))) == []

    got = verdicts(any_db.url)
    assert {label: (got[c].verdict, got[c].reason) for label, c in cid.items()} == {
        **{f"old{i}": (Verdict.ORPHAN, "superseded") for i in range(4)},
        "newest": (Verdict.LIVE, "live_token"),
        "never": (Verdict.ABANDONED, "never_used"),
        "manual": (Verdict.PROTECTED, "static"),
        "cimd": (Verdict.PROTECTED, "cimd"),
    }
    assert got[cid["newest"]].row.redirect_uris == (loop(50100),)
    assert len({got[cid[f"old{i}"]].family for i in range(4)} | {got[cid["newest"]].family}) == 1

    config = make_config(any_db.url, profile="django-oauth-toolkit")
    the_plan = plan(config)
    reaped = {c.client_id for c in the_plan.candidates}
    assert reaped == {cid[f"old{i}"] for i in range(4)} | {cid["never"]}
    result = apply(config, the_plan)
    assert result.total_acted == 5 and not result.skipped

    ids = {made[label]["id"] for label in made if cid[label] in reaped}
    with any_db.engine.connect() as conn:
        left = {r[0] for r in conn.execute(sa.text(f"SELECT client_id FROM {APP}"))}
        dangling = {
            t: conn.execute(
                sa.text(f"SELECT count(*) FROM {t} WHERE application_id IN ({','.join(map(str, ids))})")
            ).scalar()
            for t in CHILDREN
        }
        tombs = conn.execute(sa.text("SELECT client_id, payload FROM dcr_reaper_tombstones")).all()
    assert left == set(cid.values()) - reaped
    assert dangling == dict.fromkeys(CHILDREN, 0), "children deleted with their application (deferred FKs)"
    payloads = {c: decode_payload(p) for c, p in tombs}
    assert set(payloads) == reaped
    # The registration token and the revoked refresh family went into each orphan's tombstone.
    old0 = payloads[cid["old0"]]["children"]
    assert [r["scope"] for r in old0["oauth2_provider_accesstoken"]] == ["oauth2_provider:registration"]
    assert len(old0["oauth2_provider_refreshtoken"]) == 2

    # And the whole run comes back, children included, against the same foreign keys.
    back = restore(config, run_id=result.run_id)
    assert sorted(back.restored) == sorted(str(i) for i in ids)
    with any_db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(sa.text(f"SELECT client_id FROM {APP}"))} == set(cid.values())
    assert verdicts(any_db.url)[cid["old0"]].verdict is Verdict.ORPHAN


TRAPS = [
    {"label": "registered_only", "name": "Zed", "redirect": loop(51000), "age": 3 * DAY},
    {
        "label": "refresh_only",
        "name": "Cursor",
        "redirect": loop(52000),
        "age": 3 * DAY,
        "flow": "refresh_only",
        "age_tokens": True,
    },
    {
        "label": "pending_code",
        "name": "Goose",
        "redirect": loop(53000),
        "age": 3 * DAY,
        "flow": "pending_code",
    },
    {"label": "device", "name": "TV app", "redirect": loop(54000), "age": 3 * DAY, "flow": "device_pending"},
]


def test_the_registration_token_never_makes_a_client_look_live(any_db):
    made = build(any_db.url, TRAPS[:1])
    cid = made["registered_only"]["client_id"]
    with any_db.engine.connect() as conn:
        ((expires, scope),) = conn.execute(
            sa.text("SELECT expires, scope FROM oauth2_provider_accesstoken WHERE application_id = :a"),
            {"a": made["registered_only"]["id"]},
        ).all()
    assert str(expires).startswith("9999-12-31") and scope == "oauth2_provider:registration"
    item = verdicts(any_db.url)[cid]
    assert (item.verdict, item.reason) == (Verdict.ABANDONED, "never_used")
    assert item.row.live == {} and item.row.total_credentials == 0


def test_dot_traps_refresh_lifetime_codes_and_device_grants(pg_db, tmp_path: Path):
    made = build(pg_db.url, TRAPS)
    cid = {label: v["client_id"] for label, v in made.items()}

    got = verdicts(pg_db.url)
    # REFRESH_TOKEN_EXPIRE_SECONDS defaults to never: an unused refresh token keeps its client live ...
    assert (got[cid["refresh_only"]].verdict, got[cid["refresh_only"]].reason) == (Verdict.LIVE, "live_token")
    # ... a code awaiting exchange, and a device authorization waiting for its user (by client_id), too.
    assert (got[cid["pending_code"]].verdict, got[cid["pending_code"]].reason) == (Verdict.LIVE, "live_code")
    assert (got[cid["device"]].verdict, got[cid["device"]].reason) == (Verdict.LIVE, "live_code")

    # With the server's refresh lifetime set, a 3-day-old refresh token is dead.
    got = verdicts(pg_db.url, options={"refresh_lifetime": "1d"})
    assert got[cid["refresh_only"]].verdict is Verdict.IDLE
    assert got[cid["refresh_only"]].row.total_credentials == 2  # the dead refresh and access tokens


def test_check_lists_a_renamed_column_of_the_real_schema(pg_db):
    build(pg_db.url, [])
    bound = bind_profile(make_config(pg_db.url, profile="django-oauth-toolkit"))
    assert check_schema(pg_db.engine, bound) == []
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE oauth2_provider_accesstoken RENAME COLUMN scope TO scopes"))
        conn.execute(sa.text(f"ALTER TABLE {APP} RENAME COLUMN registration_source TO source"))
    assert check_schema(pg_db.engine, bound) == [
        "column 'oauth2_provider_accesstoken.scope' not found",
        f"column '{APP}.registration_source' not found",
    ]


CHAIN = [
    # Refreshed once and then abandoned: access token 2 references refresh token 1 (source_refresh_token) and
    # refresh token 2 references access token 2, so the rows point at each other across the tables.
    {
        "label": "chain",
        "name": "Claude Code (api)",
        "redirect": loop(55000),
        "age": 5 * DAY,
        "flow": "refreshed",
        "age_tokens": True,
    },
    {
        "label": "newest",
        "name": "Claude Code (api)",
        "redirect": loop(55001),
        "age": 2 * HOUR,
        "flow": "live",
    },
]


def _dot_rows(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the application and its child tables, pointers included, ordered by primary key."""
    with engine.connect() as conn:
        return {
            t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY id"))]
            for t in (APP, *CHILDREN, DEVICE)
        }


def test_a_refresh_chain_is_reaped_and_restored_on_every_database(any_db):
    """Access and refresh tokens of a refreshed client point at each other. PostgreSQL and SQLite check DOT's
    keys at commit, MariaDB at once: the reaper sets the pointers NULL first, as DOT's own delete does, so the
    chain goes on every database with DOT's real migrations; the tombstone keeps the pointers, and restore puts
    every row back as it was. The client's expired device grant (by client_id) goes and comes back with it."""
    made = build(any_db.url, [*CHAIN, DEVICE_EXPIRED])
    before = _dot_rows(any_db.engine)
    config = make_config(any_db.url, profile="django-oauth-toolkit", options={"refresh_lifetime": "1d"})
    the_plan = plan(config)
    chain, expired = made["chain"]["client_id"], made["device_old"]["client_id"]
    assert {c.client_id for c in the_plan.candidates} == {chain, expired}
    with any_db.engine.connect() as conn:
        pointers = conn.execute(
            sa.text(
                "SELECT count(*) FROM oauth2_provider_accesstoken a JOIN oauth2_provider_refreshtoken r "
                "ON a.source_refresh_token_id = r.id WHERE r.application_id = :a"
            ),
            {"a": made["chain"]["id"]},
        ).scalar()
    assert pointers == 1, "the fixture really has a refresh token pointed at by an access token"
    (review,) = statements(config, the_plan)  # `reap --sql` shows the pointers set NULL before the deletes
    text = "\n".join(review)
    detach = text.index("UPDATE oauth2_provider_accesstoken SET source_refresh_token_id")
    assert detach < text.index("DELETE FROM oauth2_provider_refreshtoken")
    assert "DELETE FROM oauth2_provider_devicegrant" in text
    result = apply(config, the_plan)
    assert result.total_acted == 2 and not result.skipped
    with any_db.engine.connect() as conn:
        for t in CHILDREN:
            ids = f"{made['chain']['id']}, {made['device_old']['id']}"
            assert conn.execute(sa.text(f"SELECT count(*) FROM {t} WHERE application_id IN ({ids})")).scalar() == 0
        assert (
            conn.execute(sa.text(f"SELECT count(*) FROM {DEVICE} WHERE client_id = :c"), {"c": expired}).scalar() == 0
        )
        live = conn.execute(sa.text(f"SELECT count(*) FROM {DEVICE}")).scalar()
    assert live == 0
    tombs = payloads(any_db.engine)
    assert [r["status"] for r in tombs[expired]["children"][DEVICE]] == ["expired"]
    refreshes = tombs[chain]["children"]["oauth2_provider_refreshtoken"]
    assert any(r["access_token_id"] is not None for r in refreshes), "the tombstone keeps the pointers"

    back = restore(config, run_id=result.run_id)
    assert len(back.restored) == 2
    assert _dot_rows(any_db.engine) == before, "every row back, pointers included"


DEVICE = "oauth2_provider_devicegrant"
DEVICE_EXPIRED = {
    "label": "device_old",
    "name": "Claude Code (api)",  # an older registration of the chain's family, whose device login expired
    "redirect": loop(55002),
    "age": 4 * DAY,
    "flow": "device_expired",
}


def payloads(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """client_id -> its tombstone's payload."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT client_id, payload FROM dcr_reaper_tombstones")).all()
    return {cid: decode_payload(payload) for cid, payload in rows}
