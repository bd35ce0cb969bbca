"""Re-auth loops and registration floods: evidence from the token tables plus one look at each scanned client.

A *loop step* is a client whose refresh token was revoked (rotation, replay or revocation), that has no live
credential left, and whose family registered a new client within `loops.window` after that revocation: the
client software lost its refresh token and authenticated from scratch. A family with `loops.min_cycles` steps
is a suspected re-auth loop. A *flood* is `loops.flood_registrations` never-used registrations within
`loops.flood_window` seconds, in one family or from one registrant IP prefix. See docs/loops.md.

Where a refresh token's revocation shows is profile data (a loop map, docs/profiles.md), not code.
"""

from __future__ import annotations

import heapq
import math
import statistics
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

from reaper.analysis.fingerprint import ip_prefix
from reaper.analysis.model import (
    Classified,
    ClientRow,
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

    def __init__(self, pairs: Iterable[tuple[str, float]] = (), evidence: str = "replay", on_rows: bool = False):
        self.evidence = evidence
        self.on_rows = on_rows  # the scan reads each client's revocation with the client (ClientRow.revoked_at)
        hashes, times = array("q"), array("d")
        for key, at in pairs:
            hashes.append(hash(key))
            times.append(at)
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        self.hashes = array("q", (hashes[i] for i in order))
        self.times = array("d", (times[i] for i in order))

    @classmethod
    def read_with_rows(cls, evidence: str) -> RevokedIndex:
        """An index whose entries come with the scanned clients themselves: no pass of its own."""
        return cls((), evidence, on_rows=True)

    def __len__(self) -> int:
        return len(self.hashes)

    def __bool__(self) -> bool:
        return self.on_rows or len(self.hashes) > 0

    def at(self, row: ClientRow) -> float | None:
        """The client's latest refresh revocation, wherever the index keeps it."""
        return row.revoked_at if self.on_rows else self.get(row.key)

    def get(self, key: str) -> float | None:
        h = hash(key)
        i = bisect_left(self.hashes, h)
        return self.times[i] if i < len(self.hashes) and self.hashes[i] == h else None


# -- the pass over classified clients ----------------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    """A registration within the lookback, as the newest-members heap keeps it (for evidence rows)."""

    registered_at: float
    client_id: str
    last_used: float | None
    verdict: str
    revoked_at: float  # NaN: not a loop candidate

    def __lt__(self, other: _Member) -> bool:
        return (self.registered_at, self.client_id) < (other.registered_at, other.client_id)


@dataclass(slots=True)
class _Family:
    """One family's registrations within the lookback: every time and candidate revocation in flat arrays (16
    bytes each), the newest few in full for the evidence."""

    times: array[float] = field(default_factory=lambda: array("d"))
    revoked: array[float] = field(default_factory=lambda: array("d"))
    newest: list[_Member] = field(default_factory=list)  # a min-heap of the newest `keep`


@dataclass(slots=True)
class _Unused:
    """Never-used registrations of one flood key (a family or an IP prefix)."""

    name: str | None
    family: str | None
    times: array[float] = field(default_factory=lambda: array("d"))
    members: list[FloodMember] | None = field(default_factory=list)  # None once over the global budget


MAX_FLOOD_MEMBERS = 100_000  # never-used registrations kept in full, over all keys; beyond, only their times


class LoopDetector:
    """Watches the classified stream, in any order; `finish()` writes loops and floods into the Snapshot.

    Memory: the revoked index (16 bytes a candidate); per family, 16 bytes per registration within the lookback
    and the newest 2 x loops.max_evidence in full; 8 bytes per never-used registration (in full up to
    MAX_FLOOD_MEMBERS). The order of consecutive registrations is worked out at the end.
    """

    def __init__(self, settings: LoopsConfig, revoked: RevokedIndex, now: float, families: dict[str, FamilyStats]):
        self.s = settings
        self.revoked = revoked
        self.since = now - settings.lookback
        self.families = families
        self.keep = 2 * settings.max_evidence + 2
        self.lookback: dict[str, _Family] = {}
        self.unused: dict[tuple[str, str], _Unused] = {}
        self.flood_members = 0

    def observe(self, item: Classified) -> None:
        row = item.row
        t = row.created_at
        if t is None or t < self.since or row.problems:
            return
        fam = self.lookback.get(item.family)
        if fam is None:
            fam = self.lookback[item.family] = _Family()
        revoked_at = math.nan
        if self.revoked and row.total_credentials:
            at = self.revoked.at(row)
            if at is not None and self._eligible(row, at):
                revoked_at = at
        fam.times.append(t)
        fam.revoked.append(revoked_at)
        member = _Member(t, row.client_id, row.last_used, str(item.verdict), revoked_at)
        if len(fam.newest) < self.keep:
            heapq.heappush(fam.newest, member)
        elif fam.newest[0] < member:
            heapq.heapreplace(fam.newest, member)
        if not row.total_credentials:
            self._unused(("family", item.family), FloodMember(row.client_id, t, str(item.verdict)), row.name)
            if row.ip:
                # The scan aggregates to the configured prefix (classify.ip_prefix_v4/v6); rows built
                # elsewhere fall back to the default prefixes.
                prefix = row.ip_network or ip_prefix(row.ip)
                if prefix:
                    self._unused(("ip", prefix), FloodMember(row.client_id, t, str(item.verdict)), row.name)

    def _eligible(self, row: ClientRow, revoked_at: float) -> bool:
        """What the client itself must show for a loop step: replay evidence, no live credential left;
        rotation evidence, nothing issued to it after its last rotation (the successor went unused)."""
        if self.revoked.evidence == "rotation":
            return row.last_used is None or row.last_used <= revoked_at + SLACK
        return not row.live

    def _is_step(self, revoked_at: float, next_registered: float) -> bool:
        """The family registered again after the revocation (replay evidence: within loops.window)."""
        if math.isnan(revoked_at) or next_registered < revoked_at - SLACK:
            return False
        return self.revoked.evidence == "rotation" or next_registered <= revoked_at + self.s.window

    def _unused(self, key: tuple[str, str], member: FloodMember, name: str | None) -> None:
        entry = self.unused.get(key)
        if entry is None:
            entry = self.unused[key] = _Unused(name, key[1] if key[0] == "family" else None)
        entry.times.append(member.registered_at)
        if entry.members is not None:
            if self.flood_members < MAX_FLOOD_MEMBERS:
                entry.members.append(member)
                self.flood_members += 1
            else:
                entry.members = None  # over budget: the count stays exact, the evidence names no clients

    def _loop(self, fid: str, fam: _Family, snapshot: Snapshot) -> LoopEvidence | None:
        order = sorted(range(len(fam.times)), key=fam.times.__getitem__)
        found = [
            (fam.revoked[a], fam.times[b])
            for a, b in zip(order, order[1:], strict=False)
            if self._is_step(fam.revoked[a], fam.times[b])
        ]
        if len(found) < self.s.min_cycles:
            return None
        newest = sorted(fam.newest)  # the newest registrations, consecutive: their steps are the evidence
        steps = [
            LoopStep(a.client_id, a.registered_at, a.last_used, a.revoked_at, b.client_id, b.registered_at, a.verdict)
            for a, b in zip(newest, newest[1:], strict=False)
            if self._is_step(a.revoked_at, b.registered_at)
        ]
        stats = snapshot.families.get(fid)
        return LoopEvidence(
            fid,
            stats.name if stats else None,
            len(found),
            steps[::-1][: self.s.max_evidence],  # newest first
            statistics.median(max(0.0, nxt - rev) for rev, nxt in found),
            min(rev for rev, _ in found),
            max(rev for rev, _ in found),
        )

    def _flood(self, key: tuple[str, str], entry: _Unused) -> FloodEvidence | None:
        times = sorted(entry.times)
        if len(times) < self.s.flood_registrations:
            return None
        best, first, last, lo = 0, 0.0, 0.0, 0
        for hi, t in enumerate(times):
            while t - times[lo] > self.s.flood_window:
                lo += 1
            if hi - lo + 1 > best:
                best, first, last = hi - lo + 1, times[lo], t
        if best < self.s.flood_registrations:
            return None
        members = sorted(
            (m for m in entry.members or () if first <= m.registered_at <= last),
            key=lambda m: (-m.registered_at, m.client_id),
        )[: self.s.max_evidence]
        return FloodEvidence(key[0], key[1], entry.name, entry.family, best, first, last, members)

    def finish(self, snapshot: Snapshot) -> None:
        """Families with enough loop steps become suspected loops; bursts big enough become floods."""
        for fid, fam in self.lookback.items():
            if len(fam.times) < 2:
                continue
            loop = self._loop(fid, fam, snapshot)
            if loop is not None:
                snapshot.loops[fid] = loop
        floods = [f for key, entry in self.unused.items() if (f := self._flood(key, entry)) is not None]
        snapshot.floods = sorted(floods, key=lambda f: (-f.registrations, f.scope, f.key))
