"""The spring-authorization-server profile on Spring's JDBC schema (PostgreSQL): one test per trap."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.spring import Spring
from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan
from reaper.db import check_schema
from reaper.ledger import decode_payload
from reaper.profiles import bind_profile

HOUR, DAY = 3600, 86400
PROFILE = "spring-authorization-server"


def scan(url: str) -> dict[str, Any]:
    with classified(make_config(url, profile=PROFILE)) as (stream, _):
        return {i.row.client_id: i for i in stream}


def loop(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/callback"]


def test_credentials_reference_the_internal_id_not_the_client_id(pg_db):
    s = Spring(pg_db.engine)
    key = s.client("public-id-1", "Claude Code (spring)", loop(50001), 3 * DAY)
    s.authorization(key, age=60, access_ttl=300)
    # A row whose registered_client_id happens to equal the public client_id must not count.
    other = s.client("public-id-2", "Cursor", loop(50002), 3 * DAY)
    s.authorization("public-id-2", age=60, access_ttl=300)
    got = scan(pg_db.url)
    assert (got["public-id-1"].row.key, got["public-id-1"].verdict) == (key, Verdict.LIVE)
    assert got["public-id-2"].row.key == other and got["public-id-2"].verdict is Verdict.ABANDONED
    assert got["public-id-1"].row.redirect_uris == tuple(loop(50001))


def test_invalidated_metadata_means_not_live(pg_db):
    s = Spring(pg_db.engine)
    cases = {
        # name: (authorization kwargs, live)
        "access": (dict(access_ttl=300), True),
        "access-invalidated": (dict(access_ttl=300, invalidated=("access_token",)), False),
        "refresh": (dict(access_ttl=-60, refresh_ttl=DAY), True),
        "refresh-invalidated": (dict(access_ttl=-60, refresh_ttl=DAY, invalidated=("refresh_token",)), False),
        "all-invalidated": (
            dict(access_ttl=300, refresh_ttl=DAY, invalidated=("access_token", "refresh_token")),
            False,
        ),
        "code": (dict(access_ttl=None, code_ttl=300), True),
        "code-used": (dict(access_ttl=None, code_ttl=300, invalidated=("authorization_code",)), False),
        "expired": (dict(access_ttl=-60, refresh_ttl=-30), False),
    }
    for name, (kwargs, _) in cases.items():
        s.authorization(s.client(name, name, [f"https://{name}.example.com/cb"], 10 * DAY), age=60, **kwargs)
    got = scan(pg_db.url)
    assert {n: got[n].verdict is Verdict.LIVE for n in cases} == {n: live for n, (_, live) in cases.items()}
    assert got["code"].reason == "live_token"  # one authorization row: kind token


def test_the_dcr_registration_token_is_excluded(pg_db):
    s = Spring(pg_db.engine)
    registered = s.client("dcr-1", "MCP CLI Proxy", loop(50100), 3 * DAY)
    # What OIDC DCR stores: principal = the client's own client_id, client_credentials, scope client.read.
    s.authorization(
        registered,
        principal="dcr-1",
        grant="client_credentials",
        scopes="client.read",
        age=60,
        access_ttl=300,
    )
    # A real client_credentials token of a machine client (same principal shape, other scope) does count.
    machine = s.client("svc-1", "Batch job", ["https://svc.example.com/cb"], 3 * DAY)
    s.authorization(machine, principal="svc-1", grant="client_credentials", scopes="api.read", age=60, access_ttl=300)
    # A registration-shaped row whose principal is some other client's id is not the registration token.
    odd = s.client("odd-1", "Odd", ["https://odd.example.com/cb"], 3 * DAY)
    s.authorization(odd, principal="dcr-1", grant="client_credentials", scopes="client.read", age=60, access_ttl=300)
    got = scan(pg_db.url)
    assert (got["dcr-1"].verdict, got["dcr-1"].reason) == (Verdict.ABANDONED, "never_used")
    assert got["dcr-1"].row.total_credentials == 0
    assert got["svc-1"].verdict is Verdict.LIVE and got["odd-1"].verdict is Verdict.LIVE


def test_reap_deletes_authorizations_and_consents_first_and_merge_moves_consents(pg_db):
    s = Spring(pg_db.engine)
    olds = []
    for i in range(3):
        key = s.client(f"old{i}", "Claude Code (spring)", loop(50200 + i), (6 - i) * DAY)
        s.authorization(
            key,
            principal=f"old{i}",
            grant="client_credentials",
            scopes="client.read",
            age=(6 - i) * DAY,
            access_ttl=300,
        )
        s.authorization(key, age=(6 - i) * DAY, access_ttl=300, refresh_ttl=HOUR)
        s.consent(key, "alice" if i == 0 else "bob")
        olds.append(key)
    survivor = s.client("new", "Claude Code (spring)", loop(50300), 2 * HOUR)
    s.authorization(survivor, age=60, access_ttl=300)
    s.consent(survivor, "bob")
    config = make_config(pg_db.url, profile=PROFILE, policy={"actions": {"orphan": "merge"}})
    assert check_schema(pg_db.engine, bind_profile(config)) == []
    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == {"old0", "old1", "old2"}
    assert apply(config, the_plan).total_acted == 3

    t = s.t
    with pg_db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(sa.select(t["oauth2_registered_client"].c.client_id))} == {"new"}
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .select_from(t["oauth2_authorization"])
                .where(t["oauth2_authorization"].c.registered_client_id.in_(olds))
            ).scalar()
            == 0
        )
        consents = set(
            conn.execute(
                sa.select(
                    t["oauth2_authorization_consent"].c.registered_client_id,
                    t["oauth2_authorization_consent"].c.principal_name,
                )
            )
        )
        payload = decode_payload(
            conn.execute(sa.text("SELECT payload FROM dcr_reaper_tombstones WHERE client_id = 'old1'")).scalar_one()
        )
    # alice's consent moved to the survivor; bob already had one there, so his old ones went with their
    # clients.
    assert consents == {(survivor, "alice"), (survivor, "bob")}
    assert {k: len(v) for k, v in payload["children"].items()} == {
        "oauth2_authorization": 2,
        "oauth2_authorization_consent": 1,
    }


def test_check_lists_a_renamed_column(pg_db):
    Spring(pg_db.engine)
    bound = bind_profile(make_config(pg_db.url, profile=PROFILE))
    assert check_schema(pg_db.engine, bound) == []
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE oauth2_authorization RENAME COLUMN principal_name TO principal"))
    assert check_schema(pg_db.engine, bound) == ["column 'oauth2_authorization.principal_name' not found"]
