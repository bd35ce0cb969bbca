"""The state behind `serve`'s incremental ticks: every client of the last scan, and per family what it added to
the Snapshot, so a tick re-reads only the clients that changed and re-judges only their families and the
families a member's time threshold has crossed (a grace period ended, a registration left the churn window).

The Snapshot a tick returns is the one a full scan at that moment would give: the same Classifier judges each
re-judged family whole, clean families keep what they added, and loops and floods are detected again over the
kept clients. A tick that cannot trust its state (a count that does not add up: a deletion) returns None, and the
caller scans fully. The family's median interval is the one figure that may differ: beyond TIME_SAMPLES members
it is a sample, and a sample depends on the order members were seen in.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from reaper.analysis.classify import MAX_PROBLEMS_KEPT, Classifier
from reaper.analysis.columns import Columns, Kept
from reaper.analysis.fingerprint import family_id, parts_of
from reaper.analysis.loops import LoopDetector, RevokedIndex
from reaper.analysis.model import (
    Classified,
    ClientRow,
    FamilyStats,
    FloodEvidence,
    LoopEvidence,
    Snapshot,
    Verdict,
)
from reaper.analysis.pipeline import ScanSource, with_ips
from reaper.config import Config
from reaper.memory import rss_bytes

# Seconds a watermark reaches back: a row stamped just before the last scan but committed after it (a transaction
# still open then, an application clock behind the database's) is read by the next tick all the same.
OVERLAP = 300.0


class Delta(Protocol):
    """A store's answer to "what changed since the last scan?"."""

    def unsupported(self) -> str | None:
        """None when a delta is sound for this profile, else why not."""
        ...

    def changed_keys(self, previous: float, since: float) -> set[str]: ...

    def counts(self) -> tuple[int, int]:
        """Clients, and credential rows that count toward clients' totals."""
        ...

    def rows(self, keys: Sequence[str]) -> Iterator[ClientRow]: ...

    def revoked(self, keys: Sequence[str], since: float) -> dict[str, float]: ...

    def revoked_in_seconds(self) -> bool:
        """Whether the store compares revocation times with the lookback's start cut to a whole second."""
        ...


@dataclass(slots=True)
class _Family:
    """What one family added to the last Snapshot, and until when that holds by time alone."""

    stats: FamilyStats
    members: array[int] = field(default_factory=lambda: array("i"))  # the members' slots in the Columns
    counts: dict[tuple[Verdict, str], int] = field(default_factory=dict)
    live_forever_only: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    problem_count: int = 0
    newest: float = 0.0
    newest_count: int = 0
    valid_until: float = math.inf
    loop: LoopEvidence | None = None
    flood: FloodEvidence | None = None  # a flood within the family (floods by IP prefix span families)


# Clients recorded between two readings of the process's memory while a state is built.
CHECK_MEMORY_EVERY = 4096


class ClientState:
    """Built from a full scan (`record` every classified client, then `finish`); advanced by `tick`. With a memory
    bound (`max_rss`, bytes), a build the process's resident memory outgrows is given up: `over_budget` is then set,
    nothing is kept, and the caller scans fully every tick."""

    def __init__(self, config: Config, max_rss: int | None = None):
        self.config = config
        self.max_rss = max_rss
        self.over_budget = False
        self.cols = Columns()
        self.families: dict[str, _Family] = {}
        self.now = 0.0
        self.credentials = 0  # the kept clients' credential rows, summed
        self.unreadable: set[str] = set()  # keys of rows with problems: re-read every tick
        self.dangling = 0  # credential rows no kept client accounts for (their client is gone, or never was)
        self.loop_evidence: str | None = None  # None: the profile has no loop map
        self.revoked_in_seconds = False
        self.ips = False  # rows carry registrant IPs: floods by IP prefix span families
        self.reread = 0  # the last tick's re-read clients,
        self.judged_alone = 0  # those that qualified to be judged without their family,
        self.rejudged = 0  # and the members of the families it judged whole
        self._revoked: RevokedIndex | None = None

    # -- a full scan ------------------------------------------------------------------------------------------

    def watch(self, source: ScanSource) -> ScanSource:
        """The source, with its revoked index kept here when the pipeline reads it."""
        self.ips = source.has_ips
        return _Watched(source, self)  # type: ignore[return-value]

    def record(self, item: Classified) -> None:
        """One client of the full scan, as the pipeline classified it."""
        if self.over_budget:
            return
        row = item.row
        revoked = self._revoked.at(row) if self._revoked else None
        slot = self.cols.append(row, item.family, item.verdict, _nan(revoked))
        self.credentials += row.total_credentials
        if row.problems:
            self.unreadable.add(row.key)
        self._absorb(item, slot)
        if self.max_rss is not None and slot % CHECK_MEMORY_EVERY == 0:
            self._check_memory()

    def _check_memory(self) -> None:
        rss = rss_bytes()
        if self.max_rss is not None and rss is not None and rss > self.max_rss:
            self.over_budget = True
            self._forget()

    def finish(self, snapshot: Snapshot, delta: Delta) -> None:
        """The full scan is over: keep each family's stats, loops and floods, and the counts a tick compares."""
        self._check_memory()
        if self.over_budget:
            return
        floods = {f.key: f for f in snapshot.floods if f.scope == "family"}
        for fid, fam in self.families.items():
            fam.stats = snapshot.families[fid]
            fam.loop, fam.flood = snapshot.loops.get(fid), floods.get(fid)
        self.revoked_in_seconds = delta.revoked_in_seconds()
        counts = delta.counts()
        self._close_families(self.families.values(), snapshot.started_at)
        self.now = snapshot.started_at
        self.dangling = counts[1] - self.credentials
        self._revoked = None
        # The state just built (3 objects a client) is long-lived, and the scan collected rarely: one full pass now,
        # as part of the full scan, rather than in a later tick (0.13 to 0.2 s at 100k clients).
        gc.collect()

    # -- a tick -------------------------------------------------------------------------------------------------

    def tick(
        self,
        source: ScanSource,
        delta: Delta,
        new_since: float | None,
        seen_at_watermark: dict[str, int] | None,
    ) -> Snapshot | None:
        """The Snapshot at `source.now` from what changed since the last scan; None when the state cannot be
        trusted (the caller then scans fully)."""
        now, began = source.now, time.monotonic()
        settings = self.config
        since = self.now - max(OVERLAP, settings.classify.clock_skew)
        keys = delta.changed_keys(self.now, since)
        keys |= self.unreadable  # a time in the future stops being one
        dirty = {fid for fid, fam in self.families.items() if fam.valid_until <= now}
        fresh: list[ClientRow] = list(delta.rows(sorted(keys))) if keys else []
        self.reread = len(fresh)
        if source.has_ips or settings.ip.access_log:
            fresh = list(with_ips(iter(fresh), settings, source))
        seen = {row.key for row in fresh}
        cols = self.cols
        leaving: dict[str, set[int]] = {}  # family -> slots of members that left it
        joining: list[tuple[str, int]] = []  # (family, slot): members that joined (or rejoined) it
        for key in keys - seen:  # gone: the counts below then do not add up, and the caller scans fully
            self.unreadable.discard(key)
            gone = cols.keys.find(key)
            if gone is not None:
                self.credentials -= cols.credentials(gone)
                dirty.add(cols.family(gone))
                leaving.setdefault(cols.family(gone), set()).add(gone)
                cols.drop(key)
        revoked = (
            delta.revoked(sorted(seen), now - settings.loops.lookback)
            if self.loop_evidence is not None and seen
            else {}
        )
        family_of = parts_of(settings.classify.family_components)
        # (before, now, slot): re-read members whose change may be their own
        alone: list[tuple[Kept, Kept, int]] = []
        for row in fresh:
            slot = cols.keys.find(row.key)
            old = cols.kept(slot) if slot is not None else None
            fid = family_id(family_of(row))
            client = Kept(row, fid, Verdict.PROTECTED, _nan(revoked.get(row.key)))
            slot = cols.put(row, fid, client.verdict, client.revoked, slot)
            self.credentials += row.total_credentials
            if row.problems:
                self.unreadable.add(row.key)
            else:
                self.unreadable.discard(row.key)
            if old is not None:
                self.credentials -= old.row.total_credentials
                if _siblings_unaffected(old, client):
                    alone.append((old, client, slot))
                    continue
                dirty.add(old.family)
                leaving.setdefault(old.family, set()).add(slot)
            dirty.add(fid)
            joining.append((fid, slot))
        self._move(leaving, joining)
        clients, credentials = delta.counts()
        if clients != len(cols) or credentials - self.credentials != self.dangling:
            self._forget()
            return None
        judge = Classifier(settings.classify, self._snapshot(source, now), now)
        for old, client, slot in alone:
            if client.family not in dirty and not self._judged_alone(old, client, slot, judge):
                dirty.add(client.family)  # its verdict changed: the family is judged whole
        self.judged_alone = len(alone)
        # Re-judge every member of the families that changed or that time caught up with, each family whole.
        slots = [s for fid in dirty if fid in self.families for s in self.families[fid].members]
        rejudge = [cols.row(s) for s in slots]
        slot_of = {row.key: s for row, s in zip(rejudge, slots, strict=True)}
        self.rejudged = len(rejudge)
        for fid in dirty:
            self.families.pop(fid, None)
        snapshot, scratch = self._snapshot(source, now), self._snapshot(source, now)
        touched: set[str] = set()
        for item in Classifier(settings.classify, scratch, now, new_since, seen_at_watermark).run(rejudge):
            slot = slot_of[item.row.key]
            cols.judged(slot, item.family, item.verdict)
            touched.add(item.family)
            self._absorb(item, slot)
        for fid in touched:
            self.families[fid].stats = scratch.families[fid]
        self._close_families((self.families[f] for f in touched), now)
        if settings.loops.enabled and not self.ips:
            for fid in touched:
                self._family_loops(fid, now)
        self._assemble(snapshot, touched)
        self._loop_status(snapshot)
        if settings.loops.enabled and self.ips:
            self._loops(snapshot, now)
        snapshot.finished_at = now + (time.monotonic() - began)
        self.now = now
        return snapshot

    # -- the parts --------------------------------------------------------------------------------------------

    def _move(self, leaving: dict[str, set[int]], joining: list[tuple[str, int]]) -> None:
        """Members out of the families they left, then into the ones they joined (a member may do both in one)."""
        for fid, gone in leaving.items():
            fam = self.families.get(fid)
            if fam is not None:
                fam.members = array("i", [s for s in fam.members if s not in gone])
        for fid, slot in joining:
            fam = self.families.get(fid)
            if fam is None:
                fam = self.families[fid] = _Family(FamilyStats(fid, None, ""))
            fam.members.append(slot)

    def _forget(self) -> None:
        """Drop every kept client: a state a tick could not trust is never used again, and the full scan that
        follows builds its own while the caller may still hold this one."""
        self.cols, self.families, self.unreadable = Columns(), {}, set()

    def _judged_alone(self, old: Kept, client: Kept, slot: int, judge: Classifier) -> bool:
        """Judge a re-read member without its family, which time has not caught up with: its siblings' verdicts,
        the family's stats, loop and flood hold (`_siblings_unaffected`), and so does its own verdict, or the
        family is judged whole (False). Its reason may change (an access token expired: live through the refresh
        token now), and so may whether it is live only through credentials that never expire."""
        fam = self.families[client.family]
        has_newer = fam.stats.newest_key != client.row.key  # its rank is unchanged: the family's newest is known
        verdict, reason = judge.verdict(client.row, has_newer)
        if verdict is not old.verdict:
            return False
        _, before = judge.verdict(old.row, has_newer)  # the reason it was counted under (time changed nothing)
        if (verdict, before) not in fam.counts:
            return False
        if reason != before:
            fam.counts[(verdict, before)] -= 1
            if not fam.counts[(verdict, before)]:
                del fam.counts[(verdict, before)]
            fam.counts[(verdict, reason)] = fam.counts.get((verdict, reason), 0) + 1
        if verdict is Verdict.LIVE:
            fam.live_forever_only += client.row.live_forever_only - old.row.live_forever_only
        self.cols.judged(slot, client.family, verdict)
        return True

    def _absorb(self, item: Classified, slot: int) -> None:
        fam = self.families.get(item.family)
        if fam is None:
            fam = self.families[item.family] = _Family(FamilyStats(item.family, None, ""))
        row = item.row
        fam.members.append(slot)
        key = (item.verdict, item.reason)
        fam.counts[key] = fam.counts.get(key, 0) + 1
        if row.live_forever_only and item.verdict is Verdict.LIVE:
            fam.live_forever_only += 1
        for problem in row.problems:
            fam.problem_count += 1
            if len(fam.problems) < MAX_PROBLEMS_KEPT:
                fam.problems.append((row.client_id, problem))
        created = row.created_at
        if created is not None and not row.problems:
            if created > fam.newest:
                fam.newest, fam.newest_count = created, 0
            if created == fam.newest:
                fam.newest_count += 1

    def _close_families(self, families: Iterable[_Family], now: float) -> None:
        """Until when each family's verdicts and churn count hold by time alone."""
        s = self.config.classify
        lookback = self.config.loops.lookback if self.config.loops.enabled else None
        times = self.cols.times
        for fam in families:
            until = math.inf
            for slot in fam.members:
                created, last_used, revoked = times(slot)
                if created is None:
                    continue
                # Strict thresholds (age < x) change at the threshold; others (t >= now - x) just after it.
                for at in (
                    created + s.young_for,
                    created + s.abandoned_after,
                    math.nextafter(created + s.churn_window, math.inf),
                ):
                    if now < at < until:
                        until = at
                if s.stale_after is not None:
                    last = last_used if last_used is not None else created
                    at = math.nextafter(last + s.stale_after, math.inf)
                    if now < at < until:
                        until = at
                if lookback is not None:  # leaving the loop lookback, as a registration or as a revocation
                    leave = (created + lookback, revoked + lookback)
                    for at in (*(math.nextafter(t, math.inf) for t in leave), revoked + 1 + lookback):
                        if now < at < until:
                            until = at
            fam.valid_until = until

    def _snapshot(self, source: ScanSource, now: float) -> Snapshot:
        s = self.config.classify
        return Snapshot(
            profile=source.profile_name,
            database=source.description,
            started_at=now,
            churn_window=s.churn_window,
            churn_min_registrations=s.churn_min_registrations,
            clock_skew=now - time.time(),
            forever_fix=source.forever_fix,
        )

    def _assemble(self, snapshot: Snapshot, touched: set[str]) -> None:
        """Add every family's part: re-judged families as judged now, the others as they were (nothing of theirs
        is new: every member was there at the last scan)."""
        totals: dict[tuple[Verdict, str], int] = {}  # summed here, into the Counters once: a tick's hot loop
        for fid, fam in self.families.items():
            stats = fam.stats
            if fid not in touched and (stats.new or stats.tied):
                stats = copy.copy(stats)
                stats.new = stats.tied = 0
            snapshot.families[fid] = stats
            snapshot.new_registrations += stats.new
            for key, n in fam.counts.items():
                totals[key] = totals.get(key, 0) + n
            snapshot.live_forever_only += fam.live_forever_only
            snapshot.problem_count += fam.problem_count
            if len(snapshot.problems) < MAX_PROBLEMS_KEPT:
                snapshot.problems.extend(fam.problems[: MAX_PROBLEMS_KEPT - len(snapshot.problems)])
            if fam.loop is not None:
                snapshot.loops[fid] = fam.loop
            if fam.flood is not None:
                snapshot.floods.append(fam.flood)
            if fam.newest_count:
                if fam.newest > snapshot.newest_registration:
                    snapshot.newest_registration = fam.newest
                    snapshot.newest_by_family.clear()
                if fam.newest == snapshot.newest_registration:
                    snapshot.newest_by_family[fid] += fam.newest_count
        for (verdict, reason), n in totals.items():
            snapshot.clients += n
            snapshot.by_verdict[verdict] += n
            snapshot.by_reason[(verdict, reason)] += n
        snapshot.floods.sort(key=lambda f: (-f.registrations, f.scope, f.key))

    def _loop_status(self, snapshot: Snapshot) -> None:
        settings = self.config.loops
        snapshot.loop_window = settings.window
        if not settings.enabled:
            snapshot.loop_detection = "disabled (loops.enabled = false)"
        elif self.loop_evidence is None:
            snapshot.loop_detection = f"floods only: profile '{snapshot.profile}' has no loop map"
        else:
            snapshot.loop_detection = "on"
            snapshot.loop_evidence = self.loop_evidence

    def _detector(self, slots: Iterable[int], now: float, families: dict[str, FamilyStats]) -> LoopDetector:
        """The pipeline's loop detector, given these clients (those within the lookback)."""
        settings = self.config.loops
        since = now - settings.lookback
        bound = math.floor(since) if self.revoked_in_seconds else since  # as the store's revoked index reads it
        cols = self.cols
        members = [cols.kept(s) for s in slots if (at := cols.created(s)) is not None and at >= since]
        if self.loop_evidence is None:
            revoked = RevokedIndex()
        else:
            revoked = RevokedIndex(((c.row.key, c.revoked) for c in members if c.revoked >= bound), self.loop_evidence)
        detector = LoopDetector(settings, revoked, now, families)
        for c in members:
            detector.observe(Classified(c.row, c.family, c.verdict, ""))
        return detector

    def _family_loops(self, fid: str, now: float) -> None:
        """One family's loop and flood, detected again over its members."""
        fam = self.families[fid]
        scratch = Snapshot("", "", now)
        self._detector(fam.members, now, {fid: fam.stats}).finish(scratch)
        fam.loop = scratch.loops.get(fid)
        fam.flood = next(iter(scratch.floods), None)

    def _loops(self, snapshot: Snapshot, now: float) -> None:
        """Loops and floods over every kept client: floods by IP prefix span families."""
        snapshot.loops, snapshot.floods = {}, []
        self._detector(self.cols.keys.slots(), now, snapshot.families).finish(snapshot)

    def size(self) -> int:
        """Clients kept."""
        return len(self.cols)


class _Watched:
    """A scan source whose revoked index the state keeps as the pipeline reads it. A plain instance, not a class
    made per call: such a class is a reference cycle, and its methods' closure would keep the whole state alive
    until a full garbage collection."""

    def __init__(self, source: ScanSource, state: ClientState):
        self._source = source
        self._state = state

    def __getattr__(self, name: str) -> object:
        source = self.__dict__.get("_source")  # not self._source: before __init__ (a copy) that would recurse
        if source is None:
            raise AttributeError(name)
        return getattr(source, name)

    def revoked(self, since: float) -> RevokedIndex | None:
        state = self._state
        state._revoked = self._source.revoked(since)
        state.loop_evidence = state._revoked.evidence if state._revoked is not None else None
        return state._revoked


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _siblings_unaffected(old: Kept, new: Kept) -> bool:
    """Whether a re-read member's change can reach nothing but its own verdict: the same family and rank (so its
    siblings' verdicts and the family's newest members hold), the same name and registrant IP (the family's
    shown name, floods), and for the loop detector the same revocation, whether it is live and whether it ever
    had a credential. Rows with problems never qualify."""
    a, b = old.row, new.row
    return (
        old.family == new.family
        and not a.problems
        and not b.problems
        and a.created_at is not None
        and a.created_at == b.created_at
        and a.last_used == b.last_used
        and a.client_id == b.client_id
        and a.name == b.name
        and a.ip == b.ip
        and a.ip_network == b.ip_network
        and bool(a.live) == bool(b.live)
        and bool(a.total_credentials) == bool(b.total_credentials)
        and (old.revoked == new.revoked or (math.isnan(old.revoked) and math.isnan(new.revoked)))
    )
