"""Re-auth loops and registration floods: evidence from the token tables plus one look at each scanned client.

A *loop step* is a client whose refresh token was revoked (rotation, replay or revocation), that has no live
credential left, and whose family registered a new client within `loops.window` after that revocation: the
client software lost its refresh token and authenticated from scratch. A family with `loops.min_cycles` steps
is a suspected re-auth loop. A *flood* is `loops.flood_registrations` never-used registrations within
`loops.flood_window` seconds, in one family or from one registrant IP prefix. See docs/loops.md.

Where a refresh token's revocation shows is profile data (a loop map, docs/profiles.md), not code.
"""

from __future__ import annotations

import itertools
import statistics
import tomllib
from array import array
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Connection

from reaper.config import LoopsConfig
from reaper.dialects import Dialect
from reaper.errors import ConfigError, SchemaError
from reaper.fingerprint import ip_prefix
from reaper.predicates import Compiler, now_param, table_clause
from reaper.profile import BoundProfile, Condition, CredentialMap, FieldMap
from reaper.scan import _credential_columns as credential_columns
from reaper.scan import _tenant_filter as tenant_filter
from reaper.scan import close_streamed, live_condition, to_epoch

if TYPE_CHECKING:
    from reaper.classify import Classified, FamilyStats, Snapshot

SLACK = 1.0  # seconds: epoch-second columns can put a registration in the same second as the revocation


class LoopMap(BaseModel):
    """Where a profile's refresh tokens show their revocation (the `[loops]` part of a profile)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    credential: str = Field(description="the profile credential (by name) whose rows carry refresh tokens")
    revoked: Condition = Field(description="true for a row whose refresh token is revoked")
    revoked_at: FieldMap = Field(description="when it was revoked: {column, encoding}")


def _builtin_maps() -> dict[str, Any]:
    root = resources.files("reaper") / "profiles" / "loops"
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".toml"):
                out[p.name.removesuffix(".toml")] = tomllib.loads(p.read_text(encoding="utf-8"))
    return out


def loop_map(profile: BoundProfile) -> LoopMap | None:
    """The profile's loop map: its own `loops` section when the profile format has one, else the built-in."""
    raw: Any = getattr(profile.profile, "loops", None)
    if raw is None:
        raw = _builtin_maps().get(profile.name)
    if raw is None:
        return None
    try:
        lmap = raw if isinstance(raw, LoopMap) else LoopMap.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            [f"profile {profile.name}: loops.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        ) from None
    names = [c.name for c in profile.credentials if getattr(c, "client_column", None) is None]
    if lmap.credential not in names:
        raise ConfigError(
            f"profile {profile.name}: loops.credential '{lmap.credential}' is not one of its "
            f"credentials keyed by the client's key ({', '.join(names)})"
        )
    if not lmap.revoked_at.column:
        raise ConfigError(f"profile {profile.name}: loops.revoked_at needs a column")
    return lmap


# -- evidence -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoopStep:
    """One turn of a loop: this client's refresh token was revoked, then its family registered again."""

    client_id: str
    registered_at: float | None
    last_token_at: float | None
    revoked_at: float
    next_client_id: str
    next_registered_at: float
    verdict: str

    @property
    def gap(self) -> float:
        """Seconds from the revocation to the next registration."""
        return max(0.0, self.next_registered_at - self.revoked_at)


@dataclass
class LoopEvidence:
    """A family suspected of a re-auth loop, with its steps (newest first, at most loops.max_evidence)."""

    family: str
    name: str | None
    cycles: int
    steps: list[LoopStep]
    median_gap: float
    first_revoked_at: float
    last_revoked_at: float


@dataclass(slots=True)
class FloodMember:
    client_id: str
    registered_at: float
    verdict: str


@dataclass
class FloodEvidence:
    """Never-used registrations packed into a short time, in one family or from one IP prefix."""

    scope: str  # "family" or "ip"
    key: str  # the family id, or the masked IP prefix
    name: str | None
    family: str | None
    registrations: int
    first_at: float
    last_at: float
    members: list[FloodMember] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(0.0, self.last_at - self.first_at)


# -- the token-side query ----------------------------------------------------------------------------------


def _columns_needed(cred: CredentialMap, lmap: LoopMap) -> set[str]:
    return credential_columns(cred) | {lmap.revoked_at.column or ""} | lmap.revoked.columns()


def _check_columns(conn: Connection, physical: str, needed: set[str], profile: BoundProfile) -> None:
    schema, _, bare = physical.rpartition(".")
    have = {c["name"].lower() for c in sa.inspect(conn).get_columns(bare, schema=schema or None)}
    missing = sorted(c for c in needed if c.lower() not in have)
    if missing:
        raise SchemaError([f"profile {profile.name}: loops: table {physical} has no column {c}" for c in missing])


class RevokedIndex:
    """Client key -> latest refresh revocation, in two sorted flat arrays: 16 bytes a client, whatever the key

    Keys are looked up by their hash; a collision between two keys (2^-64) could at worst lend one client the
    other's revocation time, and a loop step also needs a family sibling registered right after it.
    """

    def __init__(self, pairs: Iterable[tuple[str, float]] = ()):
        hashes, times = array("q"), array("d")
        for key, at in pairs:
            hashes.append(hash(key))
            times.append(at)
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        self.hashes = array("q", (hashes[i] for i in order))
        self.times = array("d", (times[i] for i in order))

    def __len__(self) -> int:
        return len(self.hashes)

    def get(self, key: str) -> float | None:
        h = hash(key)
        i = bisect_left(self.hashes, h)
        return self.times[i] if i < len(self.hashes) and self.hashes[i] == h else None


def _param(since: float, encoding: str | None) -> Any:
    value = now_param(datetime.fromtimestamp(since, UTC), encoding)
    return int(value) if encoding == "epoch" else value  # an integer column compares to an integer


def revoked_index(
    conn: Connection,
    profile: BoundProfile,
    lmap: LoopMap,
    dialect: Dialect,
    now: datetime,
    since: float | None,
) -> RevokedIndex:
    """Clients with a refresh token revoked since `since` and no live row left in that credential table, with
    the time of their latest revocation: one grouped pass over the credential table, no join."""
    cred = next(c for c in profile.credentials if c.name == lmap.credential)
    physical = profile.table(cred.table)
    needed = _columns_needed(cred, lmap)
    _check_columns(conn, physical, needed, profile)
    t: Any = table_clause(physical, needed).alias("lt")
    comp = Compiler(t, now, profile.options, dialect)
    revoked_at = t.c[lmap.revoked_at.column or ""]
    revoked = comp.compile(lmap.revoked)
    if since is not None:
        revoked = sa.and_(revoked, revoked_at >= _param(since, lmap.revoked_at.encoding))
    live = live_condition(cred, comp)
    where = tenant_filter(t, cred.tenant, profile.options)
    if cred.exclude is not None:
        where.append(sa.not_(comp.compile(cred.exclude)))
    # Only rows that matter: recent revocations, and live rows (one live row clears its client).
    where.append(sa.or_(revoked, live))
    latest = sa.func.max(sa.case((revoked, revoked_at), else_=None))
    query = (
        sa.select(t.c[cred.ref].label("ref"), latest)
        .where(*where)
        .group_by(t.c[cred.ref])
        .having(sa.func.sum(sa.case((live, 1), else_=0)) == 0)
        # Ordering by an aggregate needs every input row before the first result, so a streamed (server-side)
        # cursor's fast-start planning cannot pick a slow index walk over the whole table.
        .order_by(latest)
    )
    encoding = lmap.revoked_at.encoding

    def pairs() -> Iterator[tuple[str, float]]:
        # Per statement: Connection.execution_options() would change the connection the scan goes on to use.
        result = conn.execute(query, execution_options=dialect.stream_options(5000))
        try:
            for ref, raw_at in result:
                try:
                    at = to_epoch(raw_at, encoding)
                except (TypeError, ValueError):
                    at = None
                if at is not None and ref is not None:
                    yield str(ref), at
        finally:
            close_streamed(result)

    return RevokedIndex(pairs())


# -- the pass over classified clients ----------------------------------------------------------------------


class _Burst:
    """Never-used registrations of one flood key inside the sliding window; remembers the biggest burst."""

    __slots__ = ("window", "best", "best_first", "best_last", "best_members", "keep", "name", "family")

    def __init__(self, keep: int, name: str | None, family: str | None):
        self.window: deque[FloodMember] = deque()
        self.best = 0
        self.best_first = self.best_last = 0.0
        self.best_members: list[FloodMember] = []
        self.keep = keep
        self.name = name
        self.family = family

    def add(self, member: FloodMember, span: float) -> None:
        w = self.window
        w.append(member)  # newest first: every new member is the oldest yet
        while w[0].registered_at - member.registered_at > span:
            w.popleft()
        if len(w) > self.best:
            self.best = len(w)
            self.best_last, self.best_first = w[0].registered_at, member.registered_at
            self.best_members = list(itertools.islice(w, self.keep))


class LoopDetector:
    """Watches the classified stream (newest first); `finish()` writes loops and floods into the Snapshot.

    Memory: the revoked index (16 bytes a candidate), one (time, client_id) per family with several members
    registered within the lookback, never-used registrations inside the flood window, and the evidence rows.
    """

    def __init__(self, settings: LoopsConfig, revoked: RevokedIndex, now: float, families: dict[str, FamilyStats]):
        self.s = settings
        self.revoked = revoked
        self.since = now - settings.lookback
        self.families = families
        # family -> the member seen last, i.e. the next newer sibling of whatever comes next
        self.newer: dict[str, tuple[float, str]] = {}
        self.steps: dict[str, list[LoopStep]] = {}
        self.cycles: Counter[str] = Counter()
        self.unused: dict[tuple[str, str], FloodMember | _Burst] = {}

    @classmethod
    def start(
        cls,
        conn: Connection,
        profile: BoundProfile,
        dialect: Dialect,
        settings: LoopsConfig,
        now: float,
        snapshot: Snapshot,
    ) -> LoopDetector | None:
        """Run the token-side query and return a detector, or None (with the reason in the snapshot)."""
        snapshot.loop_window = settings.window
        if not settings.enabled:
            snapshot.loop_detection = "disabled (loops.enabled = false)"
            return None
        lmap = loop_map(profile)
        revoked = RevokedIndex()
        if lmap is None:
            snapshot.loop_detection = f"floods only: profile '{profile.name}' has no loop map"
        else:
            now_dt = datetime.fromtimestamp(now, UTC)
            revoked = revoked_index(conn, profile, lmap, dialect, now_dt, now - settings.lookback)
            snapshot.loop_detection = "on"
        return cls(settings, revoked, now, snapshot.families)

    def observe(self, item: Classified) -> None:
        row = item.row
        t = row.created_at
        if t is None or t < self.since or row.problems:
            return
        fam = item.family
        prev = self.newer.get(fam)
        if prev is None:
            # A family's newest member is not remembered (most families have one member): FamilyStats has it.
            stats = self.families.get(fam)
            if (
                stats is not None
                and stats.members >= 2
                and stats.newest_client_id != row.client_id
                and stats.last_registered is not None
            ):
                prev = (stats.last_registered, stats.newest_client_id or "")
        if prev is not None:
            if self.revoked and not row.live and row.total_credentials:
                revoked_at = self.revoked.get(row.key)
                if revoked_at is not None and revoked_at - SLACK <= prev[0] <= revoked_at + self.s.window:
                    self._step(item, revoked_at, prev)
            self.newer[fam] = (t, row.client_id)
        if not row.total_credentials:
            member = FloodMember(row.client_id, t, str(item.verdict))
            self._unused(("family", fam), member, row.name, fam)
            if row.ip:
                # The scan aggregates to the configured prefix (classify.ip_prefix_v4/v6); rows built
                # elsewhere fall back to the default prefixes.
                prefix = getattr(row, "ip_network", None) or ip_prefix(row.ip)
                if prefix:
                    self._unused(("ip", prefix), member, row.name, None)

    def _step(self, item: Classified, revoked_at: float, nxt: tuple[float, str]) -> None:
        fam = item.family
        self.cycles[fam] += 1
        steps = self.steps.setdefault(fam, [])
        if len(steps) < self.s.max_evidence:
            row = item.row
            steps.append(
                LoopStep(
                    row.client_id,
                    row.created_at,
                    row.last_used,
                    revoked_at,
                    nxt[1],
                    nxt[0],
                    str(item.verdict),
                )
            )

    def _unused(self, key: tuple[str, str], member: FloodMember, name: str | None, family: str | None) -> None:
        cur = self.unused.get(key)
        span = self.s.flood_window
        if cur is None:
            self.unused[key] = member
        elif isinstance(cur, FloodMember):
            if cur.registered_at - member.registered_at > span:
                self.unused[key] = member  # too far apart: start over, nothing to remember
            else:
                burst = _Burst(self.s.max_evidence, name, family)
                burst.add(cur, span)
                burst.add(member, span)
                self.unused[key] = burst
        else:
            cur.add(member, span)

    def finish(self, snapshot: Snapshot) -> None:
        """Families with enough loop steps become suspected loops; bursts big enough become floods."""
        for fam, cycles in self.cycles.items():
            if cycles < self.s.min_cycles:
                continue
            steps = self.steps[fam]
            stats = snapshot.families.get(fam)
            snapshot.loops[fam] = LoopEvidence(
                fam,
                stats.name if stats else None,
                cycles,
                steps,
                statistics.median(s.gap for s in steps),
                min(s.revoked_at for s in steps),
                max(s.revoked_at for s in steps),
            )
        floods = []
        for (scope, key), cur in self.unused.items():
            if isinstance(cur, _Burst) and cur.best >= self.s.flood_registrations:
                # An IP key is already a prefix (ip_prefix), never an address.
                floods.append(
                    FloodEvidence(
                        scope,
                        key,
                        cur.name,
                        cur.family,
                        cur.best,
                        cur.best_first,
                        cur.best_last,
                        cur.best_members,
                    )
                )
        snapshot.floods = sorted(floods, key=lambda f: (-f.registrations, f.scope, f.key))
