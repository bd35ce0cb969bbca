"""Records: the public facts of a client, family, loop, flood and scan summary, as plain dicts (no secret)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from reaper.analysis.fingerprint import ip_prefix, normalize_name
from reaper.analysis.model import VERDICTS, Classified, FamilyStats, FloodEvidence, LoopEvidence, Snapshot
from reaper.output.text import FOUR_DIGIT_YEARS, iso, iso_value, utf8_safe

_from_epoch = datetime.fromtimestamp
_LOW, _HIGH = FOUR_DIGIT_YEARS  # iso_value's range for a datetime, inlined

CLIENT_FIELDS = (
    "client_id",
    "name",
    "family",
    "verdict",
    "reason",
    "registered_at",
    "last_token_at",
    "live_credentials",
    "credentials",
    "redirect_uris",
    "software_id",
    "disabled",
    "problems",
)


@dataclass(frozen=True)
class Filters:
    """Which clients to list."""

    verdicts: frozenset[str] = frozenset()
    family: str | None = None
    reapable: frozenset[str] = frozenset({"orphan", "abandoned"})  # policy.verdicts: the default listing

    def keep(self, families: dict[str, FamilyStats]) -> Callable[[Classified], bool] | None:
        """`match` over these families, or None when every client is listed (no call a client)."""
        if not self.verdicts and not self.family:
            return None
        return partial(self.match, families=families)

    def match(self, item: Classified, families: dict[str, FamilyStats]) -> bool:
        if self.verdicts and item.verdict not in self.verdicts:
            return False
        if self.family:
            fam = families.get(item.family)
            wanted = self.family.casefold()
            return item.family.startswith(wanted) or (
                fam is not None and fam.normalized_name == normalize_name(self.family)
            )
        return True


def client_record(item: Classified, show_ips: bool = False) -> dict[str, Any]:
    """The public facts of one classified client (no secret, no token)."""
    row = item.row
    record = {
        "client_id": utf8_safe(row.client_id),
        "name": utf8_safe(row.name),
        "family": item.family,
        "verdict": str(item.verdict),
        "reason": item.reason,
        "registered_at": iso(row.created_at),
        "last_token_at": iso(row.last_used),
        "live_credentials": sum(row.live.values()),
        "credentials": row.total_credentials,
        "redirect_uris": [utf8_safe(u) for u in row.redirect_uris],
        "software_id": utf8_safe(row.software_id),
        "disabled": row.disabled,
        "problems": list(row.problems),
    }
    if row.ip:
        record["ip"] = row.ip if show_ips else (row.ip_network or ip_prefix(row.ip))
    return record


def raw_client_record(item: Classified, show_ips: bool = False) -> dict[str, Any]:
    """`client_record` for orjson (with ISO_OPTIONS), built with as few Python calls as it can be (one a client of
    a JSON report): times as datetimes, text unguarded (orjson refuses what `utf8_safe` would have escaped; the
    caller then falls back to `client_record`), the verdict as its enum, tuples as they are."""
    row = item.row
    created, used = row.created_at, row.last_used
    record = {
        "client_id": row.client_id,
        "name": row.name,
        "family": item.family,
        "verdict": item.verdict,
        "reason": item.reason,
        "registered_at": _from_epoch(created, UTC)
        if created is not None and _LOW <= created <= _HIGH
        else iso_value(created),
        "last_token_at": _from_epoch(used, UTC) if used is not None and _LOW <= used <= _HIGH else iso_value(used),
        "live_credentials": sum(row.live.values()),
        "credentials": row.total_credentials,
        "redirect_uris": row.redirect_uris,
        "software_id": row.software_id,
        "disabled": row.disabled,
        "problems": row.problems,
    }
    if row.ip:
        record["ip"] = row.ip if show_ips else (row.ip_network or ip_prefix(row.ip))
    return record


def family_record(f: FamilyStats, snap: Snapshot) -> dict[str, Any]:
    return {
        "family": f.id,
        "name": utf8_safe(f.name),
        "members": f.members,
        "live": f.live,
        "orphans": f.orphans,
        "abandoned": f.abandoned,
        "first_registered": iso(f.first_registered),
        "last_registered": iso(f.last_registered),
        "registrations_in_window": f.recent,
        "median_interval_seconds": f.median_interval,
        "churning": f.recent >= snap.churn_min_registrations,
        "canonical_client_id": utf8_safe(f.survivor),
    }


def loop_record(loop: LoopEvidence) -> dict[str, Any]:
    """A suspected re-auth loop and its evidence rows (client_ids and times only)."""
    return {
        "family": loop.family,
        "name": utf8_safe(loop.name),
        "cycles": loop.cycles,
        "median_gap_seconds": loop.median_gap,
        "first_revoked": iso(loop.first_revoked_at),
        "last_revoked": iso(loop.last_revoked_at),
        "evidence": [
            {
                "client_id": s.client_id,
                "registered_at": iso(s.registered_at),
                "last_token_at": iso(s.last_token_at),
                "refresh_revoked_at": iso(s.revoked_at),
                "next_client_id": s.next_client_id,
                "next_registered_at": iso(s.next_registered_at),
                "gap_seconds": s.gap,
                "verdict": s.verdict,
            }
            for s in loop.steps
        ],
    }


def flood_record(flood: FloodEvidence) -> dict[str, Any]:
    """A registration flood: a family or an IP prefix (never an address), with its never-used members."""
    return {
        "scope": flood.scope,
        "family" if flood.scope == "family" else "ip_prefix": flood.key,
        "name": utf8_safe(flood.name),
        "registrations": flood.registrations,
        "first_registered": iso(flood.first_at),
        "last_registered": iso(flood.last_at),
        "seconds": flood.seconds,
        "evidence": [
            {"client_id": m.client_id, "registered_at": iso(m.registered_at), "verdict": m.verdict}
            for m in flood.members
        ],
    }


def summary_record(snap: Snapshot) -> dict[str, Any]:
    reasons: dict[str, dict[str, int]] = {}
    for (verdict, reason), n in sorted(snap.by_reason.items()):
        reasons.setdefault(str(verdict), {})[reason] = n
    return {
        "profile": snap.profile,
        "database": snap.database,
        "scanned_at": iso(snap.started_at),
        "duration_seconds": round(snap.duration, 3),
        "clients": snap.clients,
        "families": len(snap.families),
        "by_verdict": {str(v): snap.by_verdict.get(v, 0) for v in VERDICTS},
        "by_reason": reasons,
        "churning_families": len(snap.churning()),
        "problems": snap.problem_count,
        "churn_window_seconds": snap.churn_window,
        "loop_detection": snap.loop_detection,
        "loop_evidence": snap.loop_evidence or None,
        "live_only_by_never_expiring_credentials": snap.live_forever_only,
        "clock_skew_seconds": round(snap.clock_skew, 3),
        "suspected_loops": len(snap.loops),
        "floods": len(snap.floods),
    }


def loops_sorted(snap: Snapshot) -> list[LoopEvidence]:
    """Suspected loops, most cycles first."""
    return sorted(snap.loops.values(), key=lambda lp: (-lp.cycles, lp.family))
