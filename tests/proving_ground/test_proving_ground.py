"""End to end on a real Authlib server: churning clients, the report's evidence, a reap, and the clients
after it.

Every test runs on SQLite and on PostgreSQL (the `db` fixture).
"""

from __future__ import annotations

import io
import json

import pytest

from reaper.analysis.model import Verdict
from reaper.commands import apply, classified, plan
from reaper.output import Filters, render

from .clients import CHURNER_NAME, FLOOD_NAME, GOOD_NAME, Scenario
from .conftest import GAP, reaper_config

pytestmark = pytest.mark.slow  # each test first replays a day and a half of sessions against the real server


def _classify(url: str) -> tuple[dict[str, tuple[str, str]], object]:
    """client_id -> (verdict, family), and the snapshot."""
    with classified(reaper_config(url)) as (stream, snap):
        verdicts = {c.row.client_id: (str(c.verdict), c.family) for c in stream}
    return verdicts, snap


def _family_of(snap, name: str):
    fams = [f for f in snap.families.values() if f.name == name]
    assert len(fams) == 1, f"{name}: {len(fams)} families"
    return fams[0]


def test_the_run_reproduces_the_reported_loop(ground: Scenario):
    churner = ground.churner
    # Session N registers, N+1 refreshes once (dropping the rotated token), N+2 replays it, registers again.
    assert ground.outcomes == ["registered", "refreshed"] * 9
    assert churner.errors == ["invalid_grant"] * 8, "every replay of a rotated refresh token is refused"
    assert len(churner.registered) == len(set(churner.registered)) == 9
    assert ground.good.registrations == 1 and ground.good.refreshes == 17
    assert len(ground.flood_ids) == 30


def test_report_names_the_loop_the_flood_and_the_healthy_client(db, ground: Scenario):
    verdicts, snap = _classify(db.url)
    churner, good = ground.churner, ground.good
    loop_fam = _family_of(snap, CHURNER_NAME)
    good_fam = _family_of(snap, GOOD_NAME)
    flood_fam = _family_of(snap, FLOOD_NAME)

    # (a) churns: its older members are orphans, the newest is live; and it is a suspected re-auth loop.
    assert loop_fam in snap.churning()
    assert {cid for cid in churner.registered[:-1]} == {c for c, (v, _) in verdicts.items() if v == "orphan"}
    assert verdicts[churner.registered[-1]][0] == "live"
    assert snap.loop_detection == "on"
    assert set(snap.loops) == {loop_fam.id}, "only the churner loops"
    loop = snap.loops[loop_fam.id]
    assert loop.cycles == 8
    assert [s.client_id for s in loop.steps] == churner.registered[-2::-1], "evidence, newest first"
    for step, nxt in zip(loop.steps, churner.registered[:0:-1], strict=True):
        assert step.next_client_id == nxt, "each orphan's successor is the next registration"
        assert step.revoked_at <= step.next_registered_at <= step.revoked_at + snap.loop_window
        assert step.registered_at is not None and step.last_token_at is not None
        assert step.registered_at < step.last_token_at < step.revoked_at
        assert step.verdict == "orphan"

    # (b) is live, alone in its family, and not a loop (its rotated tokens have a live successor).
    assert verdicts[good.client_id] == ("live", good_fam.id)
    assert good_fam.members == 1 and good_fam.id not in snap.loops

    # (c) is a flood: 30 never-used registrations within seconds, from one family; not a loop.
    assert len(snap.floods) == 1
    flood = snap.floods[0]
    assert (flood.scope, flood.key, flood.registrations) == ("family", flood_fam.id, 30)
    assert flood.seconds < 60
    assert {m.client_id for m in flood.members} <= set(ground.flood_ids)
    assert flood_fam.id not in snap.loops
    assert not [f for f in snap.floods if f.key in (loop_fam.id, good_fam.id)]


def test_every_format_carries_the_loop_section(db, ground: Scenario):
    outputs = {}
    for fmt in ("table", "markdown", "json", "html"):
        out = io.StringIO()
        with classified(reaper_config(db.url)) as (stream, snap):
            render(fmt, stream, snap, out, Filters())
        outputs[fmt] = out.getvalue()
    orphans = ground.churner.registered[:-1]
    for fmt in ("table", "markdown", "html"):
        text = outputs[fmt]
        assert "Suspected re-auth loops: 1" in text, fmt
        assert "Registration floods: 1" in text, fmt
        assert CHURNER_NAME in text, fmt
        assert [cid for cid in orphans if cid not in text] == [], fmt
    assert "## Suspected re-auth loops: 1" in outputs["markdown"]
    data = json.loads(outputs["json"])
    assert data["summary"]["suspected_loops"] == 1 and data["summary"]["floods"] == 1
    [loop] = data["loops"]
    assert loop["name"] == CHURNER_NAME and loop["cycles"] == 8
    assert [e["client_id"] for e in loop["evidence"]] == orphans[::-1]
    assert {"client_id", "registered_at", "last_token_at", "refresh_revoked_at"} <= set(loop["evidence"][0])
    [flood] = data["floods"]
    assert flood["name"] == FLOOD_NAME and flood["registrations"] == 30
    # No secret or token left the database in any format (they are never selected).
    tokens = set(ground.churner.held.values())
    for fmt, text in outputs.items():
        assert not any(t in text for t in tokens), fmt


def test_reap_then_the_clients_carry_on(db, ground: Scenario):
    churner, good = ground.churner, ground.good
    config = reaper_config(db.url)
    the_plan = plan(config)
    by_id = {c.client_id: c for c in the_plan.candidates}
    orphans = set(churner.registered[:-1])
    assert orphans <= set(by_id), "every orphan of the loop is planned"
    assert {by_id[c].verdict for c in orphans} == {"orphan"}
    assert churner.registered[-1] not in by_id and good.client_id not in by_id
    assert len(set(ground.flood_ids) & set(by_id)) == 29, "the flood's abandoned clients, less its survivor"
    assert the_plan.cap_problem is None

    result = apply(config, the_plan)
    assert result.total_acted == len(the_plan.candidates) == 37
    assert not result.restored_late

    # (b) still refreshes, with the client_id it always had.
    ground.clock.advance(GAP)
    assert good.session() == "refreshed"
    assert good.registrations == 1

    # The token endpoint answers every reaped client_id with invalid_client: a 401 JSON error, at once.
    for cid in orphans:
        r = good.http.refresh(cid, churner.held[cid])
        assert r.status_code == 401, (r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.json()["error"] == "invalid_client"
        assert r.elapsed.total_seconds() < 5
    # ... and so does the authorization endpoint (no redirect to a client it cannot vouch for).
    any_orphan = sorted(orphans)[0]
    r = good.http.authorize(
        any_orphan, "http://localhost:50000/callback", code_challenge="x" * 43, code_challenge_method="S256"
    )
    assert r.status_code in (400, 401) and r.json()["error"] == "invalid_client"

    # (a)'s next session: its rotated token is gone, so it registers again, and the new client works.
    before = list(churner.registered)
    assert churner.session() == "registered"
    assert churner.errors[-1] == "invalid_grant"
    new_id = churner.registered[-1]
    assert new_id not in before
    ground.clock.advance(GAP)
    assert churner.session() == "refreshed", "the new registration's refresh token works"

    # After the reap: the survivors and the new client only; the loop's evidence went with its orphans.
    verdicts, snap = _classify(db.url)
    flood_left = set(verdicts) & set(ground.flood_ids)
    assert len(flood_left) == 1, "the flood family's survivor stays (S3)"
    assert set(verdicts) == {churner.registered[-2], new_id, good.client_id, *flood_left}
    assert verdicts[new_id][0] in ("live", "young")
    assert verdicts[good.client_id][0] == "live"
    assert not snap.loops
    assert {v for v, _ in verdicts.values()} <= {
        str(Verdict.LIVE),
        str(Verdict.YOUNG),
        str(Verdict.ABANDONED),
        str(Verdict.ORPHAN),
    }
