"""Re-auth loop and flood detection (reaper.loops) on hand-made Authlib rows, on SQLite and PostgreSQL: the
window, the cycle threshold, live successors, the lookback, flood thresholds, IP prefixes, renamed tables,
switches."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kit.schemas.authlib import Client, create_schema, register, token
from reaper.commands import classified, report
from reaper.config import load_config
from reaper.errors import ConfigError, SchemaError
from reaper.output import Filters, render
from reaper.profiles import builtin_profiles

LOOP_NAME = "Loopy CLI"
NOW = time.time()
HOUR = 3600.0


def _config(db, profile: str = "authlib", **sections: Any):
    data: dict[str, Any] = {
        "database_url": db.url,
        "profile": profile,
        "classify": {"young_for": "10m", "abandoned_after": "1h"},
    }
    data.update(sections)
    return load_config(None, data, environ={})


def _loop(
    db,
    n: int,
    delta: float,
    start: float = NOW - 20 * HOUR,
    live_successor: bool = False,
    name: str = LOOP_NAME,
) -> list[str]:
    """n registrations of one client: each gets a token revoked 60 s after issue; the next registration
    follows the revocation after `delta` seconds. The last member holds a live token."""
    ids = []
    with Session(db.engine) as s:
        t = start
        for i in range(n):
            c = register(s, name, 50000 + i, t)
            s.flush()
            last = i == n - 1
            tok = token(s, c, t + 30, expires_in=int(HOUR), revoked=not last)
            if live_successor and not last:
                token(s, c, t + 90, expires_in=int(HOUR), revoked=False)  # a rotated token it did save
            ids.append(c.client_id)
            t = tok.refresh_token_revoked_at + delta if not last else t
        s.commit()
    return ids


def _floods(
    db,
    count: int,
    spacing: float,
    at: float = NOW - 5 * HOUR,
    ips: list[str] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    ids = []
    with Session(db.engine) as s:
        for i in range(count):
            c = register(s, names[i] if names else "Flood Bot", 1024 + i, at + i * spacing)
            if ips:
                c.set_client_metadata({**c.client_metadata, "registrant_ip": ips[i]})
            s.flush()
            ids.append(c.client_id)
        s.commit()
    return ids


@pytest.fixture
def schema(db):
    create_schema(db.engine)
    return db


def test_a_re_registration_inside_the_window_makes_a_loop(schema):
    ids = _loop(schema, 4, delta=40)
    snap = report(_config(schema))
    assert snap.loop_detection == "on"
    [loop] = snap.loops.values()
    assert loop.name == LOOP_NAME and loop.cycles == 3
    assert [s.client_id for s in loop.steps] == ids[-2::-1]
    assert all(s.gap == 40 for s in loop.steps) and loop.median_gap == 40


def test_a_re_registration_after_the_window_is_no_loop(schema):
    _loop(schema, 4, delta=16 * 60)  # 16 minutes after the revocation: an ordinary new login, not the loop
    snap = report(_config(schema))
    assert not snap.loops
    assert report(_config(schema, loops={"window": "20m"})).loops, "a wider window catches it"


def test_one_cycle_is_not_yet_a_loop(schema):
    _loop(schema, 2, delta=5)
    assert not report(_config(schema)).loops
    [loop] = report(_config(schema, loops={"min_cycles": 1})).loops.values()
    assert loop.cycles == 1


def test_a_saved_rotated_token_is_not_a_step(schema):
    _loop(schema, 4, delta=5, live_successor=True)  # every member kept a live rotated token: no loop
    assert not report(_config(schema)).loops


def test_only_the_lookback_is_examined(schema):
    _loop(schema, 4, delta=5, start=NOW - 10 * 86400)
    assert not report(_config(schema)).loops, "a loop ten days ago is history (default lookback 7d)"
    assert report(_config(schema, loops={"lookback": "14d"})).loops


def test_renamed_tables(schema):
    _loop(schema, 3, delta=5)
    with schema.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE oauth2_token RENAME TO app_token"))
        conn.execute(sa.text("ALTER TABLE oauth2_client RENAME TO app_client"))
    snap = report(_config(schema, tables={"oauth2_token": "app_token", "oauth2_client": "app_client"}))
    [loop] = snap.loops.values()
    assert loop.cycles == 2


@pytest.mark.parametrize(("count", "spacing", "flood"), [(19, 0.5, False), (20, 0.5, True), (20, 6, False)])
def test_flood_threshold(schema, count, spacing, flood):
    ids = _floods(schema, count, spacing)
    snap = report(_config(schema))
    if not flood:
        assert not snap.floods
        return
    [f] = snap.floods
    assert f.scope == "family" and f.registrations == 20 and f.seconds <= 10
    assert {m.client_id for m in f.members} == set(ids)
    assert not snap.loops


def test_used_registrations_are_no_flood(schema):
    ids = _floods(schema, 25, 0.5)
    with Session(schema.engine) as s:
        for cid in ids[:10]:  # 10 of them got a token: 15 never-used ones remain, below the threshold
            token(
                s,
                s.execute(sa.select(Client).where(Client.client_id == cid)).scalar_one(),
                NOW - 4 * HOUR,
                3600,
            )
        s.commit()
    assert not report(_config(schema)).floods


def _ip_profile(tmp_path: Path, name: str = "authlib") -> str:
    """The authlib profile plus the registrant IP this application records in client_metadata."""
    text = builtin_profiles()["authlib"].read_text(encoding="utf-8")
    marker = 'software_version = { column = "client_metadata", json = "software_version" }\n'
    assert marker in text
    text = text.replace(marker, marker + 'ip = { column = "client_metadata", json = "registrant_ip" }\n')
    if name != "authlib":  # an in-house server: no loop map
        text = text[: text.index("[loops]")]
    text = text.replace('name = "authlib"', f'name = "{name}"')
    path = tmp_path / f"{name}-ip.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_flood_from_one_ip_prefix_across_families(schema, tmp_path):
    ips = [f"203.0.113.{10 + i}" for i in range(25)]
    _floods(schema, 25, 0.4, ips=ips, names=[f"Scanner {i}" for i in range(25)])  # a new name every time
    config = _config(schema, profile=_ip_profile(tmp_path))
    snap = report(config)
    assert [(f.scope, f.key, f.registrations) for f in snap.floods] == [("ip", "203.0.113.0/24", 25)]
    outputs = []
    for fmt in ("json", "table", "html"):
        out = io.StringIO()
        with classified(config) as (stream, snap2):
            render(fmt, stream, snap2, out, Filters())
        outputs.append(out.getvalue())
    assert json.loads(outputs[0])["floods"][0]["ip_prefix"] == "203.0.113.0/24"
    for text in outputs:
        assert "203.0.113.0/24" in text
        assert not any(ip in text for ip in ips), "an address never appears, only its prefix"


def test_switches_and_profiles_without_a_loop_map(schema, tmp_path):
    _loop(schema, 4, delta=5)
    _floods(schema, 25, 0.5)
    off = report(_config(schema, loops={"enabled": False}))
    assert off.loop_detection.startswith("disabled") and not off.loops and not off.floods
    custom = report(_config(schema, profile=_ip_profile(tmp_path, "inhouse")))
    assert custom.loop_detection == "floods only: profile 'inhouse' has no loop map"
    assert not custom.loops and len(custom.floods) == 1


def test_loops_config_is_validated(schema):
    with pytest.raises(ConfigError) as err:
        _config(schema, loops={"window": "soon", "min_cycles": 0, "flood_registrations": 1, "bogus": 1})
    text = str(err.value.problems)
    for key in ("loops.window", "loops.min_cycles", "loops.flood_registrations", "loops.bogus"):
        assert key in text


def _profile_with_loops(tmp_path: Path, loops: str) -> str:
    """The authlib profile with its [loops] section replaced."""
    text = builtin_profiles()["authlib"].read_text(encoding="utf-8")
    head = text[: text.index("[loops]")]
    path = tmp_path / "authlib-loops.toml"
    path.write_text(head + loops, encoding="utf-8")
    return str(path)


def test_a_loop_map_naming_a_missing_column_is_a_schema_error(schema, tmp_path):
    profile = _profile_with_loops(
        tmp_path,
        '[loops]\ncredential = "token"\nrevoked = { gt = { column = "refresh_token_revoked_at", value = 0 } }\n'
        'revoked_at = { column = "refresh_revoked_when", encoding = "epoch" }\n',
    )
    with pytest.raises(SchemaError) as err:
        report(_config(schema, profile=profile))
    assert err.value.problems == ["column 'oauth2_token.refresh_revoked_when' not found"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            '[loops]\ncredential = "nope"\nrevoked = { is_true = "x" }\nrevoked_at = { column = "x" }\n',
            "loops.credential 'nope' is not one of its credentials",
        ),
        ('[loops]\ncredential = "token"\nrevoked = { is_true = "x" }\n', "loops.revoked_at"),
        (
            '[loops]\ncredential = "token"\nrevoked = { is_true = "x" }\nrevoked_at = { column = "x" }\nextra = 1\n',
            "loops.extra",
        ),
    ],
)
def test_a_malformed_loop_map_is_a_config_error(schema, tmp_path, raw, message):
    with pytest.raises(ConfigError) as err:
        report(_config(schema, profile=_profile_with_loops(tmp_path, raw)))
    assert message in str(err.value)


# --- evidence that outlives the reap ---------------------------------------------------------------------


def _loops_gauge(metrics: Any) -> float | None:
    from prometheus_client import generate_latest

    from kit.prometheus import value

    return value(generate_latest(metrics.registry).decode(), "dcr_suspected_reauth_loops")


def test_a_loop_still_counts_after_the_service_reaped_its_evidence(schema):
    """The service reaps a loop's orphans: the run keeps the loop as evidence, and `dcr_suspected_reauth_loops`
    keeps counting the family for loops.lookback, also in a service started after the reap."""
    from kit.config import OPEN_POLICY
    from kit.databases import client_ids
    from reaper.commands import past_report, runs
    from reaper.service import Service

    ids = _loop(schema, 4, delta=40)
    config = _config(schema, policy={**OPEN_POLICY, "min_age": 0}, service={"reap": True, "port": 0})
    service = Service(config)
    try:
        service.tick()
        assert client_ids(schema.engine) == {ids[-1]}, "the loop's three orphans reaped by the service"
        assert _loops_gauge(service.metrics) == 1
        service.tick()  # a scan of what is left: the loop's evidence is gone from the database
        assert len(service.metrics._snapshot.loops) == 0  # type: ignore[union-attr]
        assert _loops_gauge(service.metrics) == 1, "the family still loops, as far as loops.lookback knows"
    finally:
        service.stop()
    (run,) = runs(config)
    info, snap, _ = past_report(config, run.id)
    assert info.acted == 3 and [lp.name for lp in snap.loops.values()] == [LOOP_NAME], "evidence kept with the run"

    restarted = Service(config)
    try:
        restarted.tick()
        assert _loops_gauge(restarted.metrics) == 1, "a new process reads the loop from the ledger's evidence"
    finally:
        restarted.stop()


def test_remembered_loops_age_out_after_the_lookback():
    from reaper.service.metrics import ReaperMetrics

    m = ReaperMetrics(loop_lookback=HOUR)
    m.remember_loops([("old", NOW - 2 * HOUR), ("new", NOW - 60)], NOW)
    assert set(m._loops) == {"new"}
    m.remember_loops([], NOW + HOUR)
    assert m._loops == {}
