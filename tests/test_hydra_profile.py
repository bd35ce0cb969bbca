"""The ory-hydra profile on Hydra v2's documented schema, on PostgreSQL and MariaDB: one test per trap."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kit.config import make_config
from kit.schemas.hydra import Hydra
from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan, restore
from reaper.db import check_schema
from reaper.ledger import decode_payload
from reaper.profiles import bind_profile

HOUR, DAY = 3600, 86400
PROFILE = "ory-hydra"


def scan(url: str, nid: str | None, **overrides: Any) -> dict[str, Any]:
    options = {"options": {"nid": nid}} if nid else {}
    with classified(make_config(url, profile=PROFILE, **options, **overrides)) as (stream, _):
        return {i.row.client_id: i for i in stream}


def loop(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/callback"]


def test_every_query_filters_on_the_network(server_db):
    h = Hydra(server_db.engine)
    ours, theirs = h.network(), h.network()
    # The same client id in two networks: a live token in the other network must not keep ours alive.
    shared = h.client(ours, "Claude Code (docs)", loop(50001), 3 * DAY, client_id="shared-client")
    h.client(theirs, "Claude Code (docs)", loop(50001), 3 * DAY, client_id="shared-client")
    h.token("hydra_oauth2_access", theirs, "shared-client", 60, HOUR)
    h.token("hydra_oauth2_access", ours, shared, 2 * DAY, HOUR)  # ours: expired long ago
    other_only = h.client(theirs, "Other tenant app", loop(50002), DAY)

    got = scan(server_db.url, ours)
    assert set(got) == {"shared-client"} and other_only not in got
    assert (got[shared].verdict, got[shared].reason) == (Verdict.IDLE, "no_newer_sibling")
    assert got[shared].row.total_credentials == 1

    theirs_view = scan(server_db.url, theirs)
    assert set(theirs_view) == {"shared-client", other_only}
    assert theirs_view["shared-client"].verdict is Verdict.LIVE


def test_live_means_active_and_not_expired(server_db):
    h = Hydra(server_db.engine)
    nid = h.network()
    cases = {
        # name: (table, age, expires_in, active, live)
        "fresh-access": ("hydra_oauth2_access", 60, HOUR, True, True),
        "expired-access": ("hydra_oauth2_access", 2 * HOUR, HOUR, True, False),
        "rotated-refresh": ("hydra_oauth2_refresh", 60, 30 * DAY, False, False),  # strict rotation: inactive
        "never-expiring-refresh": ("hydra_oauth2_refresh", 90 * DAY, None, True, True),  # expires_at NULL
        "pending-code": ("hydra_oauth2_code", 30, 600, True, True),
        "used-code": ("hydra_oauth2_code", 30, 600, False, False),
    }
    made = {}
    for name, (table, age, expires_in, active, _) in cases.items():
        cid = h.client(nid, f"app {name}", [f"https://{name}.example.com/cb"], 10 * DAY)
        h.token(table, nid, cid, age, expires_in, active)
        made[name] = cid
    got = scan(server_db.url, nid)
    assert {n: got[c].verdict is Verdict.LIVE for n, c in made.items()} == {n: c[4] for n, c in cases.items()}
    assert got[made["pending-code"]].reason == "live_code"


def test_a_remembered_consent_alone_never_keeps_a_client(server_db):
    h = Hydra(server_db.engine)
    nid = h.network()
    old = h.client(nid, "Claude Code (docs)", loop(50010), 5 * DAY)
    h.flow(nid, old, 5 * DAY, remember=True)
    h.token("hydra_oauth2_refresh", nid, old, 5 * DAY, HOUR)
    new = h.client(nid, "Claude Code (docs)", loop(50011), 2 * HOUR)
    h.token("hydra_oauth2_access", nid, new, 60, HOUR)
    got = scan(server_db.url, nid)
    assert (got[old].verdict, got[old].reason) == (Verdict.ORPHAN, "superseded")
    assert got[old].row.total_credentials == 2 and got[old].row.live == {}
    assert got[new].verdict is Verdict.LIVE


def test_delete_cascades_and_the_tombstone_holds_the_children(server_db):
    h = Hydra(server_db.engine)
    nid = h.network()
    orphans = []
    for i in range(3):
        cid = h.client(nid, "Claude Code (docs)", loop(50100 + i), (6 - i) * DAY)
        h.token("hydra_oauth2_access", nid, cid, (6 - i) * DAY, HOUR)
        h.token("hydra_oauth2_refresh", nid, cid, (6 - i) * DAY, DAY, active=False)
        h.flow(nid, cid, (6 - i) * DAY)
        orphans.append(cid)
    survivor = h.client(nid, "Claude Code (docs)", loop(50200), HOUR)
    h.token("hydra_oauth2_refresh", nid, survivor, 60, 30 * DAY)
    config = make_config(server_db.url, profile=PROFILE, options={"nid": nid})
    assert check_schema(server_db.engine, bind_profile(config)) == []

    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == set(orphans)
    result = apply(config, the_plan)
    assert result.total_acted == 3

    t = h.t
    with server_db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(sa.select(t["hydra_client"].c.id))} == {survivor}
        for name in ("hydra_oauth2_access", "hydra_oauth2_refresh", "hydra_oauth2_flow"):
            left = conn.execute(
                sa.select(sa.func.count()).select_from(t[name]).where(t[name].c.client_id.in_(orphans))
            ).scalar()
            assert left == 0, f"{name}: the database cascades the client's children"
        payload = decode_payload(
            conn.execute(
                sa.text("SELECT payload FROM dcr_reaper_tombstones WHERE client_id = :c"), {"c": orphans[0]}
            ).scalar_one()
        )
    assert {k: len(v) for k, v in payload["children"].items()} == {
        "hydra_oauth2_access": 1,
        "hydra_oauth2_refresh": 1,
        "hydra_oauth2_flow": 1,
    }

    restore(config, run_id=result.run_id)
    assert {c: i.verdict for c, i in scan(server_db.url, nid).items()} == {
        **dict.fromkeys(orphans, Verdict.ORPHAN),
        survivor: Verdict.LIVE,
    }


def test_check_passes_and_lists_a_renamed_column(server_db):
    h = Hydra(server_db.engine)
    bound = bind_profile(make_config(server_db.url, profile=PROFILE))
    assert check_schema(server_db.engine, bound) == []
    with server_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE hydra_oauth2_refresh RENAME COLUMN active TO is_active"))
    assert check_schema(server_db.engine, bound) == ["column 'hydra_oauth2_refresh.active' not found"]
    assert h.t  # the schema was built by the helper
