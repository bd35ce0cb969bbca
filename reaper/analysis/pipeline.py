"""The read-only pipeline: scan source -> classify (and loop detection) -> Snapshot (S1: nothing here writes).

A scan source is whatever a backend gives for one scan (a SQL query's rows, a key-value store's entries): this
module only sees ClientRows, so nothing here assumes SQL.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from reaper.analysis.accesslog import annotate, read_logs
from reaper.analysis.classify import Classifier
from reaper.analysis.fingerprint import ip_prefix
from reaper.analysis.loops import LoopDetector, RevokedIndex
from reaper.analysis.model import Classified, ClientRow, Snapshot
from reaper.config import Config

Progress = Callable[[int, int], None]


class ScanSource(Protocol):
    """One scan of one store, as the pipeline needs it."""

    profile_name: str
    description: str  # the store, for reports (never a password)
    has_ips: bool  # whether rows can carry a registrant IP
    now: float  # the store's clock when the scan began, epoch seconds: what verdicts are judged by (S9)
    forever_fix: str  # the profile options that give never-expiring credentials a lifetime ("" if none)

    def count(self) -> int:
        """How many clients `rows()` will yield (for progress)."""
        ...

    def revoked(self, since: float) -> RevokedIndex | None:
        """Clients whose refresh token was revoked since `since` (None: the profile has no loop map)."""
        ...

    def rows(self) -> Iterator[ClientRow]:
        """Every client with its credential facts, in whatever order the store gives them."""
        ...

    def registration_times(self) -> Iterable[float]:
        """Every client's registration time (for matching an access log; read only when one is configured)."""
        ...


def with_ips(rows: Iterator[ClientRow], config: Config, source: ScanSource) -> Iterator[ClientRow]:
    """Fill IPs from the access log where the store has none, and aggregate each to its network."""
    ip = config.ip
    if ip.access_log:
        requests = read_logs(ip.access_log, ip.registration_path, ip.format)
        rows = annotate(rows, requests, sorted(source.registration_times()), ip.window)
    v4, v6 = config.classify.ip_prefix_v4, config.classify.ip_prefix_v6
    for row in rows:
        if row.ip:
            row.ip_network = ip_prefix(row.ip, v4, v6)
        yield row


def _detector(config: Config, source: ScanSource, now: float, snapshot: Snapshot) -> LoopDetector | None:
    settings = config.loops
    snapshot.loop_window = settings.window
    if not settings.enabled:
        snapshot.loop_detection = "disabled (loops.enabled = false)"
        return None
    revoked = source.revoked(now - settings.lookback)
    if revoked is None:
        snapshot.loop_detection = f"floods only: profile '{source.profile_name}' has no loop map"
        revoked = RevokedIndex()
    else:
        snapshot.loop_detection = "on"
        snapshot.loop_evidence = revoked.evidence
    return LoopDetector(settings, revoked, now, snapshot.families)


# A scan allocates a few container objects a client and drops most of them at once (no cycles): at the default
# gen-0 threshold (700) the collector ran about 200 times at 100k clients, two of them full passes over the whole
# heap, 0.2 to 0.35 s of a 1.6 s scan's CPU; at this threshold it runs a handful of times at most (30 ms).
SCAN_GC_THRESHOLD = 100_000


class _FewCollections:
    """The collector's gen-0 threshold while scans run: raised when the first starts, put back when the last ends
    (scans may overlap in threads). A process that turned automatic collection off (threshold 0) keeps it off."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.saved = gc.get_threshold()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.running == 0:
                self.saved = gc.get_threshold()
                if self.saved[0]:
                    gc.set_threshold(max(self.saved[0], SCAN_GC_THRESHOLD), *self.saved[1:])
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    gc.set_threshold(*self.saved)


few_collections = _FewCollections()


@contextmanager
def classified(
    config: Config,
    source: ScanSource,
    progress: Progress | None = None,
    new_since: float | None = None,
    seen_at_watermark: dict[str, int] | None = None,
) -> Iterator[tuple[Iterator[Classified], Snapshot]]:
    """Stream classified clients; the Snapshot is complete once the stream is exhausted."""
    now = source.now
    began = time.monotonic()
    snapshot = Snapshot(
        profile=source.profile_name,
        database=source.description,
        started_at=now,
        churn_window=config.classify.churn_window,
        churn_min_registrations=config.classify.churn_min_registrations,
        clock_skew=now - time.time(),
        forever_fix=source.forever_fix,
    )
    total = source.count() if progress else 0
    detector = _detector(config, source, now, snapshot)
    rows = source.rows()
    if source.has_ips or config.ip.access_log:
        rows = with_ips(rows, config, source)
    stream = Classifier(config.classify, snapshot, now, new_since, seen_at_watermark).run(rows)
    observe = detector.observe if detector is not None else None

    def counted() -> Generator[Classified, None, None]:
        for n, item in enumerate(stream, 1):
            if progress and n % 1000 == 0:
                progress(n, total)
            if observe is not None:
                observe(item)
            yield item
        if progress:
            progress(snapshot.clients, total)
        if detector is not None:
            detector.finish(snapshot)
        snapshot.finished_at = now + (time.monotonic() - began)

    outer = counted()
    try:
        with few_collections():
            yield outer, snapshot
    finally:
        # Close the generators (and so the store's cursor) while the source is still open, even when the
        # consumer stopped early (a broken pipe, a stop request).
        outer.close()
        stream.close()
