"""Evidence that outlives the reap: what the plan's scan showed (suspected re-auth loops, registration floods,
the families acted on and their newest registrations), kept with the run in the ledger, so the HTML evidence
report can be made for a past run after its clients are gone.

Bounded like the report itself: at most PER_FAMILY registrations of a family and MAX_POINTS in all while the
stream goes by, and only the families the report would show are kept. No secret is in it (the scan selects none);
registrant IPs only as their network prefix.
"""

from __future__ import annotations

import heapq
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from reaper import __version__
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
    Verdict,
)

VERSION = 1
PER_FAMILY = 200
MAX_POINTS = 50_000
MAX_FAMILIES = 200  # families of reaped clients kept beyond the loops, floods and churning ones


class EvidenceCollector:
    """Tees a classified stream, keeping each family's newest registrations (bounded)."""

    def __init__(self, per_family: int = PER_FAMILY, max_points: int = MAX_POINTS):
        self.per_family = per_family
        self.max_points = max_points
        self.heaps: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
        self.kept = 0
        self.snapshot: Snapshot | None = None  # set once the stream is exhausted

    def tee(self, stream: Iterable[Classified]) -> Iterator[Classified]:
        for item in stream:
            self.add(item)
            yield item

    def add(self, item: Classified) -> None:
        row = item.row
        if row.created_at is None or row.problems:
            return
        heap = self.heaps.get(item.family)
        if heap is None and self.kept >= self.max_points:
            return
        point = {
            "client_id": row.client_id,
            "name": row.name,
            "created": row.created_at,
            "last_used": row.last_used,
            "verdict": str(item.verdict),
            "reason": item.reason,
            "ip": (row.ip_network or ip_prefix(row.ip)) if row.ip else "",
            "redirect_uris": list(row.redirect_uris),
            "software_id": row.software_id,
            "software_version": row.software_version,
        }
        entry = (row.created_at, row.client_id, point)
        if heap is None:
            self.heaps[item.family] = [entry]
            self.kept += 1
        elif len(heap) < self.per_family:
            heapq.heappush(heap, entry)
            self.kept += 1
        elif heap[0][:2] < entry[:2]:
            heapq.heapreplace(heap, entry)

    def record(self, snap: Snapshot, acted_families: Iterable[str] = ()) -> dict[str, Any]:
        """The evidence to keep with a run: the report's families (loops, floods, churning) and those acted on."""
        chosen: dict[str, None] = {}
        for fam in snap.loops:
            chosen[fam] = None
        for flood in snap.floods:
            if flood.scope == "family":
                chosen[flood.key] = None
        for f in snap.churning():
            chosen[f.id] = None
        acted = Counter(acted_families)
        for fam, _ in acted.most_common(MAX_FAMILIES):
            chosen[fam] = None
        families = {fid: _family(snap.families[fid], acted.get(fid, 0)) for fid in chosen if fid in snap.families}
        points = {
            fid: [p for _, _, p in sorted(self.heaps.get(fid, ()), key=lambda e: e[:2], reverse=True)]
            for fid in families
        }
        return {
            "version": VERSION,
            "software": f"dcr-reaper {__version__}",
            "profile": snap.profile,
            "database": snap.database,
            "started_at": snap.started_at,
            "finished_at": snap.finished_at,
            "clients": snap.clients,
            "by_verdict": dict(snap.by_verdict),
            "by_reason": [[v, r, n] for (v, r), n in sorted(snap.by_reason.items())],
            "churn_window": snap.churn_window,
            "churn_min_registrations": snap.churn_min_registrations,
            "loop_detection": snap.loop_detection,
            "loop_window": snap.loop_window,
            "loop_evidence": snap.loop_evidence,
            "loops": [_loop(lp) for lp in snap.loops.values()],
            "floods": [_flood(f) for f in snap.floods],
            "families": families,
            "points": points,
        }


def _family(f: FamilyStats, acted: int) -> dict[str, Any]:
    return {
        "id": f.id,
        "name": f.name,
        "normalized_name": f.normalized_name,
        "members": f.members,
        "live": f.live,
        "orphans": f.orphans,
        "abandoned": f.abandoned,
        "first_registered": f.first_registered,
        "last_registered": f.last_registered,
        "recent": f.recent,
        "survivor": f.survivor,
        "median_interval": f.median_interval,
        "acted": acted,
    }


def _loop(lp: LoopEvidence) -> dict[str, Any]:
    return {
        "family": lp.family,
        "name": lp.name,
        "cycles": lp.cycles,
        "median_gap": lp.median_gap,
        "first_revoked_at": lp.first_revoked_at,
        "last_revoked_at": lp.last_revoked_at,
        "steps": [
            [
                s.client_id,
                s.registered_at,
                s.last_token_at,
                s.revoked_at,
                s.next_client_id,
                s.next_registered_at,
                s.verdict,
            ]
            for s in lp.steps
        ],
    }


def _flood(f: FloodEvidence) -> dict[str, Any]:
    return {
        "scope": f.scope,
        "key": f.key,
        "name": f.name,
        "family": f.family,
        "registrations": f.registrations,
        "first_at": f.first_at,
        "last_at": f.last_at,
        "members": [[m.client_id, m.registered_at, m.verdict] for m in f.members],
    }


def replay(record: dict[str, Any]) -> tuple[Snapshot, list[Classified]]:
    """A kept record as a Snapshot and the classified registrations it kept: what the HTML report renders."""
    snap = Snapshot(record["profile"], record["database"], record["started_at"], record["finished_at"])
    snap.clients = record["clients"]
    snap.by_verdict = Counter(record["by_verdict"])
    snap.by_reason = Counter({(v, r): n for v, r, n in record["by_reason"]})
    snap.churn_window = record["churn_window"]
    snap.churn_min_registrations = record["churn_min_registrations"]
    snap.loop_detection = record["loop_detection"]
    snap.loop_window = record["loop_window"]
    snap.loop_evidence = record["loop_evidence"]
    for lp in record["loops"]:
        steps = [LoopStep(*s) for s in lp["steps"]]
        snap.loops[lp["family"]] = LoopEvidence(
            lp["family"],
            lp["name"],
            lp["cycles"],
            steps,
            lp["median_gap"],
            lp["first_revoked_at"],
            lp["last_revoked_at"],
        )
    for f in record["floods"]:
        members = [FloodMember(*m) for m in f["members"]]
        snap.floods.append(
            FloodEvidence(
                f["scope"], f["key"], f["name"], f["family"], f["registrations"], f["first_at"], f["last_at"], members
            )
        )
    for fid, f in record["families"].items():
        stats = FamilyStats(fid, f["name"], f["normalized_name"], f["members"], f["live"], f["orphans"], f["abandoned"])
        stats.first_registered, stats.last_registered, stats.recent = (
            f["first_registered"],
            f["last_registered"],
            f["recent"],
        )
        stats.newest_client_id = f["survivor"]
        if f["median_interval"] is not None:  # two samples whose one gap is the median kept
            stats._times = array("d", [0.0, float(f["median_interval"])])
            stats._seen_times = 2
        snap.families[fid] = stats
    items = []
    for fid, points in record["points"].items():
        for p in points:
            row = ClientRow(
                p["client_id"],
                p["client_id"],
                p["created"],
                name=p.get("name"),
                redirect_uris=tuple(p.get("redirect_uris") or ()),
                software_id=p.get("software_id"),
                software_version=p.get("software_version"),
                ip=p.get("ip") or None,
                ip_network=p.get("ip") or None,
                last_used=p.get("last_used"),
            )
            items.append(Classified(row, fid, Verdict(p["verdict"]), p["reason"]))
    return snap, items
