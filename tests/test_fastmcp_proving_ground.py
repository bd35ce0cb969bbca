"""End to end on the real FastMCP OAuthProxy (fastmcp 4.1.6), its Authlib upstream and MCP clients that log in
through FastMCP's own client OAuth helper, on Redis and on FastMCP's default encrypted file tree.

The proxy runs on a simulated clock (as the SQL proving ground does): five rounds two hours apart, ending an
hour before the real now, so the store holds what FastMCP writes with its real lifetimes (15-minute
transactions, 5-minute codes, and the upstream's refresh lifetime, 2.5 hours here) and the reaper looks at it
with the real clock. Each round a churning client registers again and a well-behaved one refreshes; a flood of
registrations that never finish a login comes in between. Then: the report, a reap, the clients after it, and a
restore.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from kit.redis import (
    Proxy,
    free_port,
    kit_module,
    proxy_constants,
    redis_db,
    redis_hostport,  # noqa: F401 - a fixture
    redis_state,
    start_proxy,
    tree_state,
)
from reaper.backends import open_backend
from reaper.commands import apply, classified, plan, restore
from reaper.config import Config, load_config
from reaper.output import Filters, render

pytestmark = pytest.mark.slow

HOUR = 3600.0
GAP = 2 * HOUR  # between rounds
END = 1 * HOUR  # the last round is this long before the real now
REFRESH_TTL = int(2.5 * HOUR)  # the upstream's refresh_expires_in, which the proxy adopts
ROUNDS = 5
FLOOD = 12
CHURNER = "Claude Code (fastmcp proving-ground)"
GOOD = "Zed (fastmcp proving-ground)"
FLOODER = "Free MCP Scanner"
REDIS_DB = 13


def offset_of_round(i: int) -> float:
    return -((ROUNDS - 1 - i) * GAP + END)


@dataclass
class Ground:
    backend: str
    proxy: Proxy
    upstream: Any
    database_url: str
    workdir: Path
    churn_ids: list[str] = field(default_factory=list)
    churn_stores: list[Any] = field(default_factory=list)
    good_id: str = ""
    good_dir: Path = Path()
    flood_ids: list[str] = field(default_factory=list)
    store_root: Path | None = None

    def config(self, **extra: Any) -> Config:
        data: dict[str, Any] = {
            "database_url": self.database_url,
            "profile": "fastmcp-oauth-proxy",
            "classify": {"young_for": "30m", "abandoned_after": "1h", "churn_window": "1d"},
            "policy": {"min_age": "1h", "max_per_run": 10_000, "max_fraction": 1.0, "pause": 0, "late_token_sweep": 0},
            "loops": {"flood_registrations": 10},
            "ledger": {"url": f"sqlite:///{self.workdir / 'ledger.sqlite'}"},
            "fastmcp": {"jwt_signing_key": proxy_constants().JWT_SIGNING_KEY},
        }
        data.update(extra)
        return load_config(None, data, environ={})

    def state(self) -> dict[Any, Any]:
        if self.backend == "redis":
            return redis_state(self.database_url)
        assert self.store_root is not None
        return tree_state(self.store_root)


async def _scenario(g: Ground) -> None:
    clients = kit_module("clients")
    memory = __import__("key_value.aio.stores.memory", fromlist=["MemoryStore"])
    url = g.proxy.mcp_url
    for i in range(ROUNDS):
        g.proxy.at(offset_of_round(i))
        store = memory.MemoryStore()
        r = await clients.churning_session(url, i, name=CHURNER, token_storage=store)
        assert r.ok and r.client_id, r
        g.churn_ids.append(r.client_id)
        g.churn_stores.append(store)
        if i:
            await clients.expire_stored_access_token(g.good_dir, url)  # two hours on: its access token expired
        w = await clients.wellbehaved_session(url, g.good_dir, name=GOOD)
        assert w.ok and w.logins == (1 if i == 0 else 0), w
        g.good_id = g.good_id or w.client_id
        assert w.client_id == g.good_id
        if i == ROUNDS - 2:
            g.proxy.at(offset_of_round(i) + GAP / 2)
            flood = await clients.flood(url, FLOOD, name=FLOODER)
            g.flood_ids = [f.client_id for f in flood if f.client_id]
            assert len(set(g.flood_ids)) == FLOOD and not any(f.ok for f in flood)


@pytest.fixture(scope="module", params=["redis", "filetree"])
def ground(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ground]:
    backend = request.param
    # The flood fails by design: keep the helper's login chatter out of the test output.
    for name in ("fastmcp", "mcp.client.auth", "mcp.client.auth.oauth2", "fastmcp.client.auth.oauth"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    workdir = tmp_path_factory.mktemp(f"fastmcp-{backend}")
    port = free_port()
    upstream = kit_module("upstream").RunningUpstream(
        redirect_uris=[f"http://127.0.0.1:{port}/auth/callback"], refresh_ttl=REFRESH_TTL
    )
    home = workdir / "fastmcp-home"
    if backend == "redis":
        database_url = redis_db(request.getfixturevalue("redis_hostport"), REDIS_DB)
        proxy = start_proxy(upstream.url, port, workdir, redis_url=database_url, home=None)
    else:
        database_url = str(home)
        proxy = start_proxy(upstream.url, port, workdir, redis_url=None, home=home)
    g = Ground(backend, proxy, upstream, database_url, workdir, good_dir=workdir / "wellbehaved-client")
    try:
        started = time.monotonic()
        asyncio.run(_scenario(g))
        if backend == "filetree":
            [g.store_root] = (home / "oauth-proxy").iterdir()
        print(f"\n[{backend}] scenario in {time.monotonic() - started:.1f}s")
        yield g
    finally:
        proxy.stop()
        upstream.close()


def _verdicts(g: Ground) -> tuple[dict[str, tuple[str, str, str]], Any]:
    with classified(g.config()) as (stream, snap):
        out = {c.row.client_id: (str(c.verdict), c.reason, c.family) for c in stream}
    return out, snap


def test_the_churner_is_one_family_with_one_live_member_and_the_flood_is_flagged(ground: Ground):
    verdicts, snap = _verdicts(ground)
    assert set(verdicts) == {*ground.churn_ids, ground.good_id, *ground.flood_ids}
    [churn_family] = {verdicts[c][2] for c in ground.churn_ids}
    fam = snap.families[churn_family]
    assert fam.name == CHURNER and fam.members == ROUNDS and fam.live == 1
    assert fam.newest_live_client_id == ground.churn_ids[-1]
    assert verdicts[ground.churn_ids[-1]][:2] == ("live", "live_token")
    assert {verdicts[c][:2] for c in ground.churn_ids[:-1]} == {("abandoned", "never_used")}
    assert fam in snap.churning()
    assert verdicts[ground.good_id][:2] == ("live", "live_token")
    assert snap.families[verdicts[ground.good_id][2]].members == 1
    [flood] = snap.floods
    assert flood.name == FLOODER and flood.registrations == FLOOD and flood.seconds < 60
    assert {m.client_id for m in flood.members} <= set(ground.flood_ids)
    assert snap.loop_detection.startswith("floods only")


def test_every_report_format_renders_the_store(ground: Ground):
    for fmt in ("table", "markdown", "json", "csv", "html"):
        out = io.StringIO()
        with classified(ground.config()) as (stream, snap):
            render(fmt, stream, snap, out, Filters())
        text = out.getvalue()
        assert ground.churn_ids[0] in text, fmt
        if fmt == "json":
            data = json.loads(text)
            assert data["summary"]["floods"] == 1


def test_report_writes_nothing_to_the_store(ground: Ground):
    before = ground.state()
    _verdicts(ground)
    assert ground.state() == before


def test_reap_then_the_clients_carry_on_and_restore_puts_an_entry_back(ground: Ground):
    g = ground
    config = g.config()
    verdicts, snap = _verdicts(g)
    flood_survivor = snap.families[verdicts[g.flood_ids[0]][2]].survivor
    the_plan = plan(config)
    planned = {c.client_id for c in the_plan.candidates}
    assert planned == set(g.churn_ids[:-1]) | (set(g.flood_ids) - {flood_survivor})
    assert {c.verdict for c in the_plan.candidates} == {"abandoned"}
    before = g.state()
    result = apply(config, the_plan)
    assert result.total_acted == len(planned) and not result.restored_late
    after = g.state()
    gone = set(before) - set(after)
    assert _client_key(g, g.churn_ids[0]) in gone and _client_key(g, g.good_id) in after
    assert not set(after) - set(before), "a reap only deletes"

    clients = kit_module("clients")
    url = g.proxy.mcp_url
    g.proxy.at(-END + 600)  # ten minutes after the last round

    async def carry_on() -> str | None:
        # The well-behaved client refreshes and calls its tool with the client_id it always had.
        await clients.expire_stored_access_token(g.good_dir, url)
        w = await clients.wellbehaved_session(url, g.good_dir, name=GOOD)
        assert w.ok and w.client_id == g.good_id and w.logins == 0, w
        # A reaped client comes back with what it stored: its refresh is refused (invalid_client), so FastMCP's
        # client helper registers again, logs in and calls its tool.
        reaped, store = g.churn_ids[0], g.churn_stores[0]
        tokens = await store.get(key=f"{url}/tokens", collection="mcp-oauth-token")
        r = requests.post(
            f"{g.proxy.base}/token",
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": reaped},
            timeout=10,
        )
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
        await clients.expire_access_token_in(store, url)
        again = await clients.churning_session(url, 99, name=CHURNER, token_storage=store)
        assert again.ok and again.client_id not in (None, reaped) and again.logins >= 1, again
        return again.client_id

    new_id = asyncio.run(carry_on())
    verdicts, _ = _verdicts(g)
    assert verdicts[g.good_id][0] == "live" and verdicts[new_id or ""][0] == "live"

    # Restore one reaped client: its entry and every entry that referenced it come back byte for byte.
    back = g.churn_ids[1]
    backend = open_backend(config)
    try:
        [tomb] = backend.ledger().open_tombstones(client_id=back)
    finally:
        backend.close()
    wheres = [_state_key(g, item["where"]) for item in tomb.payload["entries"]]
    assert wheres[0] == _client_key(g, back) and len(wheres) > 1, "the client and what referenced it"
    res = restore(config, client_id=back)
    assert res.restored == [back] and res.rows == len(wheres)
    now = g.state()
    for key in wheres:
        assert now[key][0] == before[key][0], f"{key!r}: the same bytes"
        if g.backend == "filetree":
            assert now[key] == before[key], f"{key!r}: the same bytes and modification time"
        else:
            assert abs(now[key][1] - before[key][1]) <= 1 or now[key][1] == before[key][1] == -1, key
    verdicts, _ = _verdicts(g)
    assert verdicts[back][:2] == ("abandoned", "never_used")


def _state_key(g: Ground, where: str) -> Any:
    return where.encode() if g.backend == "redis" else where


def _client_key(g: Ground, client_id: str) -> Any:
    if g.backend == "redis":
        return f"mcp-oauth-proxy-clients::{client_id}".encode()
    from key_value.aio.stores.filetree import (
        FileTreeV1CollectionSanitizationStrategy,
        FileTreeV1KeySanitizationStrategy,
    )

    assert g.store_root is not None
    directory = FileTreeV1CollectionSanitizationStrategy(g.store_root).sanitize("mcp-oauth-proxy-clients")
    return f"{directory}/{FileTreeV1KeySanitizationStrategy(g.store_root).sanitize(client_id)}.json"
