"""Incremental `serve` ticks: after any workload, the Snapshot a tick builds from its state equals the one a fresh
full scan gives at the same moment (SQLite and PostgreSQL, Authlib's real schema)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kit.config import make_config
from kit.databases import TestDB
from kit.schemas.authlib import client_row, code_row, create_schema, token_row
from reaper import commands
from reaper.analysis.incremental import ClientState
from reaper.analysis.model import Snapshot
from reaper.backends.sql import SqlBackend
from reaper.config import Config
from reaper.profiles import bind_profile
from reaper.service.app import Service

T0 = 1_750_000_000
# Short thresholds, so a workload's clock crosses them: grace periods end, registrations leave the churn window
# and the loop lookback, never-used clients become abandoned, forever-live ones stale; a registration time in the
# future (-1000 s back) is a problem row until the clock passes it.
CLASSIFY = {"young_for": 300, "abandoned_after": 1800, "churn_window": 3600, "stale_after": 5000}
LOOPS = {"lookback": 7200, "window": 900, "min_cycles": 2, "flood_registrations": 3, "flood_window": 120}


def _config(url: str, **extra: Any) -> Config:
    return make_config(url, classify=CLASSIFY, loops=LOOPS, **extra)


@dataclass
class World:
    """An Authlib database written the way the server writes it, with a judged clock."""

    engine: sa.Engine
    clock: int = T0
    n: int = 0
    clients: list[str] = field(default_factory=list)

    def tables(self) -> tuple[sa.Table, sa.Table, sa.Table]:
        md = sa.MetaData()
        md.reflect(self.engine, only=["oauth2_client", "oauth2_token", "oauth2_code"])
        return md.tables["oauth2_client"], md.tables["oauth2_token"], md.tables["oauth2_code"]

    def apply(self, op: tuple[Any, ...]) -> None:
        client, token, code = self.tables()
        kind = op[0]
        with self.engine.begin() as conn:
            self.n += 1
            if kind == "register":
                _, family, back = op
                cid = f"c{self.n:05d}"
                port = 3000 + family
                row = client_row(cid, f"App {family}", [f"http://localhost:{port}/cb"], self.clock - back)
                conn.execute(client.insert(), [row])
                self.clients.append(cid)
                return
            if not self.clients:
                return
            cid = self.clients[op[1] % len(self.clients)]
            if kind == "token":
                _, _, expires_in, refresh = op
                conn.execute(token.insert(), [token_row(cid, self.n, self.clock, expires_in, refresh=refresh)])
            elif kind == "rotate":  # revoke the newest live refresh token, issue its successor
                live = sa.select(sa.func.max(token.c.id)).where(
                    token.c.client_id == cid, token.c.refresh_token.is_not(None), token.c.refresh_token_revoked_at == 0
                )
                conn.execute(
                    token.update()
                    .where(token.c.id == live.scalar_subquery())
                    .values(refresh_token_revoked_at=self.clock, access_token_revoked_at=self.clock)
                )
                conn.execute(token.insert(), [token_row(cid, self.n, self.clock, 3600, refresh=True)])
            elif kind == "revoke":  # RFC 7009 on every token of the client
                conn.execute(
                    token.update()
                    .where(token.c.client_id == cid, token.c.access_token_revoked_at == 0)
                    .values(access_token_revoked_at=self.clock)
                )
            elif kind == "code":
                conn.execute(code.insert(), [code_row(cid, self.n, self.clock)])
            elif kind == "use_code":  # the code is exchanged: deleted, a token issued
                conn.execute(code.delete().where(code.c.client_id == cid))
                conn.execute(token.insert(), [token_row(cid, self.n, self.clock, 3600, refresh=True)])
            elif kind == "delete":
                conn.execute(token.delete().where(token.c.client_id == cid))
                conn.execute(code.delete().where(code.c.client_id == cid))
                conn.execute(client.delete().where(client.c.client_id == cid))
                self.clients.remove(cid)


def _full(config: Config, now: float, new_since: float | None, seen: dict[str, int]) -> Snapshot:
    with commands.classified(config, now=now, new_since=new_since, seen_at_watermark=seen) as (stream, snap):
        for _ in stream:
            pass
    return snap


def _facts(snap: Snapshot) -> dict[str, Any]:
    """What the metrics read, and each family's verdict counts."""
    return {
        "clients": snap.clients,
        "by_verdict": {str(k): v for k, v in snap.by_verdict.items() if v},
        "by_reason": {f"{k[0]}/{k[1]}": v for k, v in snap.by_reason.items() if v},
        "families": {
            f.id: (f.name, f.members, f.live, f.orphans, f.abandoned, f.recent, f.new, f.survivor)
            for f in snap.families.values()
        },
        "new_registrations": snap.new_registrations,
        "newest": (snap.newest_registration, dict(snap.newest_by_family)),
        "problems": snap.problem_count,
        "live_forever_only": snap.live_forever_only,
        "loops": {fid: (lp.cycles, lp.last_revoked_at) for fid, lp in snap.loops.items()},
        "floods": sorted((f.scope, f.key, f.registrations) for f in snap.floods),
        "loop_detection": snap.loop_detection,
    }


class Ticker:
    """Drives commands.tick as the service does (watermark and all); counts the incremental ticks."""

    def __init__(self, config: Config):
        self.config = config
        self.state: ClientState | None = None
        self.watermark: float | None = None
        self.seen: dict[str, int] = {}
        self.incremental = 0

    def tick(self, now: float) -> tuple[Snapshot, Snapshot]:
        new_since, seen = self.watermark, dict(self.seen)
        before = self.state
        snap, self.state = commands.tick(self.config, before, now=now, new_since=new_since, seen_at_watermark=seen)
        self.incremental += before is not None and self.state is before
        full = _full(self.config, now, new_since, seen)
        if snap.newest_registration and snap.newest_registration >= (self.watermark or 0.0):
            self.watermark, self.seen = snap.newest_registration, dict(snap.newest_by_family)
        elif self.watermark is None:
            self.watermark = now
        return snap, full


OPS = st.one_of(
    # A registration is stamped when it is inserted (up to the watermark's overlap earlier, as a transaction that
    # was open across a tick would stamp it); clients age as the clock advances. A backdated insert in the same
    # interval as a deletion is the one change the counts cannot see (docs/deployment.md: the full scan's job).
    st.tuples(st.just("register"), st.integers(0, 3), st.sampled_from([0, 0, 30, 299, -1000])),
    st.tuples(st.just("token"), st.integers(0, 50), st.sampled_from([0, 60, 3600]), st.booleans()),
    st.tuples(st.just("rotate"), st.integers(0, 50)),
    st.tuples(st.just("revoke"), st.integers(0, 50)),
    st.tuples(st.just("code"), st.integers(0, 50)),
    st.tuples(st.just("use_code"), st.integers(0, 50)),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.sampled_from([1, 30, 299, 301, 1000, 1801, 3601, 5001])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("tick")),
)


def _reset(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in ("oauth2_code", "oauth2_token", "oauth2_client"):
            conn.execute(sa.text(f"DELETE FROM {table}"))


@pytest.mark.slow
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=5, max_size=40))
@example(ops=[("tick",), ("register", 1, -1000), ("rotate", 0), ("register", 0, 0), ("register", 1, -1000)])
def test_incremental_state_equals_full_scan(db: TestDB, ops: list[tuple[Any, ...]]) -> None:
    create_schema(db.engine)
    _reset(db.engine)
    world = World(db.engine)
    ticker = Ticker(_config(db.url))
    ticker.tick(world.clock)
    for op in [*ops, ("tick",)]:
        if op[0] == "advance":
            world.clock += op[1]
        elif op[0] == "tick":
            world.clock += 1
            snap, full = ticker.tick(world.clock)
            assert _facts(snap) == _facts(full), ops
        else:
            world.apply(op)


def test_ticks_read_only_what_changed(any_db: TestDB) -> None:
    db = any_db
    """An unchanged database: the tick is incremental and re-reads nobody; a new token re-reads one client;
    a deletion is noticed and answered with a full scan."""
    create_schema(db.engine)
    world = World(db.engine)
    for i in range(6):
        world.apply(("register", i % 2, 4000))
    world.apply(("token", 0, 3600, True))
    ticker = Ticker(_config(db.url))
    ticker.tick(world.clock)
    state = ticker.state
    assert state is not None and state.size() == 6

    world.clock += 60
    snap, full = ticker.tick(world.clock)
    assert ticker.state is state and ticker.incremental == 1
    assert _facts(snap) == _facts(full)

    world.apply(("token", 3, 3600, False))
    world.clock += 60
    snap, full = ticker.tick(world.clock)
    assert ticker.incremental == 2 and _facts(snap) == _facts(full)
    assert snap.by_verdict["live"] == 2

    world.apply(("delete", 1))
    world.clock += 60
    snap, full = ticker.tick(world.clock)
    assert ticker.incremental == 2  # the count did not add up: a full scan, and a new state
    assert ticker.state is not state and _facts(snap) == _facts(full)
    # The untrusted state kept nothing while the full scan built the new one: the caller may still hold it.
    assert state.size() == 0 and not state.families


def test_which_builtin_profiles_tick_incrementally(tmp_path: Any) -> None:
    """Only profiles whose columns show every change qualify (docs/deployment.md lists them and why)."""
    from reaper.backends.sql.delta import delta_unsupported
    from reaper.profiles import bind_profile
    from reaper.profiles.loader import builtin_profiles

    sql = [n for n in builtin_profiles() if n != "fastmcp-oauth-proxy"]
    url = f"sqlite:///{tmp_path}/x.sqlite"
    qualified = {n for n in sql if delta_unsupported(bind_profile(make_config(url, profile=n))) is None}
    assert qualified == {"authlib"}


def test_service_full_scan_every(sqlite_db: TestDB) -> None:
    """service.full_scan_every = 1 keeps today's behaviour: every tick scans fully; 3: one full in three."""
    create_schema(sqlite_db.engine)
    world = World(sqlite_db.engine)
    world.apply(("register", 0, 4000))
    for every, expected in ((1, [False, False, False, False]), (3, [False, True, True, False])):
        service = Service(_config(sqlite_db.url, service={"full_scan_every": every, "port": 0}))
        modes = []
        for _ in range(4):
            before = service._state
            service._scan()
            modes.append(before is not None and service._state is before)
            assert (service._state is None) == (every == 1)  # a state no tick would read is never built
        service.backend.close()
        assert modes == expected, every


def test_a_dropped_state_is_freed_at_once(sqlite_db: TestDB) -> None:
    """No reference cycle holds a state: `serve` replacing it with a new one frees the old by reference counting,
    not at some later full garbage collection (a scan raises the collector's threshold, so that may be far off)."""
    import gc
    import weakref

    create_schema(sqlite_db.engine)
    world = World(sqlite_db.engine)
    for i in range(4):
        world.apply(("register", i % 2, 4000))
    gc.disable()
    try:
        _, state = commands.tick(_config(sqlite_db.url), None, now=world.clock)
        assert state is not None
        gone = weakref.ref(state)
        del state
        assert gone() is None, "the state outlived its last reference"
    finally:
        gc.enable()


def test_the_watched_source_copies_and_reads_through(sqlite_db: TestDB) -> None:
    """The wrapper the state puts around a scan source hands every attribute through, and a copy of it (made before
    its fields exist) does not recurse."""
    import copy

    from reaper.analysis.incremental import _Watched

    class Source:
        has_ips = False
        profile_name = "authlib"

    state = ClientState(_config(sqlite_db.url))
    watched = state.watch(Source())  # type: ignore[arg-type]
    assert watched.profile_name == "authlib" and isinstance(watched, _Watched)
    assert copy.copy(watched).profile_name == "authlib"


def test_a_state_build_leaves_the_collector_nothing_pending(sqlite_db: TestDB) -> None:
    """The scan collects rarely; the state it built is long-lived. The build ends with a full pass, so the first
    ticks after it do not pay for walking the new state (0.13 to 0.2 s at 100k clients)."""
    import gc

    create_schema(sqlite_db.engine)
    world = World(sqlite_db.engine)
    for i in range(40):
        world.apply(("register", i % 3, 4000))
    _, state = commands.tick(_config(sqlite_db.url), None, now=world.clock)
    assert state is not None and state.size() == 40
    young, middle, _ = gc.get_count()
    assert middle == 0 and young < 700, "no collection pending after the build"


def test_a_tick_matches_a_revocation_to_its_client_as_the_full_scan_does(any_db: TestDB) -> None:
    """The full scan joins each client's revocations to it in SQL; a tick re-reading the client must match them
    the same way. MariaDB's default collation matches 'dupy' to the client 'DupY' (case, trailing spaces): both
    see the revocation there, neither on SQLite or PostgreSQL."""
    create_schema(any_db.engine)
    client, token, _ = World(any_db.engine).tables()
    with any_db.engine.begin() as conn:
        conn.execute(client.insert(), [client_row("DupY", "App", ["http://localhost:3000/cb"], T0 - 3600)])
        revoked = T0 - 2000
        conn.execute(
            token.insert(),
            [token_row("dupy", 1, T0 - 3000, 60, refresh=True, access_revoked=revoked, refresh_revoked=revoked)],
        )
    config = _config(any_db.url)
    backend = SqlBackend(config, bind_profile(config))
    try:
        backend.check()
        with backend.scan(float(T0)) as source:
            since = source.now - config.loops.lookback
            index = source.revoked(since)
            assert index is not None and index.on_rows
            scanned = {row.key: index.at(row) for row in source.rows()}
            ticked = backend.delta(source).revoked(["DupY"], since)
    finally:
        backend.close()
    expected = float(revoked) if any_db.kind == "mariadb" else None
    assert scanned == {"DupY": expected}
    assert ticked.get("DupY") == expected


def test_a_member_whose_change_stays_its_own_is_judged_without_its_family(any_db: TestDB) -> None:
    """A re-read member whose family, rank, liveness and revocation are unchanged (its access token expired, its
    refresh token keeps it live) is judged alone; one whose liveness changed has its family judged whole. Both
    ticks equal a full scan."""
    create_schema(any_db.engine)
    world = World(any_db.engine)
    for i in range(5):
        world.apply(("register", 0, 4000 - 100 * i))  # one family, the last registered the newest
    for i in range(4):
        world.apply(("token", i, 60, False))  # the older members' tokens: expired, and before the overlap
    world.clock += 400
    world.apply(("token", 4, 60, True))  # the newest: an access token for a minute, a refresh token
    ticker = Ticker(_config(any_db.url))
    built, _ = ticker.tick(world.clock)
    state = ticker.state
    assert state is not None and built.live_forever_only == 0

    world.clock += 120  # the newest's access token expires: it is live through its refresh token alone
    snap, full = ticker.tick(world.clock)
    assert ticker.state is state and _facts(snap) == _facts(full)
    assert (state.judged_alone, state.rejudged) == (1, 0)
    assert snap.by_verdict["live"] == 1 and snap.by_verdict["orphan"] == 4 and snap.live_forever_only == 1

    world.apply(("revoke", 4))  # no live credential left: its verdict changes, and so may its siblings'
    world.clock += 60
    snap, full = ticker.tick(world.clock)
    assert ticker.state is state and _facts(snap) == _facts(full)
    assert (state.judged_alone, state.rejudged) == (0, 5)


def test_a_lone_member_whose_verdict_changes_has_its_family_judged_whole(any_db: TestDB) -> None:
    """A superseded member long past `stale_after`, live through an access token and a refresh token: once the
    access token expires it is live only through the refresh token, and stale, so an orphan. Its siblings are
    unaffected, but its own verdict changed: the family is judged whole, and the tick equals a full scan."""
    create_schema(any_db.engine)
    world = World(any_db.engine)
    world.apply(("register", 0, 9000))
    world.apply(("register", 0, 8900))  # the newest of the family
    world.apply(("token", 0, 7000, True))  # the older member: its access token outlives stale_after (5000 s)
    world.clock += 5500
    ticker = Ticker(_config(any_db.url))
    built, _ = ticker.tick(world.clock)
    state = ticker.state
    assert state is not None and built.by_reason[("live", "live_token")] == 1

    world.clock += 1600  # the access token expired: live only through the refresh token, and stale
    snap, full = ticker.tick(world.clock)
    assert ticker.state is state and _facts(snap) == _facts(full)
    assert snap.by_reason[("orphan", "stale")] == 1
    assert (state.judged_alone, state.rejudged) == (1, 2)


def test_the_scan_log_line_says_what_a_tick_read_again(sqlite_db: TestDB, caplog: pytest.LogCaptureFixture) -> None:
    """A full scan's `scan` line has no tick counts; an incremental tick's says what it re-read, judged alone
    and judged again."""
    create_schema(sqlite_db.engine)
    world = World(sqlite_db.engine, clock=int(time.time()))  # the service judges by the database's clock
    for i in range(3):
        world.apply(("register", 0, 4000 - 100 * i))
    world.apply(("token", 2, 3600, True))
    service = Service(_config(sqlite_db.url, service={"full_scan_every": 3, "port": 0}))
    try:
        with caplog.at_level(logging.INFO, logger="reaper.service"):
            service._scan()
            world.apply(("token", 2, 3600, True))  # the newest member's new token: it alone is re-read
            service._scan()
    finally:
        service.backend.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"')]
    full, tick = (line for line in lines if line["event"] == "scan")
    assert (full["incremental"], full["reread"], full["judged_alone"], full["rejudged"]) == (False, None, None, None)
    assert tick["incremental"] is True and tick["reread"] == 1 and tick["judged_alone"] + tick["rejudged"] >= 1


def test_a_state_the_memory_budget_cannot_hold_is_not_kept(
    sqlite_db: TestDB, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over service.state_max_rss_mb the build is given up: every tick scans fully (and still gives a full scan's
    Snapshot), one warning says why; with room, the same ticks keep their state. Without the setting, the bound is
    80 % of the control group's memory limit."""
    create_schema(sqlite_db.engine)
    world = World(sqlite_db.engine)
    for i in range(5):
        world.apply(("register", i % 2, 4000))
    world.apply(("token", 1, 3600, True))
    tight = Ticker(_config(sqlite_db.url, service={"state_max_rss_mb": 1}))  # below any Python process
    with caplog.at_level(logging.WARNING, logger="reaper.commands"):
        for step in range(3):
            snap, full = tight.tick(world.clock + 60 * step)
            assert tight.state is None and _facts(snap) == _facts(full)
    warnings = [r.getMessage() for r in caplog.records if "not keeping the state" in r.getMessage()]
    assert len(warnings) == 1 and "with 5 clients" in warnings[0]
    roomy = Ticker(_config(sqlite_db.url, service={"state_max_rss_mb": 1_000_000}))
    roomy.tick(world.clock)
    roomy.tick(world.clock + 60)
    assert roomy.state is not None and roomy.incremental == 1

    monkeypatch.setattr(commands, "cgroup_limit_bytes", lambda: 1000 * 2**20)
    assert commands.state_budget(_config(sqlite_db.url)) == 800 * 2**20
    assert commands.state_budget(_config(sqlite_db.url, service={"state_max_rss_mb": 64})) == 64 * 2**20
    monkeypatch.setattr(commands, "cgroup_limit_bytes", lambda: None)
    assert commands.state_budget(_config(sqlite_db.url)) is None
