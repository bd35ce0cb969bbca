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
from array import array
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable

from reaper.analysis.fingerprint import ip_prefix
from reaper.analysis.model import (
    Classified,
    FamilyStats,
    FloodEvidence,
    FloodMember,
    LoopEvidence,
    LoopStep,
    Snapshot,
)
from reaper.config import LoopsConfig

SLACK = 1.0  # seconds: epoch-second columns can put a registration in the same second as the revocation


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
