"""Restore: put reaped clients back exactly as they were, from their tombstones, through any backend.

A run comes back in batches (`policy.batch_size` clients a transaction, the ledger marking each batch in the same
transaction where it shares the database), so an interrupted restore keeps what it restored, and running it again
continues where it stopped: restoring a restored run is a no-op.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from reaper.backends.base import Actor, Backend, errors
from reaper.errors import ConfigError, ReaperError, RestoreConflict, SchemaError
from reaper.ledger import Tombstone
from reaper.reaping.runner import batch_pool, frozen_heap, holding, reconcile

Progress = Callable[[int, int], None]
T = TypeVar("T")


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)  # client keys put back now
    rows: int = 0
    run_id: str | None = None
    already: int = 0  # clients of this run (or this client) restored before: nothing left to do for them
    seconds: float = 0.0


def prefetched(pages: Iterator[T]) -> Iterator[T]:
    """The next page read (and its payloads opened) in a thread while the current one is restored: the ledger's
    query and decoding overlap with the store's inserts."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    done = threading.Event()

    def reader() -> None:
        try:
            for page in pages:
                while not done.is_set():
                    try:
                        box.put((True, page), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if done.is_set():
                    return
            box.put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put((False, exc))

    thread = threading.Thread(target=reader, name="restore-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            more, item = box.get()
            if not more:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item
    finally:
        done.set()
        thread.join(timeout=5)


def _restore_pages(
    actor: Actor,
    pages: Iterator[list[Tombstone]],
    width: int,
    result: RestoreResult,
    total: int,
    progress: Progress | None,
) -> RestoreConflict | None:
    """Restore page by page, up to `width` pages at once (each its own transaction); stop at the first conflict
    and return it, once the pages in flight are done."""
    in_flight: deque[tuple[list[Tombstone], Future[int]]] = deque()
    conflict: RestoreConflict | None = None

    def collect() -> None:
        nonlocal conflict
        page, future = in_flight[0]
        try:
            rows = future.result()
        except RestoreConflict as exc:
            conflict = conflict or exc
            return
        finally:
            in_flight.popleft()
        result.rows += rows
        result.restored += [t.client_key for t in page]
        if progress:
            progress(len(result.restored), total)

    pool = batch_pool(width)
    try:
        for page in pages:
            if conflict is not None:
                break
            in_flight.append((page, pool.submit(actor.restore, page)))
            while len(in_flight) >= width:
                collect()
        while in_flight:
            collect()
    finally:
        for _page, future in in_flight:  # after an error: the batches in flight commit or roll back on their own
            future.exception()
        pool.shutdown(wait=True)
    return conflict


def restore_from_ledger(
    backend: Backend,
    run_id: str | None = None,
    client_id: str | None = None,
    progress: Progress | None = None,
    batch_size: int = 1000,
    batches_in_flight: int = 1,
) -> RestoreResult:
    """Restore every open tombstone of a run, or the latest of one client (by client_id or key); either may be
    given as a unique prefix."""
    if bool(run_id) == bool(client_id):
        raise ConfigError("restore needs exactly one of --run or --client")
    started = time.monotonic()
    problems = errors(backend.check())
    if problems:
        raise SchemaError(problems)
    with holding(backend), frozen_heap():
        ledger = backend.ledger()
        if not ledger.exists():
            raise ReaperError("no ledger found: nothing has been reaped here yet")
        if not ledger.has_restores_table():
            ledger.create()  # a ledger an older release made: its restores table, before the first restore
        actor = backend.actor()
        try:
            reconcile(actor)  # a run a crash interrupted is restorable like any other
            result = RestoreResult()
            if run_id:
                run_id = ledger.resolve_run(run_id)
                result.run_id = run_id
                ids = ledger.open_ids(run_id)
                total = len(ids)
                info = ledger.run(run_id)
                result.already = info.restored
                if total == 0:
                    if info.purged:
                        raise ReaperError(f"run {run_id}: its tombstones were purged; nothing can be restored")
                    return result
                pages = prefetched(ledger.pages(ids, max(1, batch_size)))
            else:
                assert client_id
                key = ledger.resolve_client(client_id)
                tombs = ledger.open_tombstones(keys=[key])
                if not tombs:
                    result.already = 1
                    return result
                pages = iter([tombs[-1:]])
                total = 1
            if progress:
                progress(0, total)
            width = max(1, min(batches_in_flight, actor.batches_at_once))
            conflict = _restore_pages(actor, pages, width, result, total, progress)
            if conflict is not None:
                if not result.restored:
                    raise conflict
                raise RestoreConflict(
                    f"{conflict} from one batch; the {len(result.restored)} client(s) of the other batches stay "
                    "restored: resolve the conflict and run restore again, it continues where it stopped"
                ) from None
        finally:
            actor.close()
    result.seconds = time.monotonic() - started
    return result
