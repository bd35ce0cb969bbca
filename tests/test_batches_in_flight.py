"""Reap batches in flight at once (`policy.batches_in_flight`): on PostgreSQL they overlap and act exactly as one at
a time does; an interrupt or a stop counts every batch that committed; SQLite still takes one at a time."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from kit.config import make_config
from kit.databases import client_ids, snapshot
from kit.ledger import runs, tombstone_count, tombstones
from kit.schemas.authlib import AuthlibDB, fill_families, reissue_client_id
from reaper.backends.sql.actor import SqlActor
from reaper.commands import apply, plan, restore
from reaper.errors import Interrupted, RestoreConflict
from reaper.ledger import decode_payload


class Overlap:
    """Wraps SqlActor.act (or .restore): records how many batches run at once, and runs a hook before the n-th."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        linger: float = 0.05,
        hook: Any = None,
        at: int = 0,
        method: str = "act",
    ):
        self.lock = threading.Lock()
        self.running = self.most = self.calls = 0
        real = getattr(SqlActor, method)

        def wrapped(actor: SqlActor, *args: Any) -> Any:
            with self.lock:
                self.calls += 1
                n = self.calls
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                if hook is not None and n == at:
                    hook()
                time.sleep(linger)  # long enough for the next batch to start beside this one
                return real(actor, *args)
            finally:
                with self.lock:
                    self.running -= 1

        monkeypatch.setattr(SqlActor, method, wrapped)


def _payloads(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT client_key, action, payload FROM dcr_reaper_tombstones"))
        return {key: (action, decode_payload(payload)) for key, action, payload in rows}


def _planned(db: Any, families: int = 10, orphans: int = 12) -> set[str]:
    fams = fill_families(AuthlibDB(db.engine), families=families, orphans_each=orphans, seed=11)
    return {c for f in fams for c in f.orphans}


def test_batches_at_once_overlap_and_act_as_one_at_a_time_does(pg_db, monkeypatch):
    planned = _planned(pg_db)
    before = snapshot(pg_db.engine)
    one = make_config(pg_db.url, policy={"batch_size": 7, "batches_in_flight": 1, "late_token_sweep": 0})
    first = apply(one, plan(one))
    assert first.total_acted == len(planned) and client_ids(pg_db.engine).isdisjoint(planned)
    alone = _payloads(pg_db.engine)
    assert restore(one, run_id=first.run_id).restored
    assert snapshot(pg_db.engine) == before
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM dcr_reaper_tombstones"))

    overlap = Overlap(monkeypatch)
    four = make_config(pg_db.url, policy={"batch_size": 7, "batches_in_flight": 4, "late_token_sweep": 0})
    second = apply(four, plan(four))
    assert overlap.most >= 2, "batches ran one at a time"
    assert second.total_acted == len(planned) and second.batches == first.batches
    assert client_ids(pg_db.engine) == client_ids(pg_db.engine) - planned
    assert _payloads(pg_db.engine) == alone, "the same clients, the same tombstones"
    (run,) = [r for r in runs(pg_db.engine) if r.id == second.run_id]
    assert (run.status, run.acted) == ("ok", len(planned))
    assert restore(four, run_id=second.run_id).restored
    assert snapshot(pg_db.engine) == before


def test_an_interrupt_with_batches_in_flight_counts_every_batch_that_committed(pg_db, monkeypatch):
    """Ctrl-C reaches the main thread (here: from its progress callback) while workers act: each batch in flight
    still commits with its tombstones, and the run's count is the tombstones' count."""
    planned = _planned(pg_db)
    overlap = Overlap(monkeypatch, linger=0.1)
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    config = make_config(pg_db.url, policy={"batch_size": 5, "batches_in_flight": 3, "late_token_sweep": 0})
    with pytest.raises(Interrupted, match="puts them back") as err:
        apply(config, plan(config), progress=progress)
    gone = planned - client_ids(pg_db.engine)
    assert overlap.calls == 5, "two batches counted, three more in flight when the interrupt came"
    assert len(gone) == 5 * 5, "the batches in flight committed"
    assert tombstone_count(pg_db.engine) == len(gone), "every deleted client has its tombstone"
    assert f"acted on {len(gone)} client(s)" in str(err.value)
    (run,) = runs(pg_db.engine)
    assert (run.status, run.acted) == ("interrupted", len(gone))


def test_a_stop_lets_the_batches_in_flight_finish_and_starts_no_more(pg_db, monkeypatch):
    planned = _planned(pg_db)
    stop = threading.Event()
    Overlap(monkeypatch, hook=stop.set, at=2)
    config = make_config(pg_db.url, policy={"batch_size": 5, "batches_in_flight": 2, "late_token_sweep": 0})
    result = apply(config, plan(config), stop=stop)
    gone = planned - client_ids(pg_db.engine)
    assert result.stopped and result.total_acted == len(gone) == tombstone_count(pg_db.engine)
    assert len(gone) <= 3 * 5, "at most the batches already in flight when the stop came, and one being refilled"
    (run,) = runs(pg_db.engine)
    assert (run.status, run.acted) == ("stopped", len(gone))


def test_sqlite_takes_one_batch_at_a_time_whatever_the_setting(sqlite_db, monkeypatch):
    planned = _planned(sqlite_db, families=4, orphans=6)
    overlap = Overlap(monkeypatch, linger=0.02)
    config = make_config(sqlite_db.url, policy={"batch_size": 4, "batches_in_flight": 4, "late_token_sweep": 0})
    result = apply(config, plan(config))
    assert result.total_acted == len(planned)
    assert overlap.most == 1 and overlap.calls == result.batches


def test_restore_takes_pages_at_once_and_a_conflict_stops_it_after_the_pages_in_flight(pg_db, monkeypatch):
    planned = _planned(pg_db, families=5, orphans=8)
    before = snapshot(pg_db.engine)
    config = make_config(pg_db.url, policy={"batch_size": 5, "batches_in_flight": 3, "late_token_sweep": 0})
    result = apply(config, plan(config))
    assert result.total_acted == len(planned)
    taken = tombstones(pg_db.engine)[6].client_id  # on the second page
    reissue_client_id(pg_db.engine, taken)
    overlap = Overlap(monkeypatch, method="restore")
    with pytest.raises(RestoreConflict, match=f"client {taken}.*the 15 client\\(s\\) of the other batches stay"):
        restore(config, run_id=result.run_id)
    assert overlap.most >= 2 and overlap.calls == 4, "pages 1 to 4 went, the conflict stopped the rest"
    assert len((planned - {taken}) & client_ids(pg_db.engine)) == 15, "the other pages' clients are back"

    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM oauth2_client WHERE client_secret = 'new'"))
    again = restore(config, run_id=result.run_id)
    assert len(again.restored) == len(planned) - 15 and again.already == 15
    assert snapshot(pg_db.engine) == before
