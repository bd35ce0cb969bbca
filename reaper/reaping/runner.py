"""The runner: applies a plan through any backend, written once.

It owns what every store shares: the caps (S4), the run lock (S6), the run record, stop requests and a lost lock
checked between batches, pauses a stop interrupts, and the late-token sweep. The backend's actor owns the rest:
the re-check, the act and its tombstones (S2, S5).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from reaper.backends.base import Actor, Backend, BatchOutcome, RunLock, errors
from reaper.config import Config
from reaper.errors import CapExceeded, ClockSkew, Interrupted, LockHeld, ReaperError, SchemaError
from reaper.ledger import RunInfo
from reaper.reaping.plan import Plan, RunResult

log = logging.getLogger("reaper.reaping")
Progress = Callable[[int, int], None]


def pause(seconds: float, stop: threading.Event | None) -> None:
    """Sleep, but wake at once when a stop is requested."""
    if stop is None:
        time.sleep(seconds)
    else:
        stop.wait(seconds)


@contextlib.contextmanager
def holding(backend: Backend, held: RunLock | None = None) -> Iterator[RunLock]:
    """The run lock: one already held (the service keeps its lock across runs), else taken for this block."""
    if held is not None:
        yield held
        return
    lock = backend.lock()
    if not lock.try_acquire():
        raise LockHeld(f"another dcr-reaper holds the lock '{lock.name}': {lock.holder()}; doing nothing")
    try:
        yield lock
    finally:
        lock.release()


def _sweep(actor: Actor, keys: Sequence[str], reason: str) -> list[str]:
    """Restore the latest tombstone of each key a credential now references (issued after the act); those
    tombstones are marked `late`, so the run does not count them as acted on."""
    late = actor.live_now(keys)
    if not late:
        return []
    latest = {t.client_key: t for t in actor.ledger.open_tombstones(keys=list(late))}
    actor.restore(list(latest.values()))
    actor.ledger.mark_late([t.id for t in latest.values()])
    log.info("restored %d client(s): %s", len(latest), reason)
    return list(latest)


def reconcile(actor: Actor) -> list[RunInfo]:
    """What a crashed run left (call under the run lock): pending tombstones settled against the store, runs
    still `running` marked `interrupted` with the count their tombstones prove."""
    actor.recover()
    return actor.ledger.reconcile()


def reconciled(backend: Backend) -> list[RunInfo]:
    """`reconcile` when no other reaper holds the lock (then no run is really running); else nothing."""
    lock = backend.lock()
    if not lock.try_acquire():
        return []
    try:
        ledger = backend.ledger()
        if not ledger.exists() or errors(backend.check()):
            return []
        actor = backend.actor()
        try:
            return reconcile(actor)
        finally:
            actor.close()
    finally:
        lock.release()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep what exists now (the plan: a Candidate per client, the scan's families) out of the garbage collector's
    full passes while batches allocate and drop their rows: at 200k candidates those passes, rescanning the plan
    again and again, cost a quarter of the reap's time."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Inline(Executor):
    """One batch at a time, in the calling thread (a store that takes one writer at a time)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - raised again by result(), where the loop reads it
            future.set_exception(exc)
        return future


def batch_pool(width: int) -> Executor:
    """Where batches run: `width` worker threads, each batch on its own connection; in the calling thread for one."""
    return _Inline() if width == 1 else ThreadPoolExecutor(width, thread_name_prefix="dcr-batch")


def check_clock(config: Config, backend: Backend) -> float:
    """The store's clock minus ours; refuse to act when they disagree by more than classify.clock_skew (S9)."""
    skew = backend.now() - time.time()
    limit = config.classify.clock_skew
    if abs(skew) > limit:
        raise ClockSkew(
            f"the clock of {backend.description} and this host's differ by {skew:+.0f}s, more than "
            f"classify.clock_skew = {limit:.0f}s; nothing acted on (fix the host's time sync, e.g. NTP)"
        )
    return skew


def apply(
    config: Config,
    backend: Backend,
    the_plan: Plan,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    held_lock: RunLock | None = None,
    evidence: dict[str, Any] | None = None,
) -> RunResult:
    """Execute a plan under the run lock (S6), in batches, tombstoning everything (S5). `evidence` (what the
    plan's scan showed: loops, floods, families) is kept with the run, so it outlives the clients."""
    started = time.monotonic()
    check_clock(config, backend)  # first: a clock that disagrees stops everything, --force included
    if the_plan.cap_problem and not force:
        raise CapExceeded(f"{the_plan.cap_problem}; nothing reaped (raise the cap or pass --force)")
    result = RunResult(the_plan, applied=True)
    pol = config.policy
    problems = errors(backend.check())  # resolves the profile against the live store, too
    if problems:
        raise SchemaError(problems)
    with holding(backend, held_lock) as lock, frozen_heap():
        ledger = backend.ledger()
        ledger.create()  # even with nothing to act on: a ledger the reap role cannot use fails now, not later
        actor = backend.actor()
        try:
            for info in reconcile(actor):
                log.warning("run %s was interrupted; %d client(s) acted on, restorable", info.id, info.acted)
            if not the_plan.candidates:
                result.duration = time.monotonic() - started
                return result  # no run to record: a service ticking over a clean table adds none
            run_id = ledger.start_run("reap", backend.profile.name, len(the_plan.candidates))
            result.run_id = run_id
            if evidence is not None:
                ledger.add_evidence(run_id, evidence)
            status, message = "ok", ""
            done_keys: list[str] = []
            cands = the_plan.candidates
            size = pol.batch_size
            starts = iter(range(0, len(cands), size))
            width = max(1, min(pol.batches_in_flight, actor.batches_at_once))
            pool = batch_pool(width)
            in_flight: deque[tuple[int, Future[BatchOutcome]]] = deque()

            def took(start: int, outcome: BatchOutcome, sweep: bool = True) -> None:
                """A finished batch into the run's result, its deleted clients swept for late credentials."""
                result.skipped.update(outcome.skipped)
                if not outcome.done and outcome.skipped.get("locked_by_auth_server"):
                    return  # the auth server holds a row of this batch: the next run gets it (S7)
                result.batches += 1
                for c in outcome.done:
                    result.acted[(c.action, c.reason)] += 1
                deleted = [c.key for c in outcome.done if c.action in ("delete", "merge")]
                done_keys.extend(deleted)
                if deleted and sweep:
                    result.restored_late += _sweep(actor, deleted, "late credential after delete")
                if outcome.done:
                    ledger.progress(run_id, result.total_acted - len(result.restored_late))
                if progress:
                    progress(min(start + size, len(cands)), len(cands))

            def proven() -> int:
                """What the run acted on, as its tombstones prove: an interrupt can land between a batch's commit
                and its count here."""
                try:
                    return ledger.run(run_id).acted
                except Exception:  # noqa: BLE001 - the ledger unreachable: the count kept here
                    return result.total_acted - len(result.restored_late)

            def run_batch(start: int) -> BatchOutcome:
                outcome = actor.act(cands[start : start + size], run_id)
                if pol.pause and start + size < len(cands):
                    pause(pol.pause, stop)  # this connection rests before its next batch
                return outcome

            def refill() -> None:
                """Up to `width` batches at once, each its own transaction on its own connection: the database
                works on one while this process builds another's tombstones."""
                nonlocal status, message
                while len(in_flight) < width and not result.stopped:
                    start = next(starts, None)
                    if start is None:
                        return
                    if stop is not None and stop.is_set():
                        result.stopped = True
                        status, message = "stopped", "stopped on request between batches"
                    elif not lock.alive():
                        result.stopped = True
                        status, message = "stopped", "lost the lock between batches"
                    else:
                        in_flight.append((start, pool.submit(run_batch, start)))

            try:
                try:
                    refill()
                    while in_flight:
                        start, future = in_flight[0]
                        outcome = future.result()  # an interrupt here leaves the batch in flight, to be counted
                        in_flight.popleft()
                        if width > 1:
                            refill()  # the next batch starts before this one's sweep
                        took(start, outcome)
                        refill()
                finally:
                    # A batch still in flight commits or rolls back on its own: wait for it, and count it.
                    while in_flight:
                        start, future = in_flight.popleft()
                        try:
                            took(start, future.result(), sweep=False)
                        except BaseException as exc:  # noqa: BLE001 - the first error is the one raised
                            log.warning("a batch in flight ended with %s: %s", type(exc).__name__, exc)
                    pool.shutdown(wait=True)
                if done_keys and pol.late_token_sweep:
                    pause(pol.late_token_sweep, stop)  # on a stop request: sweep at once
                    left = [k for k in done_keys if k not in result.restored_late]
                    result.restored_late += _sweep(actor, left, "late credential after run")
            except KeyboardInterrupt:
                status, message = "interrupted", "interrupted by the operator (Ctrl-C)"
                n = proven()
                raise Interrupted(
                    f"interrupted: run {run_id} acted on {n} client(s) before it stopped, each with its tombstone; "
                    f"`dcr-reaper restore --run {run_id[:8]}` puts them back"
                ) from None
            except BaseException as exc:
                status, message = "failed", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                acted = result.total_acted - len(result.restored_late) if status == "ok" else proven()
                try:
                    ledger.finish_run(run_id, status, acted, message)
                except ReaperError as exc:
                    log.warning("could not record the end of run %s: %s", run_id, exc)
                except Exception as exc:  # noqa: BLE001 - the run's own error matters more
                    log.warning("could not record the end of run %s: %s", run_id, exc)
        finally:
            actor.close()
    result.duration = time.monotonic() - started
    return result
