"""Prometheus metrics: a private registry whose collectors read the last snapshot only (never the database).

Every metric is documented in docs/metrics.md. Client names become labels only through the bounded top-K
family list; client_ids and IPs never become labels (S8).
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reaper import __version__
from reaper.analysis.model import VERDICTS, Snapshot

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and confuse alert rules

OTHER = "other"
NO_NAME = "(no name)"
LABEL_MAX = 64
FAMILY_STATES = ("churning", "stable", "single")


def label_value(normalized_name: str) -> str:
    """A safe, bounded label value for a normalized client name."""
    if not normalized_name:
        return NO_NAME
    # Cut first: the replacement is one character for one, and a 10,000-character name must not cost a scrape
    # 10,000 category lookups.
    return "".join(
        ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else "?" for ch in normalized_name[:LABEL_MAX]
    )


def top_names(snapshot: Snapshot, k: int) -> list[str]:
    """The k normalized names with the most clients (ties broken by name), as label values."""
    sizes: Counter[str] = Counter()
    for fam in snapshot.families.values():
        sizes[label_value(fam.normalized_name)] += fam.members
    ranked = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, _ in ranked if name != OTHER][:k]


class ReaperMetrics(Collector):
    """Holds the last snapshot and the service's counters; yields metric families on scrape."""

    def __init__(self, top_k: int = 20, loop_lookback: float = 7 * 86400.0):
        self.top_k = top_k
        self.loop_lookback = loop_lookback
        # family -> its last loop step (refresh revoked), for loops.lookback: a reap removes a loop's orphans,
        # and with them its evidence in the database, not the fact that the family loops.
        self._loops: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._top: list[str] = []
        self._registrations: Counter[str] = Counter()
        self._reaped: Counter[tuple[str, str]] = Counter()
        self.scans = 0
        self.failures = 0
        self.last_scan = 0.0
        self.last_success = 0.0
        self.leader = 0
        self.scan_duration = Histogram(
            "dcr_scan_duration_seconds",
            "Wall time of a full scan and classification.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.registry.register(self)

    # -- updates (called by the service) --------------------------------------------------------------------

    def record_scan(self, snapshot: Snapshot, first: bool) -> None:
        """A successful scan: swap the snapshot in and count the registrations it observed."""
        top = top_names(snapshot, self.top_k)
        with self._lock:
            self._snapshot = snapshot
            self._top = top
            self._remember_loops(((f, lp.last_revoked_at) for f, lp in snapshot.loops.items()), snapshot.started_at)
            self.scans += 1
            self.last_scan = self.last_success = snapshot.finished_at or time.time()
            if not first:
                topset = set(top)
                for fam in snapshot.families.values():
                    if fam.new:
                        self._registrations[self._bounded(label_value(fam.normalized_name), topset)] += fam.new
        self.scan_duration.observe(snapshot.duration)

    def remember_loops(self, loops: Iterable[tuple[str, float]], now: float) -> None:
        """Loops seen before this process (the evidence past runs kept in the ledger)."""
        with self._lock:
            self._remember_loops(loops, now)

    def _remember_loops(self, loops: Iterable[tuple[str, float]], now: float) -> None:
        for family, last in loops:
            self._loops[family] = max(last, self._loops.get(family, last))
        for family in [f for f, last in self._loops.items() if last < now - self.loop_lookback]:
            del self._loops[family]

    def _bounded(self, name: str, topset: set[str]) -> str:
        # Counters keep the labels they ever had; cap them so churn in the top-K cannot grow series forever:
        # at most 2K names, plus 'other' (2K+1 label values in all, as docs/metrics.md says).
        named = len(self._registrations) - (OTHER in self._registrations)
        if name in topset and (name in self._registrations or named < 2 * self.top_k):
            return name
        return OTHER

    def record_failure(self) -> None:
        with self._lock:
            self.scans += 1
            self.failures += 1
            self.last_scan = time.time()

    def record_reaped(self, acted: Counter[tuple[str, str]]) -> None:
        with self._lock:
            self._reaped.update(acted)

    # -- scrape -------------------------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap, top, loops = self._snapshot, list(self._top), len(self._loops)
            registrations, reaped = dict(self._registrations), dict(self._reaped)
            scans, failures, last_scan, last_success, leader = (
                self.scans,
                self.failures,
                self.last_scan,
                self.last_success,
                self.leader,
            )
        info = GaugeMetricFamily(
            "dcr_build_info", "dcr-reaper build information; the value is always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "dcr_leader", "1 when this replica holds the database lock and scans and reaps.", value=leader
        )
        yield CounterMetricFamily("dcr_scans", "Scans attempted by this process.", value=scans)
        yield CounterMetricFamily(
            "dcr_scan_failures", "Scans that failed (database unreachable, schema mismatch, ...).", value=failures
        )
        yield GaugeMetricFamily(
            "dcr_last_scan_timestamp_seconds", "Unix time the last scan ended (ok or failed).", value=last_scan
        )
        yield GaugeMetricFamily(
            "dcr_last_success_timestamp_seconds", "Unix time the last successful scan ended.", value=last_success
        )
        c = CounterMetricFamily(
            "dcr_reaped_clients",
            "Clients reaped by this process, by action and reason.",
            labels=["action", "reason"],
        )
        for (action, reason), n in sorted(reaped.items()):
            c.add_metric([action, reason], n)
        yield c
        c = CounterMetricFamily(
            "dcr_registrations_observed",
            "New client registrations seen since the previous scan, by normalized client name (top K, else other).",
            labels=["family"],
        )
        for name, n in sorted(registrations.items()):
            c.add_metric([name], n)
        yield c
        if snap is None:
            return
        yield from _snapshot_metrics(snap, top, loops)


def _snapshot_metrics(snap: Snapshot, top: list[str], loops: int) -> Iterator[Metric]:
    g = GaugeMetricFamily("dcr_clients", "Clients by verdict, from the last scan.", labels=["verdict"])
    for v in VERDICTS:
        g.add_metric([str(v)], snap.by_verdict.get(v, 0))
    yield g
    states: Counter[str] = Counter()
    for fam in snap.families.values():
        if fam.recent >= snap.churn_min_registrations:
            states["churning"] += 1
        elif fam.members > 1:
            states["stable"] += 1
        else:
            states["single"] += 1
    g = GaugeMetricFamily(
        "dcr_families",
        "Families by state, from the last scan: churning (many registrations in the churn "
        "window), stable (several members), single.",
        labels=["state"],
    )
    for state in FAMILY_STATES:
        g.add_metric([state], states.get(state, 0))
    yield g
    topset = set(top)
    by_name: Counter[tuple[str, str]] = Counter()
    for fam in snap.families.values():
        name = label_value(fam.normalized_name)
        name = name if name in topset else OTHER
        by_name[(name, "live")] += fam.live
        by_name[(name, "orphan")] += fam.orphans
        by_name[(name, "abandoned")] += fam.abandoned
        by_name[(name, "all")] += fam.members
    g = GaugeMetricFamily(
        "dcr_family_clients",
        "Clients of the top-K families by normalized client name (the rest under "
        "'other'), from the last scan; verdict 'all' counts every member.",
        labels=["family", "verdict"],
    )
    for (name, verdict), n in sorted(by_name.items()):
        g.add_metric([name, verdict], n)
    yield g
    yield GaugeMetricFamily(
        "dcr_churn_window_registrations",
        "Registrations inside the churn window, summed over all families, from the last scan.",
        value=sum(f.recent for f in snap.families.values()),
    )
    yield GaugeMetricFamily(
        "dcr_suspected_reauth_loops",
        "Families whose clients lost a rotated refresh token and registered again within the loop window, "
        "seen within loops.lookback: by the last scan, or before a reap removed their evidence (docs/loops.md).",
        value=loops,
    )
    yield GaugeMetricFamily(
        "dcr_registration_floods",
        "Registration floods (many never-used registrations in seconds), from the last scan.",
        value=len(snap.floods),
    )
    yield GaugeMetricFamily(
        "dcr_problem_rows",
        "Client rows the last scan could not read (skipped, never reaped).",
        value=snap.problem_count,
    )
    yield GaugeMetricFamily("dcr_last_scan_clients", "Clients visited by the last successful scan.", value=snap.clients)
