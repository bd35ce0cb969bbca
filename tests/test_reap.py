"""Reap safely (S2–S6): races with a live token writer, kill -9 mid-run, two reapers at once, caps and
protections, restore round trips, merge with a custom profile, and throughput — on PostgreSQL and SQLite.

Every scenario is one where deleting would be the easy mistake; each asserts what survived, what went, and
that everything that went left a tombstone.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kit.cli import kill9, poll, run_cli, start_cli
from kit.config import make_config, write_config
from kit.databases import child_counts, client_ids, has_table, server_db, snapshot, writer_engine
from kit.ledger import runs, tombstone_count, tombstones
from kit.plugin import database_fixture
from kit.schemas.authlib import DAY, HOUR, TABLES, AuthlibDB, authlib_usable, fill_families, reissue_client_id
from reaper.analysis.model import Verdict
from reaper.backends import Candidate
from reaper.commands import apply, classified, plan, restore
from reaper.demo import CHURN_NAME, CHURN_REGISTRATIONS, build_demo
from reaper.errors import CapExceeded, ReaperError, RestoreConflict
from reaper.ledger import decode_payload, decode_row


@database_fixture("postgresql")
def ledger_pg():
    """A second fresh PostgreSQL database, for a ledger kept apart from the auth database."""
    yield from server_db("postgresql")


def reap_args(url: str, config_path: Path, *extra: str, profile: str = "authlib") -> list[str]:
    """`dcr-reaper reap --apply` on `url` with this configuration file."""
    args = ["reap", "--apply", "--no-progress", "--profile", profile, "--database-url", url]
    return [*args, "--config", str(config_path), *extra]


def _open_tombs(engine: sa.Engine, prefix: str = "dcr_reaper_") -> dict[str, list[Any]]:
    """client_id -> its done, unrestored tombstones."""
    out: dict[str, list[Any]] = {}
    for t in tombstones(engine, prefix):
        if t.state == "done" and t.restored_at is None:
            out.setdefault(t.client_id, []).append(t)
    return out


def _assert_gone_with_tombstone(engine: sa.Engine, gone: set[str], ledger: sa.Engine | None = None) -> None:
    """Each reaped client: no row, no child left, exactly one open tombstone in state done."""
    present = client_ids(engine)
    children = child_counts(engine)
    open_tombs = _open_tombs(ledger or engine)
    for cid in gone:
        assert cid not in present, cid
        assert children.get(cid, 0) == 0, f"{cid}: deleted client left child rows behind"
        assert len(open_tombs.get(cid, [])) == 1, f"{cid}: one open tombstone expected: {open_tombs.get(cid)}"


# Where client_id sits in `SELECT *` of each table (the mixins' column order; checked in _check_columns).
CID = {"oauth2_client": 1, "oauth2_token": 2, "oauth2_code": 3, "app_client": 1, "app_token": 1, "app_consent": 1}


def _rows_of(snap: dict[str, list[tuple[Any, ...]]], keep: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    """The snapshot restricted to rows of these client_ids."""
    return {t: [r for r in rows if r[CID[t]] in keep] for t, rows in snap.items()}


def _check_columns(engine: sa.Engine, tables: tuple[str, ...] = TABLES) -> None:
    for t in tables:
        assert _col(t, "client_id", engine) == CID[t]


def _col(table: str, name: str, engine: sa.Engine) -> int:
    cols = [c["name"] for c in sa.inspect(engine).get_columns(table)]
    return cols.index(name)


def test_fixture_orphans_are_dead_by_authlibs_own_rules(sqlite_db):
    """The fixtures mean what they say: every token of an orphan is unusable to Authlib, each survivor holds
    a usable one, and the reaper plans exactly the orphans."""
    adb = AuthlibDB(sqlite_db.engine)
    fams = fill_families(adb, families=3, orphans_each=6, seed=3)
    orphans = {c for f in fams for c in f.orphans}
    usable = {
        cid: [authlib_usable(r) for r in adb.token_rows.values() if r["client_id"] == cid]
        for f in fams
        for cid in [*f.orphans, f.survivor]
    }
    assert all(usable[c] and not any(usable[c]) for c in orphans)
    assert all(any(usable[f.survivor]) for f in fams)
    assert {c.client_id for c in plan(make_config(sqlite_db.url)).candidates} == orphans


# --- 1. Race (S2): a token issued during the apply keeps its client ---------------------------------------


class TokenWriter(threading.Thread):
    """The auth server's token endpoint: read the client (as Authlib's query_client does), think, insert a
    fresh live token, commit. Targets the batches the reaper is about to reach, and random planned clients."""

    def __init__(self, url: str, targets: list[str], batch: int, seed: int, lock_some: bool):
        super().__init__(daemon=True)
        self.engine = writer_engine(url)
        self.targets = targets
        self.batch = batch
        self.rng = random.Random(seed)
        self.lock_some = lock_some
        self.position = 0
        self.stop = threading.Event()
        self.issued: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self._n = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.issue_one()
                time.sleep(self.rng.random() * 0.004)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def issue_one(self) -> None:
        if self.rng.random() < 0.7:
            lo = self.position
            window = self.targets[lo : lo + 2 * self.batch] or self.targets
            cid = self.rng.choice(window)
        else:
            cid = self.rng.choice(self.targets)
        self._n += 1
        access = f"race-{self._n}-{self.rng.getrandbits(64):016x}"
        lock = " FOR KEY SHARE" if self.lock_some and self.rng.random() < 0.3 else ""
        with self.engine.begin() as conn:
            found = conn.execute(sa.text(f"SELECT id FROM oauth2_client WHERE client_id = :c{lock}"), {"c": cid})
            if found.first() is None:
                return  # invalid_client: the reaper got there first
            time.sleep(self.rng.random() * 0.003)  # the server checks the grant, signs the token ...
            conn.execute(
                sa.text(
                    "INSERT INTO oauth2_token (client_id, token_type, access_token, refresh_token, scope,"
                    " issued_at, access_token_revoked_at, refresh_token_revoked_at, expires_in)"
                    " VALUES (:c, 'Bearer', :a, NULL, 'openid', :now, 0, 0, 3600)"
                ),
                {"c": cid, "a": access, "now": int(time.time())},
            )
        self.issued.append((cid, access))

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.engine.dispose()


def _race_round(db, seed: int) -> dict[str, int]:
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=14, orphans_each=15, seed=seed)  # 210 orphans
    _check_columns(db.engine)
    orphans = {c for f in fams for c in f.orphans}
    survivors = {f.survivor for f in fams}
    config = make_config(db.url, policy={"batch_size": 10, "pause": 0.01, "late_token_sweep": 0.5})
    the_plan = plan(config)
    planned = [c.client_id for c in the_plan.candidates]
    assert set(planned) == orphans and the_plan.cap_problem is None

    writer = TokenWriter(db.url, planned, 10, seed, lock_some=db.kind == "postgresql")

    def progress(done: int, total: int) -> None:
        writer.position = done
        if done >= total:
            writer.finish()  # every token the server issues is committed before the final late-token sweep

    writer.start()
    started = time.monotonic()
    try:
        result = apply(config, the_plan, progress=progress)
    finally:
        writer.finish()
    print(f"apply took {time.monotonic() - started:.2f}s, {len(writer.issued)} tokens issued")
    if writer.error is not None:
        raise writer.error

    present = client_ids(db.engine)
    tokened = {cid for cid, _ in writer.issued}
    assert tokened, "the writer issued no token at all"
    assert tokened <= present, f"clients that got a live token were deleted: {sorted(tokened - present)}"
    with db.engine.connect() as conn:
        kept_tokens = {
            r[0]
            for r in conn.execute(sa.text("SELECT access_token FROM oauth2_token WHERE access_token LIKE 'race-%'"))
        }
    assert {a for _, a in writer.issued} <= kept_tokens, "an issued token disappeared"
    assert survivors <= present
    gone = set(planned) - present
    assert set(planned) & present <= tokened, "a planned client survived without having received a token"
    _assert_gone_with_tombstone(db.engine, gone)
    restored = {t.client_id for t in tombstones(db.engine) if t.restored_at is not None}
    assert restored == set(result.restored_late) and restored <= tokened
    # A client put back by the late sweep is marked `late`: not acted on.
    assert all(t.state == ("late" if t.client_id in restored else "done") for t in tombstones(db.engine))
    assert result.total_acted - len(result.restored_late) == len(gone)
    return {
        "planned": len(planned),
        "gone": len(gone),
        "tokened": len(tokened & set(planned)),
        "skipped": sum(result.skipped.values()),
        "restored_late": len(result.restored_late),
    }


def _drop_everything(engine: sa.Engine) -> None:
    md = sa.MetaData()
    md.reflect(engine)
    md.drop_all(engine)


@pytest.mark.slow
def test_race_token_writer_during_apply(db):
    rounds = 5 if db.kind == "postgresql" else 1  # SQLite serializes writers: one round says it all
    totals: Counter[str] = Counter()
    for r in range(rounds):
        if r:
            _drop_everything(db.engine)
        stats = _race_round(db, seed=1000 + r)
        print(f"race round {r} on {db.kind}: {stats}")
        totals.update(stats)
    # The writer really raced the reaper: some planned clients got a token and survived it.
    assert totals["tokened"] > 0 and totals["skipped"] + totals["restored_late"] > 0
    assert totals["gone"] > 0


def test_token_issued_after_delete_is_restored_by_late_sweep(db):
    """The auth server read the client just before the delete committed and inserted a token just after:
    nothing in the schema stops it, so the reaper's late-token sweep must put the client back."""
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=2, orphans_each=6, seed=5)
    before = snapshot(db.engine)
    config = make_config(db.url, policy={"batch_size": 4, "late_token_sweep": 0.2})
    the_plan = plan(config)
    victim = the_plan.candidates[0].client_id
    late: list[str] = []

    def progress(done: int, total: int) -> None:
        if not late:
            assert victim not in client_ids(db.engine), "the first batch deleted it"
            with db.engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "INSERT INTO oauth2_token (client_id, token_type, access_token, scope, issued_at,"
                        " access_token_revoked_at, refresh_token_revoked_at, expires_in)"
                        " VALUES (:c, 'Bearer', 'late-token', 'openid', :now, 0, 0, 3600)"
                    ),
                    {"c": victim, "now": int(time.time())},
                )
            late.append(victim)

    result = apply(config, the_plan, progress=progress)

    assert result.restored_late == [victim]
    after = snapshot(db.engine)
    orig = _rows_of(before, {victim})
    mine = _rows_of(after, {victim})
    assert mine["oauth2_client"] == orig["oauth2_client"], "restored column for column"
    assert mine["oauth2_code"] == orig["oauth2_code"]
    at = _col("oauth2_token", "access_token", db.engine)
    assert sorted(mine["oauth2_token"]) == sorted(
        orig["oauth2_token"] + [r for r in mine["oauth2_token"] if r[at] == "late-token"]
    )
    (tomb,) = [t for t in tombstones(db.engine) if t.client_id == victim]
    assert tomb.restored_at is not None
    others = {c for f in fams for c in f.orphans} - {victim}
    _assert_gone_with_tombstone(db.engine, others)
    (run,) = runs(db.engine)
    status, acted = run.status, run.acted
    assert (status, acted) == ("ok", len(others))


# --- 2. Crash (S5): kill -9 mid-run ---------------------------------------------------------------------


def _pg_sleep_trigger(engine: sa.Engine, table: str, seconds: float, deferred: bool = False, when: str = "") -> None:
    """A slow auth database: each delete (or, deferred, each commit) of `table` rows takes a while."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE OR REPLACE FUNCTION slow_{table}() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
            )
        )
        if deferred:
            conn.execute(
                sa.text(
                    f"CREATE CONSTRAINT TRIGGER slow_{table} AFTER DELETE ON {table} "
                    f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    f"EXECUTE FUNCTION slow_{table}()"
                )
            )
        elif when:
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER slow_{table} AFTER UPDATE ON {table} FOR EACH ROW "
                    f"WHEN ({when}) EXECUTE FUNCTION slow_{table}()"
                )
            )
        else:
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER slow_{table} AFTER DELETE ON {table} FOR EACH STATEMENT "
                    f"EXECUTE FUNCTION slow_{table}()"
                )
            )


def _drop_trigger(engine: sa.Engine, table: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TRIGGER slow_{table} ON {table}"))


def _sleeping_backends(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event = 'PgSleep'"
                )
            ).scalar_one()
        )


def _wait_pg_quiet(*engines: sa.Engine) -> None:
    """Until the killed process's backends have noticed and rolled back (they hold row locks until then)."""

    def quiet() -> bool:
        for engine in engines:
            with engine.connect() as conn:
                busy = conn.execute(
                    sa.text(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
                    )
                ).scalar_one()
                locks = conn.execute(
                    sa.text(
                        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                ).scalar_one()
                if busy or locks:
                    return False
        return True

    poll(quiet, 30, "the killed reaper's backends to go away")


def _assert_no_half_deleted(
    engine: sa.Engine, before: dict[str, list[tuple[Any, ...]]], planned: set[str], ledger: sa.Engine | None = None
) -> set[str]:
    """Each client is either whole (row and every child) or gone with all its children and a tombstone that
    holds exactly its rows. Returns the clients gone."""
    original = {r[1] for r in before["oauth2_client"]}
    present = client_ids(engine)
    gone = original - present
    assert gone <= planned, f"unplanned clients vanished: {sorted(gone - planned)}"
    now = snapshot(engine)
    assert now == _rows_of(before, present), "a client still present lost (or gained) rows"
    _assert_gone_with_tombstone(engine, gone, ledger)
    # The tombstone holds the client row and every child row, exactly.
    with (ledger or engine).connect() as conn:
        payloads = {
            cid: decode_payload(p)
            for cid, p in conn.execute(
                sa.text(
                    "SELECT client_id, payload FROM dcr_reaper_tombstones WHERE state = 'done' AND restored_at IS NULL"
                )
            )
        }
    orig_rows = _rows_of(before, gone)
    for cid in gone:
        payload = payloads[cid]
        assert decode_row(payload["client"])["client_id"] == cid
        for table in ("oauth2_token", "oauth2_code"):
            want = sorted(r[0] for r in orig_rows[table] if r[CID[table]] == cid)
            got = sorted(decode_row(r)["id"] for r in payload["children"].get(table, []))
            assert got == want, f"{cid}: tombstone children of {table}"
    return gone


@pytest.mark.slow
def test_kill9_mid_run_leaves_no_half_deleted_client(db, tmp_path):
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=8, orphans_each=10, seed=21)
    planned = {c for f in fams for c in f.orphans}
    before = snapshot(db.engine)
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 4, "pause": 0.03})
    args = reap_args(db.url, cfg, "--format", "json")
    journal = Path(db.url.removeprefix("sqlite:///") + "-journal") if db.kind == "sqlite" else None
    if db.kind == "postgresql":
        _pg_sleep_trigger(db.engine, "oauth2_client", 0.15)  # each batch's client DELETE takes 150 ms

    proc = start_cli(args, tmp_path)
    try:
        poll(lambda: tombstone_count(db.engine) >= 8, 60, "some batches to commit", proc=proc, interval=0.01)
        # Kill inside a batch's transaction: children already deleted, the client DELETE running.
        if db.kind == "postgresql":
            poll(lambda: _sleeping_backends(db.engine) > 0, 10, "a batch mid-transaction", proc=proc, interval=0.01)
        else:
            assert journal is not None
            # A kill between batches (no journal seen within 3 s) would prove the same invariant, less sharply.
            give_up = time.monotonic() + 3
            poll(
                lambda: journal.exists() or proc.poll() is not None or time.monotonic() > give_up,
                10,
                "a batch mid-transaction (a hot journal)",
                interval=0.0005,
            )
    finally:
        kill9(proc)
    if journal is not None:
        print(f"killed with a hot journal (mid-transaction): {journal.exists()}")
    if db.kind == "postgresql":
        _wait_pg_quiet(db.engine)
        _drop_trigger(db.engine, "oauth2_client")

    gone = _assert_no_half_deleted(db.engine, before, planned)
    assert 0 < len(gone) < len(planned), "killed mid-run"
    (run,) = runs(db.engine)
    assert run.status == "running", "the killed run never finished"

    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["planned"] == len(planned) - len(gone)
    assert client_ids(db.engine) == {f.survivor for f in fams}
    _assert_gone_with_tombstone(db.engine, planned)
    survivors_rows = _rows_of(before, {f.survivor for f in fams})
    assert snapshot(db.engine) == survivors_rows, "survivors untouched"


@pytest.mark.slow
def test_kill9_with_separate_ledger_reconciles_pending(pg_db, ledger_pg, tmp_path):
    """Pending tombstones are committed to the ledger before the delete commits. kill -9 in the delete's
    commit leaves them pending for clients that are still there (void); kill -9 after the commit, before they
    are marked done, leaves them pending for clients that are gone (done). The next run tells them apart."""
    auth, ledger = pg_db.engine, ledger_pg.engine
    adb = AuthlibDB(auth)
    fams = fill_families(adb, families=6, orphans_each=10, seed=33)
    planned = {c for f in fams for c in f.orphans}
    before = snapshot(auth)
    # One batch at a time: then every tombstone pending at the kill belongs to the batch being committed.
    policy = {"batch_size": 4, "pause": 0.02, "batches_in_flight": 1}
    cfg = write_config(tmp_path / "reaper.toml", policy, ledger_url=ledger_pg.url)
    args = reap_args(pg_db.url, cfg)

    def pending() -> list[Any]:
        return [t for t in tombstones(ledger) if t.state == "pending"]

    # Phase 1: the auth commit is slow (a deferred trigger) and the server notices a dead client within 20 ms.
    with auth.begin() as conn:
        conn.execute(sa.text(f"ALTER DATABASE {auth.url.database} SET client_connection_check_interval = 20"))
    _pg_sleep_trigger(auth, "oauth2_client", 0.1, deferred=True)
    proc = start_cli(args, tmp_path)
    try:
        poll(lambda: tombstone_count(ledger, state="done") >= 4, 60, "a batch to complete", proc=proc, interval=0.01)
        poll(lambda: bool(pending()), 30, "tombstones pending while the delete commits", proc=proc, interval=0.01)
    finally:
        kill9(proc)
    _wait_pg_quiet(auth, ledger)
    void_expected = pending()
    assert void_expected, "killed with pending tombstones"
    present = client_ids(auth)
    assert {t.client_id for t in void_expected} <= present, "the killed delete did not commit"
    assert not (_assert_no_half_deleted(auth, before, planned, ledger) & {t.client_id for t in void_expected})
    _drop_trigger(auth, "oauth2_client")
    with auth.begin() as conn:
        conn.execute(sa.text(f"ALTER DATABASE {auth.url.database} RESET client_connection_check_interval"))

    # Phase 2: the deletes commit, then marking the tombstones done is slow; kill it there.
    _pg_sleep_trigger(ledger, "dcr_reaper_tombstones", 0.1, when="OLD.state = 'pending' AND NEW.state = 'done'")
    proc = start_cli(args, tmp_path)
    try:
        poll(lambda: _sleeping_backends(ledger) > 0, 60, "a batch being marked done", proc=proc, interval=0.01)
    finally:
        kill9(proc)
    _wait_pg_quiet(auth, ledger)
    by_id = {t.id: t for t in tombstones(ledger)}
    assert all(by_id[t.id].state == "void" for t in void_expected), "run 2 voided the rolled-back tombstones"
    done_expected = pending()
    assert done_expected, "killed with pending tombstones"
    assert not ({t.client_id for t in done_expected} & client_ids(auth)), "those deletes did commit"
    _drop_trigger(ledger, "dcr_reaper_tombstones")

    # Phase 3: a clean run reconciles and finishes the job.
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr
    by_id = {t.id: t for t in tombstones(ledger)}
    assert all(by_id[t.id].state == "done" for t in done_expected)
    assert all(by_id[t.id].state == "void" for t in void_expected)
    assert not [t for t in by_id.values() if t.state == "pending"]
    assert client_ids(auth) == {f.survivor for f in fams}
    _assert_gone_with_tombstone(auth, planned, ledger)
    assert not has_table(auth, "dcr_reaper_tombstones"), "the ledger lives only in its own database"


# --- 3. One actor at a time (S6) ------------------------------------------------------------------------


@pytest.mark.slow
def test_second_reaper_exits_4_and_does_nothing(db, tmp_path):
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=5, orphans_each=10, seed=44)
    planned = {c for f in fams for c in f.orphans}
    # 13 batches, 0.35 s apart: the first is still at it while the second starts up and plans.
    cfg = write_config(tmp_path / "reaper.toml", {"batch_size": 4, "pause": 0.35})
    args = reap_args(db.url, cfg)
    first = start_cli(args, tmp_path)
    try:
        poll(lambda: tombstone_count(db.engine) > 0, 60, "the first reaper to be acting", proc=first, interval=0.01)
        second = run_cli(args, tmp_path)
        tombs_after_second = tombstone_count(db.engine)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            kill9(first)
    assert second.returncode == 4, second.stderr
    assert "holds the lock" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and second.stdout == ""
    assert first.returncode == 0, err
    assert "APPLIED" in out
    (run,) = runs(db.engine)  # the second started no run ...
    assert run.status == "ok" and run.acted == len(planned)
    assert {t.run_id for t in tombstones(db.engine)} == {run.id}  # ... and wrote no tombstone
    assert 0 < tombs_after_second < len(planned), "the second ran while the first was mid-run"
    assert client_ids(db.engine) == {f.survivor for f in fams}
    _assert_gone_with_tombstone(db.engine, planned)


# --- 4. Caps (S4) and protections (S3) -----------------------------------------------------------------


def _unchanged(db, before: dict[str, list[tuple[Any, ...]]]) -> None:
    assert snapshot(db.engine) == before
    assert tombstone_count(db.engine) == 0


@pytest.mark.slow
def test_max_per_run_acts_on_the_oldest_and_states_the_backlog(db, tmp_path):
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=3, orphans_each=5, seed=51)
    planned = {c for f in fams for c in f.orphans}
    config = make_config(db.url, policy={"max_per_run": 14})
    the_plan = plan(config)
    assert len(the_plan.candidates) == 14 and the_plan.backlog == 1 and the_plan.cap_problem is None
    [left] = [s.candidate for s in the_plan.skipped if s.why == "backlog"]
    oldest = min(the_plan.candidates, key=lambda c: c.created_at or 0)
    assert (left.created_at or 0) >= max(c.created_at or 0 for c in the_plan.candidates) >= (oldest.created_at or 0)

    cfg = write_config(tmp_path / "reaper.toml", {"max_per_run": 14})
    dry = [a for a in reap_args(db.url, cfg) if a != "--apply"]
    res = run_cli(dry, tmp_path)  # the dry run says what is left and why
    assert res.returncode == 0, res.stderr
    assert "BACKLOG: 1 reapable clients left after this run" in res.stdout
    assert "skipped 1: beyond policy.max_per_run" in res.stdout

    result = apply(config, the_plan)
    assert result.total_acted == 14
    second = plan(config)  # the next run works the backlog down
    assert [c.client_id for c in second.candidates] == [left.client_id] and second.backlog == 0
    apply(config, second)
    _assert_gone_with_tombstone(db.engine, planned)
    assert client_ids(db.engine) == {f.survivor for f in fams}


def _broken_profile(tmp_path: Path) -> str:
    """The authlib profile with its token liveness misread (every token dead): what a misconfigured profile does."""
    text = (Path(__file__).resolve().parents[1] / "reaper/profiles/builtin/authlib.toml").read_text("utf-8")
    start = text.index('name = "token"')
    live = text.index("live = {", start)
    end = text.index("[[credentials]]", live)
    broken = text[:live] + 'live = { is_null = "access_token" }\n\n' + text[end:]
    path = tmp_path / "broken.toml"
    path.write_text(broken.replace('name = "authlib"', 'name = "authlib-broken"'), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_the_circuit_breaker_stops_a_profile_that_reads_live_clients_as_dead(db, tmp_path):
    """Ten families of two members, every member used five minutes ago: with a profile that misreads tokens, the
    older member of each looks like an orphan. The plan would act on ten of the twenty active clients: it stops."""
    adb = AuthlibDB(db.engine)
    now = time.time()
    for f in range(10):
        for m in range(2):
            cid = f"c{f}-{m}"
            adb.client(cid, f"App {f}", [f"http://localhost:{51000 + f * 10 + m}/cb"], int(now - (12 - m) * DAY))
            adb.token(cid, int(now - 300), 3600)
    adb.flush()
    assert plan(make_config(db.url)).candidates == [], "the real profile sees every client live"
    before = snapshot(db.engine)
    broken = make_config(db.url, profile=_broken_profile(tmp_path), policy={"max_fraction": 0.25})
    the_plan = plan(broken)
    assert len(the_plan.candidates) == 10 and the_plan.active_planned == 10 and the_plan.active_clients == 20
    assert "circuit breaker" in (the_plan.cap_problem or "")
    with pytest.raises(CapExceeded, match="circuit breaker"):
        apply(broken, the_plan)
    _unchanged(db, before)
    res = run_cli(
        ["reap", "--apply", "--profile", _broken_profile(tmp_path), "--database-url", db.url, "--no-progress"], tmp_path
    )
    assert res.returncode == 5 and "circuit breaker" in res.stderr and "--force" in res.stderr, res.stderr
    _unchanged(db, before)
    assert apply(broken, the_plan, force=True).total_acted == 10  # the operator's call


def test_a_table_full_of_junk_is_worked_down_without_tripping_the_breaker(db):
    """90 % junk (old orphans whose tokens died long ago) next to live clients: no breaker, the oldest first."""
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=6, orphans_each=15, seed=53)
    config = make_config(db.url, policy={"max_per_run": 40})
    the_plan = plan(config)
    assert the_plan.cap_problem is None and the_plan.active_planned == 0
    assert len(the_plan.candidates) == 40 and the_plan.backlog == 50
    assert the_plan.reapable == len(the_plan.candidates) + len(the_plan.skipped)
    assert sum(len(f.orphans) for f in fams) == 90


def test_allowlisted_clients_never_reaped(db):
    adb = AuthlibDB(db.engine)
    rng = random.Random(61)
    notes = adb.family("Claude Code (notes)", 5, rng)
    acme = adb.family("Acme Sync (laptop)", 4, rng)
    other = adb.family("Claude Code (wiki)", 3, rng)
    adb.flush()
    before = snapshot(db.engine)
    kept_id = notes.orphans[2]
    config = make_config(db.url, classify={"allow_client_ids": [kept_id], "allow_names": ["Acme Sync*"]})

    the_plan = plan(config)
    planned = {c.client_id for c in the_plan.candidates}
    assert planned == set(notes.orphans + other.orphans) - {kept_id}
    apply(config, the_plan)

    keep = {kept_id, *acme.orphans, acme.survivor, notes.survivor, other.survivor}
    assert client_ids(db.engine) == keep
    assert snapshot(db.engine) == _rows_of(before, keep), "protected clients keep every row"
    _assert_gone_with_tombstone(db.engine, planned)
    with classified(config) as (stream, _):
        verdicts = {i.row.client_id: (i.verdict, i.reason) for i in stream}
    assert verdicts[kept_id] == (Verdict.PROTECTED, "allowlist")
    assert {verdicts[c] for c in acme.orphans} == {(Verdict.PROTECTED, "allowlist")}
    # Without the allowlist the same clients are plain orphans: reaping them would be the easy mistake.
    bare = plan(make_config(db.url))
    assert set(acme.orphans) | {kept_id} <= {c.client_id for c in bare.candidates}


def test_clients_younger_than_min_age_never_reaped(db):
    adb = AuthlibDB(db.engine)
    rng = random.Random(62)
    fam = adb.family("Claude Code (api)", 6, rng, first_age=10 * DAY, last_orphan_age=5 * HOUR)
    adb.flush()
    before = snapshot(db.engine)
    now = time.time()
    config = make_config(db.url, policy={"min_age": "3d"}, classify={"young_for": "1h"})
    created = {
        r[CID["oauth2_client"]]: r[_col("oauth2_client", "client_id_issued_at", db.engine)]
        for r in before["oauth2_client"]
    }
    young = {c for c in fam.orphans if now - created[c] < 3 * DAY}
    old = set(fam.orphans) - young
    assert young and old

    with classified(config) as (stream, _):
        verdicts = {i.row.client_id: i.verdict for i in stream}
    assert {verdicts[c] for c in young} == {Verdict.ORPHAN}, "orphans by verdict, young by age"
    assert {c.client_id for c in plan(config).candidates} == old

    # The statement is the authority: a plan made with a clock 5 days ahead lists them; the batch re-checks.
    skewed = plan(config, now=now + 5 * DAY)
    assert young <= {c.client_id for c in skewed.candidates}
    result = apply(config, skewed)
    assert result.skipped["changed_since_scan"] >= len(young)
    assert young <= client_ids(db.engine)
    assert snapshot(db.engine)["oauth2_token"] == [
        r for r in before["oauth2_token"] if r[CID["oauth2_token"]] not in old
    ]
    _assert_gone_with_tombstone(db.engine, old)


def _forged(cid: str, template: Candidate) -> Candidate:
    return Candidate(cid, cid, template.name, template.family, "orphan", "superseded", "delete", 1.0)


def test_cimd_and_static_clients_never_reaped(db):
    adb = AuthlibDB(db.engine)
    rng = random.Random(63)
    now = adb.now
    name = "Claude Code (docs)"
    cimd = [f"https://client{i}.example.com/oauth/metadata.json" for i in range(3)]
    static = [f"static-docs-{i}" for i in range(3)]
    for i, cid in enumerate(cimd):
        adb.client(cid, name, [f"http://localhost:{50000 + i}/callback"], now - (20 - i) * DAY)
        adb.dead_history(cid, now - (20 - i) * DAY, i)
    for i, cid in enumerate(static):
        adb.client(cid, name, [f"http://localhost:{51000 + i}/callback"], 0)  # Authlib's default: manual row
        adb.dead_history(cid, now - (40 - i) * DAY, i)
    fam = adb.family(name, 4, rng)  # same family: plain orphans, and a newer live survivor
    adb.flush()
    before = snapshot(db.engine)
    config = make_config(db.url)

    with classified(config) as (stream, _):
        verdicts = {i.row.client_id: (i.verdict, i.reason) for i in stream}
    assert {verdicts[c] for c in cimd} == {(Verdict.PROTECTED, "cimd")}
    assert {verdicts[c] for c in static} == {(Verdict.PROTECTED, "static")}
    the_plan = plan(config)
    assert {c.client_id for c in the_plan.candidates} == set(fam.orphans)

    # Even a plan that lists them (a bug upstream, a hand-edited plan) cannot delete them: the batch's
    # SELECT ... FOR UPDATE re-checks the CIMD and dynamic markers.
    template = the_plan.candidates[0]
    the_plan.candidates[1:1] = [_forged(c, template) for c in cimd + static]
    result = apply(config, the_plan)
    assert result.skipped["changed_since_scan"] == len(cimd) + len(static)
    keep = set(cimd) | set(static) | {fam.survivor}
    assert client_ids(db.engine) == keep
    assert snapshot(db.engine) == _rows_of(before, keep)
    assert not {t.client_id for t in tombstones(db.engine)} & keep
    _assert_gone_with_tombstone(db.engine, set(fam.orphans))


def test_survivor_of_all_dead_family_never_reaped(db):
    adb = AuthlibDB(db.engine)
    rng = random.Random(64)
    dead = adb.family("Claude Code (gone)", 4, rng, survivor=False)  # nobody live: newest is idle
    never = []
    for i in range(3):  # registered, never came back for a token: all abandoned
        cid = adb.client(
            f"never-{i}", "MCP CLI Proxy", [f"http://localhost:{52000 + i}/oauth/callback"], adb.now - (10 - i) * DAY
        )
        never.append(cid)
    adb.flush()
    before = snapshot(db.engine)
    config = make_config(
        db.url,
        policy={
            "verdicts": ["orphan", "abandoned", "idle"],
            "actions": dict.fromkeys(("orphan", "abandoned", "idle"), "delete"),
        },
    )
    with classified(config) as (stream, snap):
        verdicts = {i.row.client_id: i.verdict for i in stream}
    newest_dead, newest_never = dead.orphans[-1], never[-1]
    assert verdicts[newest_dead] is Verdict.IDLE and verdicts[newest_never] is Verdict.ABANDONED
    assert {verdicts[c] for c in never} == {Verdict.ABANDONED}

    the_plan = plan(config)
    assert the_plan.kept_survivors == 2
    planned = {c.client_id for c in the_plan.candidates}
    assert planned == set(dead.orphans[:-1]) | set(never[:-1])
    apply(config, the_plan)
    assert client_ids(db.engine) == {newest_dead, newest_never}
    assert snapshot(db.engine) == _rows_of(before, {newest_dead, newest_never})
    _assert_gone_with_tombstone(db.engine, planned)


# --- 5. Restore round trip -----------------------------------------------------------------------------


def _restore_fixture(db) -> tuple[AuthlibDB, list[Any]]:
    adb = AuthlibDB(db.engine)
    fams = fill_families(adb, families=3, orphans_each=6, seed=71)
    # Rows with every shape: unicode, NULLs, big epoch values, many children.
    rng = random.Random(72)
    odd = adb.family('Ünïcödé 客户端 "quoted" (test)', 3, rng)
    for cid in odd.orphans:
        for k in range(3):
            adb.token(
                cid,
                adb.now - 9 * DAY + k,
                2_000_000_000 if k == 2 else 60,
                refresh=bool(k % 2),
                access_revoked=adb.now - 8 * DAY,
                refresh_revoked=adb.now - 8 * DAY,
            )
    adb.flush()
    _check_columns(db.engine)
    return adb, [*fams, odd]


@pytest.mark.slow
def test_restore_puts_back_every_column(db):
    _, fams = _restore_fixture(db)
    planned = {c for f in fams for c in f.orphans}
    before = snapshot(db.engine)
    config = make_config(db.url, policy={"batch_size": 5})
    result = apply(config, plan(config))
    assert result.total_acted == len(planned) == 21
    _assert_gone_with_tombstone(db.engine, planned)

    one = sorted(planned)[3]
    res = restore(config, client_id=one)
    assert res.restored == [one] and res.rows == sum(map(len, _rows_of(before, {one}).values()))
    present = client_ids(db.engine)
    assert snapshot(db.engine) == _rows_of(before, present), "the one client is back, column for column"
    assert one in present and not (planned - {one}) & present

    res = restore(config, run_id=result.run_id)
    assert set(res.restored) == planned - {one}, "a run restore skips what is already restored"
    assert snapshot(db.engine) == before, "every table equal to before the reap, column for column"
    assert all(t.restored_at is not None for t in tombstones(db.engine))
    again = restore(config, run_id=result.run_id[:8])  # restoring a restored run: a no-op, by a prefix of its id
    assert (again.restored, again.rows, again.already) == ([], 0, len(planned))
    assert snapshot(db.engine) == before
    # The restored clients are orphans again, exactly as before.
    assert {c.client_id for c in plan(config).candidates} == planned


@pytest.mark.slow
def test_restore_refuses_on_conflict_and_restores_nothing(db):
    _, fams = _restore_fixture(db)
    planned = {c for f in fams for c in f.orphans}
    before = snapshot(db.engine)
    config = make_config(db.url)
    result = apply(config, plan(config))
    taken = sorted(planned)[0]
    reissue_client_id(db.engine, taken)
    blocked = snapshot(db.engine)

    with pytest.raises(RestoreConflict, match=f"client {taken}.*nothing restored"):
        restore(config, run_id=result.run_id)
    assert snapshot(db.engine) == blocked
    with pytest.raises(RestoreConflict):
        restore(config, client_id=taken)
    assert snapshot(db.engine) == blocked
    assert all(t.restored_at is None for t in tombstones(db.engine)), "nothing marked restored"

    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM oauth2_client WHERE client_id = :c AND client_secret = 'new'"), {"c": taken})
    restore(config, run_id=result.run_id)
    assert snapshot(db.engine) == before


@pytest.mark.slow
def test_demo_database_reaped_and_restored_through_the_cli(tmp_path):
    """The original report end to end: mcp-memory-service's SQLite file, `reap --apply`, `restore --run`."""
    path = build_demo(tmp_path / "oauth.db")
    url = f"sqlite:///{path}"
    mcp_tables = ("oauth_clients", "oauth_authorization_codes", "oauth_access_tokens", "oauth_refresh_tokens")

    def dump() -> list[str]:
        con = sqlite3.connect(path)
        try:
            # Sorted: restored rows get new (hidden) rowids, so they come back at the end of each table.
            return sorted(line for line in con.iterdump() if "dcr_reaper_" not in line)
        finally:
            con.close()

    before = dump()
    assert any("oauth_refresh_tokens" in line for line in before)
    cfg = write_config(tmp_path / "reaper.toml", {"min_age": "1h", "batch_size": 7})
    res = run_cli(reap_args(url, cfg, "--format", "json", profile="mcp-memory-service"), tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    by_reason = {(a["action"], a["reason"]): a["clients"] for a in out["acted"]}
    assert by_reason == {("delete", "superseded"): CHURN_REGISTRATIONS - 1, ("delete", "never_used"): 1}
    with sqlite3.connect(path) as con:
        names = Counter(n for (n,) in con.execute("SELECT client_name FROM oauth_clients"))
        orphans_left = {
            t: con.execute(
                f"SELECT COUNT(*) FROM {t} WHERE client_id NOT IN (SELECT client_id FROM oauth_clients)"
            ).fetchone()[0]
            for t in mcp_tables[1:]
        }
    con.close()
    assert names == {CHURN_NAME: 1, "Visual Studio Code": 1, "Cursor": 1}
    assert orphans_left == dict.fromkeys(mcp_tables[1:], 0), "no child row outlives its client"

    res = run_cli(
        [
            "restore",
            "--profile",
            "mcp-memory-service",
            "--database-url",
            url,
            "--run",
            out["run_id"],
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"restored {CHURN_REGISTRATIONS} client(s)")
    assert dump() == before, "every row back, byte for byte in SQLite's own dump"


@pytest.mark.slow
def test_failed_restore_with_separate_ledger_keeps_tombstones_open(pg_db, ledger_pg):
    """The ledger may only record a restore once the rows are back: if the auth database refuses the commit,
    the tombstones stay open and a second restore (once the database accepts it) brings everything back."""
    _, fams = _restore_fixture(pg_db)
    planned = {c for f in fams for c in f.orphans}
    before = snapshot(pg_db.engine)
    config = make_config(pg_db.url, ledger={"url": ledger_pg.url})
    result = apply(config, plan(config))
    assert {t.client_id for t in tombstones(ledger_pg.engine)} == planned
    assert not has_table(pg_db.engine, "dcr_reaper_tombstones")
    reaped = snapshot(pg_db.engine)
    with pg_db.engine.begin() as conn:  # the auth database refuses the restore's commit (e.g. a constraint)
        conn.execute(
            sa.text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'commit refused'; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON oauth2_client "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )

    with pytest.raises(ReaperError, match="commit refused"):
        restore(config, run_id=result.run_id)
    assert snapshot(pg_db.engine) == reaped, "nothing restored"
    assert all(t.restored_at is None for t in tombstones(ledger_pg.engine)), "tombstones still open"

    with pg_db.engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER refuse ON oauth2_client"))
    res = restore(config, run_id=result.run_id)
    assert set(res.restored) == planned
    assert snapshot(pg_db.engine) == before
    assert all(t.restored_at is not None for t in tombstones(ledger_pg.engine))


# --- 6. Merge with a custom profile ---------------------------------------------------------------------

INHOUSE_PROFILE = """
name = "inhouse"
description = "In-house server: clients, tokens, consents"
database = ["postgresql", "sqlite"]

[client]
table = "app_client"
key = "client_id"
client_id = "client_id"
row_id = ["pk"]
created_at = { column = "created_at", encoding = "timestamp" }
name = { column = "name" }
redirect_uris = { column = "redirect_uris", format = "json" }

[[credentials]]
name = "token"
table = "app_token"
ref = "client_id"
kind = "token"
issued_at = { column = "expires_at", encoding = "timestamp" }
live = { all = [
  { is_false = "revoked" },
  { expires_at = { column = "expires_at", encoding = "timestamp" } },
] }

[[credentials]]
name = "consent"
table = "app_consent"
ref = "client_id"
kind = "consent"
movable = true
unique_by = ["user_id"]

[delete]
children = ["token", "consent"]
actions = ["delete", "merge"]
"""

INHOUSE_DDL = [
    "CREATE TABLE app_client (pk INTEGER PRIMARY KEY, client_id TEXT UNIQUE, name TEXT, redirect_uris TEXT,"
    " created_at TIMESTAMP)",
    "CREATE TABLE app_token (id INTEGER PRIMARY KEY, client_id TEXT, expires_at TIMESTAMP, revoked BOOLEAN)",
    "CREATE TABLE app_consent (id INTEGER PRIMARY KEY, client_id TEXT, user_id TEXT, scope TEXT)",
]
INHOUSE_PK = {"app_client": "pk", "app_token": "id", "app_consent": "id"}


def test_merge_moves_consents_to_survivor_and_restore_moves_them_back(db, tmp_path):
    profile = tmp_path / "inhouse.toml"
    profile.write_text(INHOUSE_PROFILE, encoding="utf-8")
    # Whole seconds, as a server using CURRENT_TIMESTAMP or a DB-API driver's default adapter stores them.
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    with db.engine.begin() as conn:
        for stmt in INHOUSE_DDL:
            conn.execute(sa.text(stmt))

        def client(pk: int, cid: str, name: str, port: int, age: timedelta) -> None:
            conn.execute(
                sa.text("INSERT INTO app_client VALUES (:pk, :cid, :name, :uris, :at)"),
                {
                    "pk": pk,
                    "cid": cid,
                    "name": name,
                    "uris": json.dumps([f"http://localhost:{port}/cb"]),
                    "at": now - age,
                },
            )

        def token(i: int, cid: str, expires: timedelta, revoked: bool = False) -> None:
            conn.execute(
                sa.text("INSERT INTO app_token VALUES (:i, :cid, :exp, :rev)"),
                {"i": i, "cid": cid, "exp": now + expires, "rev": revoked},
            )

        def consent(i: int, cid: str, user: str, scope: str) -> None:
            conn.execute(
                sa.text("INSERT INTO app_consent VALUES (:i, :cid, :u, :s)"),
                {"i": i, "cid": cid, "u": user, "s": scope},
            )

        # Family "Notes" (loopback ports differ): S newest and live; O1, O2 older, dead.
        client(1, "O2", "Notes", 50001, timedelta(days=9))
        client(2, "O1", "Notes", 50002, timedelta(days=5))
        client(3, "S", "Notes", 50003, timedelta(hours=3))
        client(4, "X", "Other app", 50004, timedelta(days=30))  # alone, idle: not touched
        client(5, "Z", "Lonely app", 50005, timedelta(days=12))  # alone, never used: nothing to merge into
        token(1, "O2", -timedelta(days=8))
        token(2, "O1", -timedelta(days=4))
        token(3, "O1", timedelta(days=1), revoked=True)
        token(4, "S", timedelta(minutes=50))
        token(5, "X", -timedelta(days=20))
        consent(10, "S", "alice", "read")
        consent(11, "O1", "alice", "read write")  # S already has alice: the duplicate is deleted
        consent(12, "O1", "bob", "read")  # S lacks bob: moves to S
        consent(13, "O2", "bob", "admin")  # S has bob by then (O1 is newer, merged first): deleted
        consent(14, "O2", "carol", "read")  # moves to S
        consent(15, "X", "dave", "read")

    tables = ("app_client", "app_token", "app_consent")
    before = snapshot(db.engine, tables, INHOUSE_PK)
    config = make_config(db.url, profile=str(profile), policy={"actions": {"orphan": "merge", "abandoned": "merge"}})
    the_plan = plan(config)
    assert [(c.client_id, c.action, c.canonical) for c in the_plan.candidates] == [
        ("O1", "merge", "S"),
        ("O2", "merge", "S"),
        ("Z", "merge", None),
    ]
    result = apply(config, the_plan)
    assert result.acted == Counter({("merge", "superseded"): 2, ("merge", "never_used"): 1})

    with db.engine.connect() as conn:
        aliases = dict(
            conn.execute(sa.text("SELECT alias_client_id, canonical_client_id FROM dcr_reaper_aliases")).all()
        )
        consents = sorted(
            tuple(r) for r in conn.execute(sa.text("SELECT id, client_id, user_id, scope FROM app_consent"))
        )
    assert aliases == {"O1": "S", "O2": "S"}, "and no alias of Z to itself (it had nothing to merge into)"
    assert consents == [
        (10, "S", "alice", "read"),
        (12, "S", "bob", "read"),
        (14, "S", "carol", "read"),
        (15, "X", "dave", "read"),
    ]
    after = snapshot(db.engine, tables, INHOUSE_PK)
    assert after["app_client"] == [r for r in before["app_client"] if r[1] in ("S", "X")], (
        "orphans gone, the survivor's row untouched column for column"
    )
    assert after["app_token"] == [r for r in before["app_token"] if r[1] in ("S", "X")]
    _assert_gone_with_tombstone_inhouse(db.engine, {"O1", "O2", "Z"})

    res = restore(config, run_id=result.run_id)
    assert sorted(res.restored) == ["O1", "O2", "Z"]
    assert snapshot(db.engine, tables, INHOUSE_PK) == before, "consents moved back, duplicates re-inserted"
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM dcr_reaper_aliases")).scalar_one() == 0


def _assert_gone_with_tombstone_inhouse(engine: sa.Engine, gone: set[str]) -> None:
    present = client_ids(engine, "app_client")
    children = child_counts(engine, ("app_token", "app_consent"))
    open_tombs = _open_tombs(engine)
    for cid in gone:
        assert cid not in present and children.get(cid, 0) == 0
        assert [t.action for t in open_tombs.get(cid, [])] == ["merge"]


# --- 7. Throughput on PostgreSQL ------------------------------------------------------------------------

N_BENCH = 5000


@pytest.mark.slow
def test_reap_throughput_postgresql(pg_db, record_property):
    AuthlibDB(pg_db.engine)  # the schema
    now = int(time.time())
    with pg_db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_client (client_id, client_secret, client_id_issued_at,"
                " client_secret_expires_at, client_metadata)"
                " SELECT 'orphan-' || g, md5(g::text), :now - 2 * 86400 - g, 0,"
                " json_build_object('client_name', 'Claude Code (bench-' || (g % 50) || ')', 'redirect_uris',"
                " json_build_array('http://localhost:' || (49152 + g % 16000) || '/callback'))::text"
                " FROM generate_series(1, :n) g"
            ),
            {"now": now, "n": N_BENCH},
        )
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_client (client_id, client_secret, client_id_issued_at,"
                " client_secret_expires_at, client_metadata) SELECT 'live-' || f, md5(f::text), :now - 3600, 0,"
                " json_build_object('client_name', 'Claude Code (bench-' || f || ')', 'redirect_uris',"
                " json_build_array('http://localhost:40000/callback'))::text FROM generate_series(0, 49) f"
            ),
            {"now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_token (client_id, token_type, access_token, refresh_token, scope, issued_at,"
                " access_token_revoked_at, refresh_token_revoked_at, expires_in)"
                " SELECT 'orphan-' || g, 'Bearer', 'at-' || g, 'rt-' || g, 'openid', :now - 2 * 86400 - g + 30,"
                " :now - 86400, :now - 86400, 3600 FROM generate_series(1, :n) g"
            ),
            {"now": now, "n": N_BENCH},
        )
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_code (code, client_id, redirect_uri, response_type, scope, auth_time,"
                " code_challenge, code_challenge_method) SELECT 'code-' || g, 'orphan-' || g,"
                " 'http://localhost/cb', 'code', 'openid', :now - 2 * 86400 - g + 20, 'x', 'S256'"
                " FROM generate_series(1, :n) g"
            ),
            {"now": now, "n": N_BENCH},
        )
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_token (client_id, token_type, access_token, scope, issued_at,"
                " access_token_revoked_at, refresh_token_revoked_at, expires_in)"
                " SELECT 'live-' || f, 'Bearer', 'live-at-' || f, 'openid', :now - 60, 0, 0, 3600"
                " FROM generate_series(0, 49) f"
            ),
            {"now": now},
        )
        conn.execute(sa.text("CREATE INDEX ON oauth2_token (client_id)"))
        conn.execute(sa.text("CREATE INDEX ON oauth2_code (client_id)"))
        conn.execute(sa.text("ANALYZE"))

    config = make_config(pg_db.url, policy={"batch_size": 500, "pause": 0, "late_token_sweep": 0})
    the_plan = plan(config)
    assert len(the_plan.candidates) == N_BENCH
    started = time.monotonic()
    result = apply(config, the_plan)
    wall = time.monotonic() - started
    rate = result.total_acted / wall
    print(
        f"\nreap throughput (PostgreSQL, batch 500, tombstones in the same transaction): "
        f"{result.total_acted} clients in {wall:.2f}s = {rate:,.0f} clients/s"
    )
    record_property("reap_clients_per_second", round(rate))
    assert result.total_acted == N_BENCH
    with pg_db.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT COUNT(*) FROM oauth2_client WHERE client_id LIKE 'orphan-%'")).scalar_one()
        children = conn.execute(
            sa.text(
                "SELECT (SELECT COUNT(*) FROM oauth2_token WHERE client_id LIKE 'orphan-%')"
                " + (SELECT COUNT(*) FROM oauth2_code WHERE client_id LIKE 'orphan-%')"
            )
        ).scalar_one()
    assert (left, children) == (0, 0)
    assert tombstone_count(pg_db.engine, state="done") == N_BENCH
    assert client_ids(pg_db.engine) == {f"live-{f}" for f in range(50)}


def test_restore_names_a_child_row_whose_primary_key_was_taken_and_restores_nothing(db):
    """The children's primary keys are left to the database (the insert fails inside a savepoint): the error
    still names the client and the table, and nothing of the batch is restored."""
    _, fams = _restore_fixture(db)
    config = make_config(db.url)
    result = apply(config, plan(config))
    (tomb,) = [t for t in tombstones(db.engine) if t.client_id == sorted(c for f in fams for c in f.orphans)[0]]
    with db.engine.connect() as conn:
        payload = decode_payload(
            conn.execute(sa.text("SELECT payload FROM dcr_reaper_tombstones WHERE id = :i"), {"i": tomb.id}).scalar()
        )
    taken_id = payload["children"]["oauth2_token"][0]["id"]
    with db.engine.begin() as conn:  # the auth server's sequence handed the id out again
        conn.execute(
            sa.text(
                "INSERT INTO oauth2_token (id, client_id, token_type, access_token, issued_at, expires_in,"
                " access_token_revoked_at, refresh_token_revoked_at) VALUES (:i, 'other', 'Bearer', 'x', 0, 0, 0, 0)"
            ),
            {"i": taken_id},
        )
    blocked = snapshot(db.engine)
    with pytest.raises(RestoreConflict, match=f"client {tomb.client_id}: a row with the same primary key exists in"):
        restore(config, run_id=result.run_id)
    assert snapshot(db.engine) == blocked
    assert all(t.restored_at is None for t in tombstones(db.engine))
