"""The analysis data model: what the scan yields, what classification decides, what a scan leaves behind.

Plain data, no I/O. The scan fills ClientRows; the classifier turns them into Classified items and FamilyStats;
the loop detector returns LoopEvidence and FloodEvidence; the pipeline assembles the Snapshot.
"""

from __future__ import annotations

import random
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(slots=True)
class ClientRow:
    """One client as the scan saw it. Holds no secret: secrets and tokens are never selected (S8)."""

    key: str
    client_id: str
    created_at: float | None
    name: str | None = None
    redirect_uris: tuple[str, ...] = ()
    software_id: str | None = None
    software_version: str | None = None
    subject: str | None = None
    ip: str | None = None
    ip_network: str | None = None  # the IP aggregated to the configured prefix: what families and reports use
    dynamic: bool = True
    cimd: bool = False
    disabled: bool = False
    live: dict[str, int] = field(default_factory=dict)
    live_forever_only: bool = False  # live only through credentials that never expire (NULL or 0 = forever)
    total_credentials: int = 0
    last_used: float | None = None
    problems: list[str] = field(default_factory=list)
    # The latest refresh revocation within loops.lookback, when the scan reads it with the row (a revoked index
    # that is `on_rows`); otherwise the source's revoked index holds it.
    revoked_at: float | None = None


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


class Verdict(StrEnum):
    LIVE = "live"
    YOUNG = "young"
    ORPHAN = "orphan"
    ABANDONED = "abandoned"
    IDLE = "idle"
    PROTECTED = "protected"


VERDICTS = tuple(Verdict)
TIME_SAMPLES = 512


@dataclass(slots=True)
class Classified:
    """A client with its family and verdict."""

    row: ClientRow
    family: str
    verdict: Verdict
    reason: str


Rank = tuple[float, float, str]  # (registered, last credential activity, key): the newest member is the greatest


def rank_of(row: ClientRow) -> Rank | None:
    """Where a member stands in its family: by registration time, a tie broken by the newest credential activity,
    then by key. None for a row whose time cannot be trusted (it never makes a sibling look superseded)."""
    if row.created_at is None or row.problems:
        return None
    return (row.created_at, row.last_used if row.last_used is not None else float("-inf"), row.key)


def _newer(rank: Rank | None, key: str, top_rank: Rank | None, top_key: str | None) -> bool:
    """Whether a member (rank, key) goes before the newest so far: any rank beats none; between two unranked
    members the greater key wins, so the choice never depends on the order members arrive in."""
    if top_key is None:
        return True
    if rank is not None or top_rank is not None:
        return rank is not None and (top_rank is None or top_rank < rank)
    return key > top_key


@dataclass(slots=True)
class FamilyStats:
    """What one family looks like; bounded in size whatever the number of members, and independent of the
    order its members arrive in."""

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
    newest_rank: Rank | None = None
    newest_live_rank: Rank | None = None
    _times: array[float] = field(default_factory=lambda: array("d"))
    _seen_times: int = 0

    def add(
        self,
        row: ClientRow,
        rank: Rank | None,
        verdict: Verdict,
        window_start: float,
        rng: random.Random,
        new_since: float | None = None,
    ) -> None:
        """Count a member in, with its rank (`rank_of(row)`)."""
        self.members += 1
        if verdict is Verdict.ORPHAN:
            self.orphans += 1
        elif verdict is Verdict.ABANDONED:
            self.abandoned += 1
        if verdict is Verdict.LIVE:
            self.live += 1
            if _newer(rank, row.key, self.newest_live_rank, self.newest_live_key):
                self.newest_live_client_id, self.newest_live_key, self.newest_live_rank = row.client_id, row.key, rank
        if rank is None:
            if self.newest_rank is None and _newer(None, row.key, None, self.newest_key):
                self.newest_client_id, self.newest_key = row.client_id, row.key
                self.name = row.name
            return  # an unreadable row (a future time, say) must never make its siblings look superseded
        if self.newest_rank is None or self.newest_rank < rank:
            self.newest_client_id, self.newest_key, self.newest_rank = row.client_id, row.key, rank
            self.name = row.name  # a family shows its newest member's name, as stored
        t = row.created_at
        assert t is not None
        if self.last_registered is None or t > self.last_registered:
            self.last_registered = t
        if self.first_registered is None or t < self.first_registered:
            self.first_registered = t
        if t >= window_start:
            self.recent += 1
        if new_since is not None:
            if t > new_since:
                self.new += 1
            elif t == new_since:
                self.tied += 1
        self._sample(t, rng)

    def _sample(self, t: float, rng: random.Random) -> None:
        # Registration times, all of them up to TIME_SAMPLES, a reservoir sample beyond: the median interval is
        # exact for families that size and an estimate for bigger ones, in fixed memory.
        self._seen_times += 1
        if len(self._times) < TIME_SAMPLES:
            self._times.append(t)
        else:
            slot = rng.randrange(self._seen_times)
            if slot < TIME_SAMPLES:
                self._times[slot] = t

    @property
    def median_interval(self) -> float | None:
        """Median seconds between consecutive registrations (None below two members)."""
        if len(self._times) < 2:
            return None
        times = sorted(self._times)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        median = statistics.median(gaps)
        if self._seen_times > len(times):  # a sample: its gaps are wider by the sampling ratio
            median *= (len(times) - 1) / (self._seen_times - 1)
        return median

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
    loop_evidence: str = ""  # "replay" or "rotation": what the profile's loop map reads (docs/loops.md)
    clock_skew: float = 0.0  # the store's clock minus the reaper's, at the scan's start
    live_forever_only: int = 0  # live clients whose every live credential never expires
    forever_fix: str = ""  # what the operator can set about it (the profile's options), for reports

    @property
    def duration(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    def churning(self) -> list[FamilyStats]:
        """Families with at least churn_min_registrations in the churn window, most first."""
        fams = [f for f in self.families.values() if f.recent >= self.churn_min_registrations]
        return sorted(fams, key=lambda f: (-f.recent, -f.members, f.id))

    def loop_rule(self) -> str:
        """What made a family a suspected loop, in words, for reports."""
        if self.loop_evidence == "rotation":
            return (
                "again and again a member's refresh token was rotated, the new one was never used, and the "
                "family registered a new client"
            )
        window = self.loop_window
        shown = f"{window / 60:.0f} minutes" if window >= 60 else f"{window:.0f} seconds"
        return (
            "again and again a member's refresh token was revoked, it kept no live credential, and the family "
            f"registered a new client within {shown}"
        )

    def top_families(self, k: int) -> list[FamilyStats]:
        """The k largest families with more than one member, by orphans then members."""
        fams = [f for f in self.families.values() if f.members > 1]
        return sorted(fams, key=lambda f: (-f.orphans, -f.members, f.id))[:k]
