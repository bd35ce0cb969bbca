"""Classify: one verdict with a reason per client, and statistics per family, in one streaming pass.

Clients arrive in any order (the scan does not sort). Most verdicts do not depend on the family; the ones that
do (orphan or idle: is there a newer member?) wait until the answer is known, and only one client per family
ever waits: the newest seen so far. When a newer member arrives the waiting one is settled (it has a newer
sibling); at the end of the stream each family's waiting member is the newest, and is settled too. Memory is one
small record per family, never one per client.
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Generator, Iterable

from reaper.analysis.fingerprint import family_id, normalize_name, parts_of
from reaper.analysis.model import Classified, ClientRow, FamilyStats, Rank, Snapshot, Verdict, rank_of
from reaper.config import ClassifyConfig

MAX_PROBLEMS_KEPT = 1000


class Classifier:
    """Consumes scanned clients in any order; yields Classified and fills a Snapshot."""

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
        self.stale_before = now - settings.stale_after if settings.stale_after is not None else None
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
            if row.live_forever_only and has_newer and self.stale_before is not None:
                last = row.last_used if row.last_used is not None else row.created_at
                if last is not None and last < self.stale_before:
                    return Verdict.ORPHAN, "stale"  # superseded, alive only because its tokens never expire
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

    def waits(self, row: ClientRow) -> bool:
        """Whether this client's verdict depends on a newer family member existing."""
        if row.problems or row.cimd or not row.dynamic or row.created_at is None:
            return False
        if row.live:
            return row.live_forever_only and self.stale_before is not None
        return row.total_credentials > 0 and self.now - row.created_at >= self.s.young_for

    def run(self, rows: Iterable[ClientRow]) -> Generator[Classified, None, None]:
        snap = self.snapshot
        parts_of_row = parts_of(self.s.family_components)
        by_parts: dict[tuple[object, ...], FamilyStats] = {}  # one entry per family
        best: dict[str, Rank] = {}  # family -> the rank of its newest member so far
        # family -> its newest member so far (and its rank), when its verdict waits on that
        waiting: dict[str, tuple[ClientRow, Rank]] = {}
        counts: dict[tuple[Verdict, str], int] = {}
        window_start, rng, new_since = self.window_start, self.rng, self.new_since
        verdict_of, waits = self.verdict, self.waits

        def settle(row: ClientRow, rank: Rank | None, fam: FamilyStats, has_newer: bool) -> Classified:
            verdict, reason = verdict_of(row, has_newer)
            fam.add(row, rank, verdict, window_start, rng, new_since)
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
            if row.live_forever_only and verdict is Verdict.LIVE:
                snap.live_forever_only += 1
            if row.problems:
                for problem in row.problems:
                    snap.problem_count += 1
                    if len(snap.problems) < MAX_PROBLEMS_KEPT:
                        snap.problems.append((row.client_id, problem))
            return Classified(row, fam.id, verdict, reason)

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
                fid = fam.id
                rank = rank_of(row)
                top = best.get(fid)
                if rank is not None and (top is None or rank > top):
                    best[fid] = rank
                    older = waiting.pop(fid, None)
                    if older is not None:
                        yield settle(older[0], older[1], fam, True)  # this row is newer than the one that waited
                    has_newer = False
                else:
                    has_newer = top is not None
                if has_newer or rank is None or not waits(row):
                    yield settle(row, rank, fam, has_newer)
                else:
                    waiting[fid] = (row, rank)  # the newest so far: its verdict waits for the end of the stream
            families = {f.id: f for f in by_parts.values()}
            for fid, (row, rank) in waiting.items():
                yield settle(row, rank, families[fid], False)  # the newest of its family
            waiting.clear()
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
