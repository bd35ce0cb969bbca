"""Classify: one verdict with a reason per client, and statistics per family, in one streaming pass.

Clients arrive newest first, so when a client is seen its family already knows whether a newer member
exists; memory holds one small record per family, never one per client.
"""

from __future__ import annotations

import fnmatch
import random
import statistics
from array import array
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from reaper.config import ClassifyConfig
from reaper.fingerprint import family_id, normalize_name, parts_of
from reaper.scan import ClientRow

if TYPE_CHECKING:
    from reaper.loops import FloodEvidence, LoopEvidence


class Verdict(StrEnum):
    LIVE = "live"
    YOUNG = "young"
    ORPHAN = "orphan"
    ABANDONED = "abandoned"
    IDLE = "idle"
    PROTECTED = "protected"


VERDICTS = tuple(Verdict)
INTERVAL_SAMPLES = 64


@dataclass(slots=True)
class Classified:
    """A client with its family and verdict."""

    row: ClientRow
    family: str
    verdict: Verdict
    reason: str


@dataclass(slots=True)
class FamilyStats:
    """What one family looks like; bounded in size whatever the number of members."""

    id: str
    name: str | None
    normalized_name: str
    members: int = 0
    live: int = 0
    orphans: int = 0
    abandoned: int = 0
    first_registered: float | None = None
    last_registered: float | None = None
    recent: int = 0
    new: int = 0
    tied: int = 0
    newest_client_id: str | None = None
    newest_live_client_id: str | None = None
    newest_key: str | None = None
    newest_live_key: str | None = None
    _previous: float | None = None
    _intervals: array[float] = field(default_factory=lambda: array("d"))
    _seen_intervals: int = 0

    def add(
        self, row: ClientRow, verdict: Verdict, window_start: float, rng: random.Random, new_since: float | None = None
    ) -> None:
        self.members += 1
        if self.newest_client_id is None:
            self.newest_client_id, self.newest_key = row.client_id, row.key
        if verdict is Verdict.LIVE:
            self.live += 1
            if self.newest_live_client_id is None:
                self.newest_live_client_id, self.newest_live_key = row.client_id, row.key
        elif verdict is Verdict.ORPHAN:
            self.orphans += 1
        elif verdict is Verdict.ABANDONED:
            self.abandoned += 1
        t = row.created_at
        if t is None or row.problems:
            return  # an unreadable row (a future time, say) must never make its siblings look superseded
        if self.last_registered is None:
            self.last_registered = t
        self.first_registered = t
        if t >= window_start:
            self.recent += 1
        if new_since is not None:
            if t > new_since:
                self.new += 1
            elif t == new_since:
                self.tied += 1
        if self._previous is not None:
            self._sample(self._previous - t, rng)
        self._previous = t

    def _sample(self, interval: float, rng: random.Random) -> None:
        # Reservoir sampling keeps the median honest for huge families in fixed memory.
        self._seen_intervals += 1
        if len(self._intervals) < INTERVAL_SAMPLES:
            self._intervals.append(interval)
        else:
            slot = rng.randrange(self._seen_intervals)
            if slot < INTERVAL_SAMPLES:
                self._intervals[slot] = interval

    @property
    def median_interval(self) -> float | None:
        """Median seconds between consecutive registrations (None below two members)."""
        return statistics.median(self._intervals) if self._intervals else None

    @property
    def survivor(self) -> str | None:
        """The member a merge keeps: the newest live one, else the newest."""
        return self.newest_live_client_id or self.newest_client_id

    @property
    def survivor_key(self) -> str | None:
        """The survivor's key (what credential rows reference)."""
        return self.newest_live_key if self.newest_live_client_id else self.newest_key


@dataclass
class Snapshot:
    """The result of one scan: counts and families, no per-client data."""

    profile: str
    database: str
    started_at: float
    finished_at: float = 0.0
    clients: int = 0
    by_verdict: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    families: dict[str, FamilyStats] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    problem_count: int = 0
    churn_window: float = 86400.0
    churn_min_registrations: int = 5
    new_registrations: int = 0
    newest_registration: float = 0.0
    newest_by_family: Counter[str] = field(default_factory=Counter)
    # Filled by reaper.loops after the stream: family id -> suspected re-auth loop, and registration floods.
    loops: dict[str, LoopEvidence] = field(default_factory=dict)
    floods: list[FloodEvidence] = field(default_factory=list)
    loop_detection: str = "off"  # "on", or why not
    loop_window: float = 900.0

    @property
    def duration(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    def churning(self) -> list[FamilyStats]:
        """Families with at least churn_min_registrations in the churn window, most first."""
        fams = [f for f in self.families.values() if f.recent >= self.churn_min_registrations]
        return sorted(fams, key=lambda f: (-f.recent, -f.members, f.id))

    def top_families(self, k: int) -> list[FamilyStats]:
        """The k largest families with more than one member, by orphans then members."""
        fams = [f for f in self.families.values() if f.members > 1]
        return sorted(fams, key=lambda f: (-f.orphans, -f.members, f.id))[:k]


MAX_PROBLEMS_KEPT = 1000


class Classifier:
    """Consumes scanned clients newest first; yields Classified and fills a Snapshot."""

    def __init__(
        self,
        settings: ClassifyConfig,
        snapshot: Snapshot,
        now: float,
        new_since: float | None = None,
        seen_at_watermark: dict[str, int] | None = None,
    ):
        # Registrations newer than `new_since` are new; of those exactly at it, the ones beyond what the
        # previous scan already saw there (`seen_at_watermark`, per family) are new too.
        self.new_since = new_since
        self.seen_at_watermark = seen_at_watermark or {}
        self.s = settings
        self.snapshot = snapshot
        self.now = now
        self.window_start = now - settings.churn_window
        self.allow_ids = frozenset(settings.allow_client_ids)
        self.allow_names = tuple(settings.allow_names)
        self.rng = random.Random(0)

    def verdict(self, row: ClientRow, has_newer: bool) -> tuple[Verdict, str]:
        """The verdict and reason for one client (precedence: protected > live > young > abandoned > orphan)."""
        if row.problems:
            return Verdict.PROTECTED, "bad_row"
        if row.cimd:
            return Verdict.PROTECTED, "cimd"
        if not row.dynamic:
            return Verdict.PROTECTED, "static"
        if row.client_id in self.allow_ids or (
            self.allow_names and any(fnmatch.fnmatchcase(row.name or "", pattern) for pattern in self.allow_names)
        ):
            return Verdict.PROTECTED, "allowlist"
        if row.live:
            kind = max(row.live, key=lambda k: row.live[k])
            return Verdict.LIVE, f"live_{kind}"
        if row.created_at is None:
            return Verdict.PROTECTED, "unknown_age"
        age = self.now - row.created_at
        if age < self.s.young_for:
            return Verdict.YOUNG, "grace_period"
        if row.total_credentials == 0:
            if age < self.s.abandoned_after:
                return Verdict.YOUNG, "awaiting_first_token"
            return Verdict.ABANDONED, "never_used"
        if has_newer:
            return Verdict.ORPHAN, "superseded"
        return Verdict.IDLE, "no_newer_sibling"

    def run(self, rows: Iterable[ClientRow]) -> Generator[Classified, None, None]:
        snap = self.snapshot
        parts_of_row = parts_of(self.s.family_components)
        by_parts: dict[tuple[object, ...], FamilyStats] = {}  # one entry per family
        counts: dict[tuple[Verdict, str], int] = {}
        window_start, rng, new_since = self.window_start, self.rng, self.new_since
        verdict_of = self.verdict
        try:
            for row in rows:
                parts = parts_of_row(row)
                fam = by_parts.get(parts)
                if fam is None:
                    fam_id = family_id(parts)
                    fam = snap.families.get(fam_id)
                    if fam is None:
                        fam = snap.families[fam_id] = FamilyStats(fam_id, row.name, normalize_name(row.name))
                    by_parts[parts] = fam
                verdict, reason = verdict_of(row, fam.last_registered is not None)
                fam.add(row, verdict, window_start, rng, new_since)
                created = row.created_at
                if created is not None and not row.problems:
                    if new_since is not None and created > new_since:
                        snap.new_registrations += 1
                    if created > snap.newest_registration:
                        snap.newest_registration = created
                        snap.newest_by_family.clear()
                    if created == snap.newest_registration:
                        snap.newest_by_family[fam.id] += 1
                key = (verdict, reason)
                counts[key] = counts.get(key, 0) + 1
                if row.problems:
                    for problem in row.problems:
                        snap.problem_count += 1
                        if len(snap.problems) < MAX_PROBLEMS_KEPT:
                            snap.problems.append((row.client_id, problem))
                yield Classified(row, fam.id, verdict, reason)
        finally:
            if new_since is not None:
                for fam in {f.id: f for f in by_parts.values()}.values():
                    extra = max(0, fam.tied - self.seen_at_watermark.get(fam.id, 0))
                    fam.tied = 0
                    fam.new += extra
                    snap.new_registrations += extra
            for (verdict, reason), n in counts.items():
                snap.clients += n
                snap.by_verdict[verdict] += n
                snap.by_reason[(verdict, reason)] += n
