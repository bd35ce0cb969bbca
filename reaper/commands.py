"""The verbs, over a Config (as alembic's `command` module): what the CLI, the service and the tests call.

Each verb opens the backend the configuration names, or uses the one it is given (and then leaves it open).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from reaper.analysis.incremental import ClientState, Delta
from reaper.analysis.model import Classified, Snapshot
from reaper.analysis.pipeline import Progress
from reaper.analysis.pipeline import classified as classify_source
from reaper.backends import Backend, RunLock, open_backend
from reaper.backends.base import Finding, errors
from reaper.config import Config
from reaper.errors import ReaperError, SchemaError
from reaper.ledger import Ledger, RunInfo
from reaper.memory import cgroup_limit_bytes
from reaper.reaping import runner
from reaper.reaping.evidence import EvidenceCollector, replay
from reaper.reaping.plan import Plan, RunResult, Selection, check_actions, choose
from reaper.reaping.restore import RestoreResult, restore_from_ledger

log = logging.getLogger("reaper.commands")


@contextmanager
def _backend(config: Config, given: Backend | None) -> Iterator[Backend]:
    if given is not None:
        yield given
        return
    backend = open_backend(config)
    try:
        yield backend
    finally:
        backend.close()


def _checked(b: Backend) -> list[Finding]:
    findings = b.check()
    problems = errors(findings)
    if problems:
        raise SchemaError(problems)
    return findings


def check(config: Config, backend: Backend | None = None) -> tuple[str, list[Finding]]:
    """The preflight: every mismatch (errors) and every decision left to the operator (warnings), with fixes:
    schema, encodings, unmapped tables, indexes, refresh lifetimes, the ledger and the clocks."""
    with _backend(config, backend) as b:
        findings = b.check(deep=True)
        if not errors(findings):
            findings.append(clock_finding(config, b))
        return b.description, findings


def clock_finding(config: Config, backend: Backend) -> Finding:
    """The store's clock against ours (S9): a warning when a reap would refuse to act."""
    skew, limit = backend.now() - time.time(), config.classify.clock_skew
    said = f"the clocks of {backend.description} and this host differ by {skew:+.1f}s"
    if abs(skew) <= limit:
        return Finding("info", "clock", said)
    return Finding(
        "warning",
        "clock",
        f"{said}, more than classify.clock_skew = {limit:.0f}s: a reap refuses to act (exit 6)",
        "fix the host's time sync (NTP); raise classify.clock_skew only if the skew is known and stable",
    )


@contextmanager
def classified(
    config: Config,
    backend: Backend | None = None,
    progress: Progress | None = None,
    now: float | None = None,
    new_since: float | None = None,
    seen_at_watermark: dict[str, int] | None = None,
) -> Iterator[tuple[Iterator[Classified], Snapshot]]:
    """Scan read-only and stream classified clients; the Snapshot is complete once the stream is exhausted."""
    with _backend(config, backend) as b:
        _checked(b)
        with (
            b.scan(now) as source,
            classify_source(config, source, progress, new_since, seen_at_watermark) as result,
        ):
            yield result


def tick(
    config: Config,
    state: ClientState | None = None,
    backend: Backend | None = None,
    now: float | None = None,
    new_since: float | None = None,
    seen_at_watermark: dict[str, int] | None = None,
    stop: threading.Event | None = None,
) -> tuple[Snapshot, ClientState | None]:
    """One `serve` tick: from `state` and what changed since it, where the profile can tell (docs/deployment.md),
    else a full scan. Returns the Snapshot and the state for the next tick (None when deltas are unsound here).
    A state a failed tick was given must not be given again."""
    with _backend(config, backend) as b:
        _checked(b)
        with b.scan(now) as source:
            make_delta = getattr(b, "delta", None)  # a store that can tell what changed (the SQL backend)
            delta: Delta | None = make_delta(source) if make_delta is not None else None
            sound = delta is not None and delta.unsupported() is None and not config.ip.access_log
            if sound and state is not None:
                assert delta is not None
                snapshot = state.tick(source, delta, new_since, seen_at_watermark)
                if snapshot is not None:
                    return snapshot, state
            # A state only the next tick could use, and with full_scan_every = 1 none does.
            keep = sound and config.service.full_scan_every > 1
            fresh = ClientState(config, state_budget(config)) if keep else None
            with classify_source(
                config, fresh.watch(source) if fresh else source, None, new_since, seen_at_watermark
            ) as (stream, snapshot):
                for item in stream:
                    if stop is not None and stop.is_set():
                        raise ReaperError("stopped during scan")
                    if fresh is not None:
                        fresh.record(item)
            if fresh is not None:
                assert delta is not None
                fresh.finish(snapshot, delta)
                if fresh.over_budget:
                    _warn_over_budget(fresh.max_rss, snapshot.clients)
                    fresh = None
            return snapshot, fresh


STATE_SHARE_OF_LIMIT = 0.8  # of a memory limit: the rest is the scan's own, and the allocator's slack


def state_budget(config: Config) -> int | None:
    """Bytes of resident memory under which `serve` keeps an incremental state (None: no bound)."""
    if config.service.state_max_rss_mb is not None:
        return int(config.service.state_max_rss_mb * 2**20)
    limit = cgroup_limit_bytes()
    return int(limit * STATE_SHARE_OF_LIMIT) if limit is not None else None


_warned_over_budget: set[int] = set()


def _warn_over_budget(budget: int | None, clients: int) -> None:
    """Once per process and bound: every tick will scan fully (a state is tried again at each)."""
    if budget is None or budget in _warned_over_budget:
        return
    _warned_over_budget.add(budget)
    log.warning(
        "not keeping the state incremental ticks need: with %d clients this process's memory passed %.0f MB "
        "(service.state_max_rss_mb, by default 80%% of the memory limit); every tick scans fully. Building it takes "
        "about 85 MB plus 270 bytes a client (docs/deployment.md, 'Incremental ticks')",
        clients,
        budget / 2**20,
    )


def report(config: Config, progress: Progress | None = None, backend: Backend | None = None) -> Snapshot:
    """Scan and classify everything; return only the Snapshot."""
    with classified(config, backend, progress) as (stream, snapshot):
        for _ in stream:
            pass
    return snapshot


def plan(
    config: Config,
    backend: Backend | None = None,
    progress: Progress | None = None,
    now: float | None = None,
    selection: Selection | None = None,
    evidence: EvidenceCollector | None = None,
) -> Plan:
    """Scan read-only (S1) and account for every reapable client: acted on, or skipped and why (S3, S4). With
    `evidence`, what the scan showed is collected on the way (for `apply` to keep with the run)."""
    with _backend(config, backend) as b:
        check_actions(config, b.profile)
        with classified(config, b, progress, now=now) as (stream, snapshot):
            if evidence is not None:
                stream = evidence.tee(stream)
            the_plan = choose(config, stream, snapshot, snapshot.started_at, selection)
            if evidence is not None:
                evidence.snapshot = snapshot
            return the_plan


def apply(
    config: Config,
    the_plan: Plan,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    held_lock: RunLock | None = None,
    backend: Backend | None = None,
    evidence: EvidenceCollector | None = None,
) -> RunResult:
    """Execute a plan under the run lock (S6), in batches, tombstoning everything (S5); the evidence the plan
    collected is kept with the run."""
    record = None
    if evidence is not None and evidence.snapshot is not None:
        record = evidence.record(evidence.snapshot, (c.family for c in the_plan.candidates))
    with _backend(config, backend) as b:
        return runner.apply(config, b, the_plan, force, stop, progress, held_lock, record)


def reap(
    config: Config,
    do_apply: bool = False,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    selection: Selection | None = None,
) -> RunResult:
    """Plan (always) and, with do_apply, execute. Dry-run is the default."""
    with _backend(config, None) as b:
        evidence = EvidenceCollector()
        the_plan = plan(config, b, progress, selection=selection, evidence=evidence)
        if not do_apply:
            return RunResult(the_plan, applied=False)
        return apply(config, the_plan, force, stop, backend=b, evidence=evidence)


def statements(config: Config, the_plan: Plan, backend: Backend | None = None) -> list[list[str]]:
    """Per batch, the statements a reap of this plan would run (nothing is written)."""
    with _backend(config, backend) as b:
        size = config.policy.batch_size
        cands = the_plan.candidates
        return [b.statements(cands[i : i + size]) for i in range(0, len(cands), size)]


def restore(
    config: Config,
    run_id: str | None = None,
    client_id: str | None = None,
    backend: Backend | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore every open tombstone of a run, or of one client (by client_id or key; unique prefixes do), in
    batches of policy.batch_size; a restored run restores as a no-op."""
    with _backend(config, backend) as b:
        pol = config.policy
        return restore_from_ledger(b, run_id, client_id, progress, pol.batch_size, pol.batches_in_flight)


@dataclass
class RestorePreview:
    """What `restore` would do, read-only: the tombstones it would open (their payloads opened, so a missing or
    wrong key shows now), the rows they hold, and the clients already back in the store (a restore stops there)."""

    run_id: str | None
    clients: list[tuple[str, str]]  # (client_id, key), oldest first
    rows: dict[str, int]  # per table, the client table included
    already: int
    present: list[str]  # client_ids in the store again


def restore_preview(
    config: Config, run_id: str | None = None, client_id: str | None = None, backend: Backend | None = None
) -> RestorePreview:
    """`restore --dry-run`: read the ledger and scan the store; write nothing, take no lock."""
    if bool(run_id) == bool(client_id):
        raise ReaperError("restore needs exactly one of --run or --client")
    with _backend(config, backend) as b:
        ledger = _ledger(b)
        if run_id:
            run_id = ledger.resolve_run(run_id)
            tombs = ledger.open_tombstones(run_id=run_id)
            already = ledger.run(run_id).restored
        else:
            assert client_id
            tombs = ledger.open_tombstones(keys=[ledger.resolve_client(client_id)])[-1:]
            already = 0 if tombs else 1
        rows: dict[str, int] = {}
        for t in tombs:
            rows[b.profile.client.table] = rows.get(b.profile.client.table, 0) + 1
            for table, children in (t.payload.get("children") or {}).items():
                rows[table] = rows.get(table, 0) + len(children)
        wanted = {t.client_key for t in tombs}
        present: list[str] = []
        if wanted:
            with classified(config, b) as (stream, _):
                present = [c.row.client_id for c in stream if c.row.key in wanted]
        return RestorePreview(run_id, [(t.client_id, t.client_key) for t in tombs], rows, already, present)


def _ledger(b: Backend) -> Ledger:
    ledger = b.ledger()
    if not ledger.exists():
        raise ReaperError(f"no ledger on {b.description}: nothing has been reaped here yet")
    return ledger


def runs(config: Config, limit: int | None = 50, backend: Backend | None = None) -> list[RunInfo]:
    """The runs in the ledger, newest first; runs a crash left `running` are reconciled first (when no reaper
    holds the lock) and listed as `interrupted`, with the count their tombstones prove."""
    with _backend(config, backend) as b:
        ledger = _ledger(b)
        try:
            runner.reconciled(b)
        except ReaperError as exc:  # a role that may only read the ledger still gets the listing
            log.warning("could not reconcile interrupted runs: %s", exc)
        return ledger.list_runs(limit)


@dataclass
class RunDetail:
    info: RunInfo
    clients: list[Any]
    evidence: dict[str, Any] | None


def run_show(config: Config, run: str, limit: int | None = None, backend: Backend | None = None) -> RunDetail:
    """One run (by id or a unique prefix): its counts, its clients (tombstones without payloads), its evidence."""
    with _backend(config, backend) as b:
        ledger = _ledger(b)
        try:
            runner.reconciled(b)
        except ReaperError as exc:
            log.warning("could not reconcile interrupted runs: %s", exc)
        run_id = ledger.resolve_run(run)
        return RunDetail(ledger.run(run_id), ledger.clients_of(run_id, limit), ledger.evidence(run_id))


def past_report(config: Config, run: str, backend: Backend | None = None) -> tuple[RunInfo, Snapshot, list[Classified]]:
    """What the evidence report of a past run renders: the scan it planned from, as kept in the ledger."""
    detail = run_show(config, run, limit=1, backend=backend)
    if detail.evidence is None:
        raise ReaperError(f"run {detail.info.id} kept no evidence (runs of older releases and of the service do not)")
    snap, items = replay(detail.evidence)
    return detail.info, snap, items


def kept_loops(config: Config, since: float, backend: Backend | None = None) -> list[tuple[str, float]]:
    """The re-auth loops past runs kept as evidence in the ledger, with a last step at or after `since`:
    (family, last refresh revoked)."""
    with _backend(config, backend) as b:
        ledger = b.ledger()
        if not ledger.exists() or not ledger.has_evidence_table():
            return []
        out = []
        for info in ledger.list_runs(limit=500):
            if info.started_at < since:
                break  # newest first
            for lp in (ledger.evidence(info.id) or {}).get("loops", []):
                if lp["last_revoked_at"] >= since:
                    out.append((str(lp["family"]), float(lp["last_revoked_at"])))
        return out


def purge(config: Config, older_than: float, dry_run: bool = False, backend: Backend | None = None) -> tuple[int, int]:
    """Retention: delete tombstones and evidence older than `older_than` seconds (under the run lock, so no
    restore reads them meanwhile). Returns (tombstones, evidence records)."""
    with _backend(config, backend) as b:
        ledger = _ledger(b)
        with runner.holding(b):
            return ledger.purge(older_than, dry_run)
