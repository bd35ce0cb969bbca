"""Reap: plan from a read-only scan, then act in short batches where each statement re-checks liveness.

Dry-run and --apply share `plan()`; only `apply()` writes. The safety argument is in docs/safety.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from reaper.classify import FamilyStats
from reaper.config import Config
from reaper.db import describe_error, make_engine, redact
from reaper.dialects import Dialect, dialect_for
from reaper.errors import ConfigError, DatabaseError, ReaperError
from reaper.ledger import Ledger, encode_row
from reaper.lock import RunLock, lock_name
from reaper.predicates import Compiler, now_param
from reaper.profile import BoundProfile, CredentialMap
from reaper.report import Progress, Source, classified, open_source
from reaper.scan import live_condition, tenant_filter

log = logging.getLogger("reaper.reap")


class CapExceeded(ReaperError):
    """The plan exceeds max_per_run or max_fraction: nothing was reaped (exit 5)."""

    exit_code = 5


@dataclass(slots=True)
class Candidate:
    """A client the policy would act on."""

    key: str
    client_id: str
    name: str | None
    family: str
    verdict: str
    reason: str
    action: str
    created_at: float | None
    canonical: str | None = None
    canonical_key: str | None = None


@dataclass
class Plan:
    """What a reap would do, and whether the caps allow it."""

    candidates: list[Candidate]
    total_clients: int
    families: dict[str, FamilyStats]
    cap_problem: str | None = None
    kept_survivors: int = 0
    by_action: Counter[str] = field(default_factory=Counter)


@dataclass
class RunResult:
    """What a reap run did."""

    plan: Plan
    applied: bool
    run_id: str | None = None
    acted: Counter[tuple[str, str]] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    restored_late: list[str] = field(default_factory=list)
    batches: int = 0
    stopped: bool = False
    duration: float = 0.0

    @property
    def total_acted(self) -> int:
        return sum(self.acted.values())


def _check_actions(config: Config, profile: BoundProfile) -> None:
    allowed = set(profile.actions)  # an [api] profile (Keycloak): its API's actions; else the SQL ones
    problems = []
    for verdict in config.policy.verdicts:
        action = config.policy.actions.get(verdict, "delete")
        if action not in allowed:
            problems.append(
                f"policy.actions.{verdict}: profile '{profile.name}' does not allow '{action}' "
                f"(it allows: {', '.join(sorted(allowed))})"
            )
        if action == "disable" and not profile.profile.delete.disable_set and profile.profile.api is None:
            problems.append(f"policy.actions.{verdict}: profile '{profile.name}' has no disabled flag to set")
    if problems:
        raise ConfigError(problems)


def plan(
    config: Config, source: Source | None = None, progress: Progress | None = None, now: float | None = None
) -> Plan:
    """Scan read-only (S1) and choose what to act on; the caps are evaluated here (S4)."""
    src = source or open_source(config)
    try:
        return _plan(config, src, progress, now)
    finally:
        if source is None:
            src.engine.dispose()


def _plan(config: Config, src: Source, progress: Progress | None, now: float | None) -> Plan:
    _check_actions(config, src.profile)
    pol = config.policy
    now = time.time() if now is None else now
    raw: list[Candidate] = []
    with classified(config, src, progress, now=now) as (stream, snap):
        for item in stream:
            row = item.row
            if item.verdict not in pol.verdicts or row.created_at is None:
                continue
            if now - row.created_at < pol.min_age:
                continue
            action = pol.actions.get(item.verdict, "delete")  # type: ignore[call-overload]
            if action == "disable" and row.disabled:
                continue  # already off: disabling it again would only add a tombstone
            raw.append(
                Candidate(
                    row.key,
                    row.client_id,
                    row.name,
                    item.family,
                    str(item.verdict),
                    item.reason,
                    action,
                    row.created_at,
                )
            )
    candidates, kept = [], 0
    for c in raw:
        fam = snap.families[c.family]
        if fam.members >= 2 and fam.survivor == c.client_id:
            kept += 1  # S3: the survivor of a family is never reaped
            continue
        if c.action == "merge" and fam.survivor != c.client_id:
            # A lone client is its own family's survivor: nothing to merge into, so no move and no alias
            # (an alias to itself would point at a deleted client); it is deleted with its tombstone.
            c.canonical, c.canonical_key = fam.survivor, fam.survivor_key
        candidates.append(c)
    result = Plan(candidates, snap.clients, snap.families, kept_survivors=kept)
    result.by_action.update(c.action for c in candidates)
    n = len(candidates)
    if n > pol.max_per_run:
        result.cap_problem = f"plan acts on {n} clients, more than policy.max_per_run = {pol.max_per_run}"
    elif snap.clients and n > pol.max_fraction * snap.clients:
        result.cap_problem = (
            f"plan acts on {n} of {snap.clients} clients ({n / snap.clients:.0%}), more than "
            f"policy.max_fraction = {pol.max_fraction:.0%}"
        )
    return result


class _LateCredential(Exception):
    def __init__(self, keys: set[str]):
        self.keys = keys


class Reaper:
    """Applies a plan in batches on a read-write engine, with tombstones in the ledger (S2, S5, S7)."""

    def __init__(self, config: Config, profile: BoundProfile, engine: Engine, ledger_engine: Engine | None):
        self.config = config
        self.pol = config.policy
        self.profile = profile
        self.engine = engine
        self.dialect: Dialect = dialect_for(engine)
        self.ledger = Ledger(config.ledger)
        self.ledger_engine = ledger_engine  # None: the ledger lives in the auth database
        md = sa.MetaData()
        try:
            self.client = self._reflect(md, profile.table(profile.client.table))
            self.creds = [(c, self._reflect(md, profile.table(c.table))) for c in profile.credentials]
        except DBAPIError as exc:
            raise DatabaseError(f"reflecting tables: {describe_error(exc, engine.url)}") from None
        by_name = {c.name: (c, t) for c, t in self.creds}
        self.children = [by_name[n] for n in profile.profile.delete.children]

    def _reflect(self, md: sa.MetaData, name: str) -> sa.Table:
        schema, _, bare = name.rpartition(".")
        listeners = []
        if self.dialect.name == "sqlite":
            # SQLite keeps whatever the server wrote, whatever the declared type ('2024-05-01 10:00:00' or an
            # epoch int in a TIMESTAMP column, 't' in a BOOLEAN): read and write stored values untouched, like
            # the scan's untyped columns, so a tombstone restores them exactly and an odd value cannot crash a
            # batch. (Typed, SQLAlchemy rewrote timestamps as '... .000000' on restore.)
            def _untyped(_inspector: Any, _table: Any, info: dict[str, Any]) -> None:
                info["type"] = sa.types.NullType()

            listeners.append(("column_reflect", _untyped))
        return sa.Table(bare, md, autoload_with=self.engine, schema=schema or None, listeners=listeners)

    @property
    def key_col(self) -> Any:
        return self.client.c[self.profile.client.key]

    def _live_exists(self, now: datetime, keys_from: Any) -> list[Any]:
        """One EXISTS per credential table: a live credential references the client."""
        out = []
        for cred, table in self.creds:
            comp = Compiler(table, now, self.profile.options, self.dialect)
            cond = [table.c[cred.ref] == keys_from, live_condition(cred, comp)]
            cond += tenant_filter(table, cred.tenant, self.profile.options)
            if cred.exclude is not None:
                cond.append(sa.not_(comp.compile(cred.exclude)))
            out.append(sa.exists().where(*cond))
        return out

    def recheck(self, now: datetime) -> Any:
        """The authority (S2): still no live credential, old enough, not CIMD, dynamic."""
        cm = self.profile.client
        comp = Compiler(self.client, now, self.profile.options, self.dialect)
        cond = [sa.not_(e) for e in self._live_exists(now, self.key_col)]
        cond += tenant_filter(self.client, cm.tenant, self.profile.options)  # Hydra's nid, Keycloak's realm
        if cm.created_at is not None and cm.created_at.column:
            min_created = now_param(
                datetime.fromtimestamp(now.timestamp() - self.pol.min_age, UTC), cm.created_at.encoding
            )
            cond.append(self.client.c[cm.created_at.column] < min_created)
        if cm.cimd is not None:
            cond.append(sa.case((comp.compile(cm.cimd), 1), else_=0) == 0)
        if cm.dynamic is not None:
            cond.append(sa.case((comp.compile(cm.dynamic), 1), else_=0) == 1)
        return sa.and_(*cond)

    def _dead_child(self, cred: CredentialMap, table: sa.Table, keys: list[str], now: datetime) -> Any:
        comp = Compiler(table, now, self.profile.options, self.dialect)
        dead = sa.case((live_condition(cred, comp), 1), else_=0) == 0
        if cred.exclude is not None:
            dead = sa.or_(dead, comp.compile(cred.exclude))
        return sa.and_(
            self.dialect.in_(table.c[cred.ref], keys), dead, *tenant_filter(table, cred.tenant, self.profile.options)
        )

    # -- one batch -------------------------------------------------------------------------------------------

    def _act(
        self, conn: Connection, batch: list[Candidate], run_id: str, ledger_conn: Connection
    ) -> tuple[list[Candidate], list[Candidate]]:
        now = datetime.now(UTC)
        self.dialect.set_timeouts(conn, self.pol.lock_timeout, self.pol.statement_timeout)
        keys = [c.key for c in batch]
        q = sa.select(self.client).where(self.dialect.in_(self.key_col, keys), self.recheck(now))
        lock_args = self.dialect.for_update()
        q = q.with_for_update(**lock_args) if lock_args or self.dialect.name != "sqlite" else q
        locked = {str(r[self.profile.client.key]): r for r in (x._asdict() for x in conn.execute(q))}
        acting = [c for c in batch if c.key in locked]
        skipped = [c for c in batch if c.key not in locked]
        if not acting:
            return [], skipped
        payloads: dict[str, dict[str, Any]] = {
            c.key: {
                "client_table": self.client.name,
                "client": encode_row(locked[c.key]),
                "children": {},
                "moved": [],
            }
            for c in acting
        }
        deleting = [c for c in acting if c.action in ("delete", "merge")]
        disabling = [c for c in acting if c.action == "disable"]
        if disabling:
            self._disable(conn, disabling, now)
        if deleting:
            for c in deleting:
                if c.action == "merge" and c.canonical_key:
                    payloads[c.key]["moved"] = self._move(conn, c)
            self._delete(conn, [c.key for c in deleting], payloads, now)
        state = "done" if ledger_conn is conn else "pending"
        self.ledger.add_tombstones(
            ledger_conn,
            [
                self.ledger.tombstone_row(
                    run_id,
                    c.key,
                    c.client_id,
                    c.action,
                    c.verdict,
                    c.reason,
                    c.family,
                    payloads[c.key],
                    state,
                )
                for c in acting
            ],
        )
        for c in acting:
            if c.action == "merge" and c.canonical:
                self.ledger.add_alias(ledger_conn, c.client_id, c.canonical, c.family, run_id)
        return acting, skipped

    def _move(self, conn: Connection, c: Candidate) -> list[dict[str, Any]]:
        """Move the orphan's movable rows (consents) to the survivor where it has no such row yet."""
        moved = []
        for cred, table in self.creds:
            if not cred.movable:
                continue
            pk = list(table.primary_key.columns)
            if not pk:
                continue
            ref = table.c[cred.ref]
            have = {
                tuple(r)
                for r in conn.execute(sa.select(*(table.c[u] for u in cred.unique_by)).where(ref == c.canonical_key))
            }
            rows = conn.execute(sa.select(table).where(ref == c.key).with_for_update(**self.dialect.for_update()))
            for row in rows.mappings():
                if tuple(row[u] for u in cred.unique_by) in have:
                    continue
                where = sa.and_(*(col == row[col.name] for col in pk))
                conn.execute(sa.update(table).where(where).values({cred.ref: c.canonical_key}))
                moved.append(
                    {
                        "table": table.name,
                        "pk": encode_row({col.name: row[col.name] for col in pk}),
                        "column": cred.ref,
                        "from": c.key,
                        "to": c.canonical_key,
                    }
                )
        return moved

    def _delete(self, conn: Connection, keys: list[str], payloads: dict[str, dict[str, Any]], now: datetime) -> None:
        ref_of = {t.name: c.ref for c, t in self.creds}
        if self.profile.profile.delete.cascade:
            for cred, table in self.creds:
                selected = conn.execute(sa.select(table).where(self.dialect.in_(table.c[cred.ref], keys)))
                for row in selected:
                    r = row._asdict()
                    payloads[str(r[cred.ref])]["children"].setdefault(table.name, []).append(encode_row(r))
        else:
            for cred, table in self.children:
                for r in self.dialect.delete_returning(conn, table, self._dead_child(cred, table, keys, now)):
                    payloads[str(r[ref_of[table.name]])]["children"].setdefault(table.name, []).append(encode_row(r))
        # The client goes only if nothing references it any more: a child row left behind is live, and so is
        # any live row in a table we do not delete from (S2).
        if self.profile.profile.delete.cascade:
            remaining = self._live_exists(now, self.key_col)
        else:
            child_names = {t.name for _, t in self.children}
            remaining = [
                sa.exists().where(t.c[c.ref] == self.key_col, *tenant_filter(t, c.tenant, self.profile.options))
                for c, t in self.children
            ]
            remaining += [
                e
                for (c, t), e in zip(self.creds, self._live_exists(now, self.key_col), strict=True)
                if t.name not in child_names
            ]
        where = sa.and_(self.dialect.in_(self.key_col, keys), *(sa.not_(e) for e in remaining))
        deleted = {str(r[self.profile.client.key]) for r in self.dialect.delete_returning(conn, self.client, where)}
        late = set(keys) - deleted
        if late:
            raise _LateCredential(late)

    def _disable(self, conn: Connection, batch: list[Candidate], now: datetime) -> None:
        values = self.profile.profile.delete.disable_set or {}
        keys = [c.key for c in batch]
        result = conn.execute(
            sa.update(self.client).where(self.dialect.in_(self.key_col, keys), self.recheck(now)).values(values)
        )
        if result.rowcount != len(keys):
            raise _LateCredential(set(keys))  # someone changed a row since we locked it: retry the batch

    def run_batch(self, batch: list[Candidate], run_id: str) -> tuple[list[Candidate], list[Candidate]]:
        """Act on one batch in one short transaction; a late credential drops that client and retries."""
        skipped: list[Candidate] = []
        for _attempt in range(5):
            try:
                if self.ledger_engine is None:
                    with self.engine.begin() as conn:
                        done, skip = self._act(conn, batch, run_id, conn)
                else:
                    with self.engine.begin() as conn, self.ledger_engine.begin() as lconn:
                        done, skip = self._act(conn, batch, run_id, lconn)
                        lconn.commit()  # pending tombstones are durable before the delete commits (S5)
                    if done:
                        self._mark_done(run_id, [c.key for c in done])
                return done, skipped + skip
            except _LateCredential as exc:
                skipped += [c for c in batch if c.key in exc.keys]
                batch = [c for c in batch if c.key not in exc.keys]
                if not batch:
                    return [], skipped
        raise DatabaseError("a batch kept changing under the reaper; giving up on it")

    def _mark_done(self, run_id: str, keys: list[str]) -> None:
        assert self.ledger_engine is not None
        t = self.ledger.tombstones
        with self.ledger_engine.begin() as lconn:
            lconn.execute(
                sa.update(t)
                .where(t.c.run_id == run_id, t.c.client_key.in_(keys), t.c.state == "pending")
                .values(state="done")
            )

    def recover_pending(self) -> int:
        """After a crash with a separate ledger: keep tombstones whose client is gone, drop the others."""
        if self.ledger_engine is None:
            return 0
        t = self.ledger.tombstones
        with self.ledger_engine.begin() as lconn:
            pending = list(lconn.execute(sa.select(t.c.id, t.c.client_key, t.c.action).where(t.c.state == "pending")))
            if not pending:
                return 0
            with self.engine.connect() as conn:
                present = {
                    str(k)
                    for (k,) in conn.execute(
                        sa.select(self.key_col).where(self.dialect.in_(self.key_col, [p.client_key for p in pending]))
                    )
                }
            for p in pending:
                # Deleted and gone: the delete committed. Still there: it rolled back, the tombstone is void.
                # A disable leaves the row either way; keeping its tombstone is harmless (restore rewrites the
                # values it had).
                gone = p.client_key not in present
                state = "done" if gone or p.action == "disable" else "void"
                lconn.execute(sa.update(t).where(t.c.id == p.id).values(state=state))
        return len(pending)

    def live_now(self, keys: list[str]) -> list[str]:
        """Of these reaped client keys, those that a credential issued after the delete now references."""
        now = datetime.now(UTC)
        found: set[str] = set()
        with self.engine.connect() as conn:
            for cred, table in self.creds:
                comp = Compiler(table, now, self.profile.options, self.dialect)
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    q = (
                        sa.select(table.c[cred.ref])
                        .where(self.dialect.in_(table.c[cred.ref], chunk), live_condition(cred, comp))
                        .distinct()
                    )
                    found |= {str(r[0]) for r in conn.execute(q)}
            conn.rollback()
        return sorted(found)


def _ledger_engine(config: Config) -> Engine | None:
    return make_engine(config.ledger.url, readonly=False) if config.ledger.url else None


def apply(
    config: Config,
    the_plan: Plan,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    held_lock: RunLock | None = None,
) -> RunResult:
    """Execute a plan under the run lock (S6), in batches, tombstoning everything (S5)."""
    from reaper.restore import restore_keys

    if bind_profile_for(config).profile.api is not None:  # Keycloak: the Admin REST API, never SQL
        from reaper.keycloak import apply_keycloak

        return apply_keycloak(config, the_plan, force=force, stop=stop, progress=progress, held_lock=held_lock)
    started = time.monotonic()
    result = RunResult(the_plan, applied=True)
    if the_plan.cap_problem and not force:
        raise CapExceeded(f"{the_plan.cap_problem}; nothing reaped (raise the cap or pass --force)")
    assert config.database_url
    engine = make_engine(config.database_url, readonly=False)
    ledger_engine = _ledger_engine(config)
    try:
        # The service already leads and keeps its lock across runs; the CLI takes (and releases) its own.
        run_lock = contextlib.nullcontext() if held_lock else RunLock(engine, lock_name(engine, config.ledger.prefix))
        with run_lock:
            reaper_ = Reaper(config, bind_profile_for(config), engine, ledger_engine)
            reaper_.ledger.create(ledger_engine or engine)
            reaper_.recover_pending()
            with (ledger_engine or engine).begin() as lconn:
                run_id = reaper_.ledger.start_run(lconn, "reap", reaper_.profile.name, len(the_plan.candidates))
            result.run_id = run_id
            done_keys: list[str] = []
            cands = the_plan.candidates
            size = config.policy.batch_size
            status, message = "ok", ""
            try:
                for i in range(0, len(cands), size):
                    if stop is not None and stop.is_set():
                        result.stopped = True
                        status, message = "stopped", "stopped on request between batches"
                        break
                    if held_lock is not None and not held_lock.alive():
                        status, message = "stopped", "lost the lock between batches"
                        result.stopped = True
                        break
                    try:
                        done, skipped = reaper_.run_batch(cands[i : i + size], run_id)
                    except DBAPIError as exc:
                        if not reaper_.dialect.is_lock_timeout(exc):
                            raise
                        # The auth server holds a row of this batch: leave the batch to the next run (S7).
                        result.skipped["locked_by_auth_server"] += len(cands[i : i + size])
                        continue
                    result.batches += 1
                    for c in done:
                        result.acted[(c.action, c.reason)] += 1
                    for _c in skipped:
                        result.skipped["changed_since_scan"] += 1
                    deleted = [c.key for c in done if c.action in ("delete", "merge")]
                    done_keys += deleted
                    late = reaper_.live_now(deleted)
                    if late:
                        result.restored_late += restore_keys(config, reaper_, late, "late credential after delete")
                    if progress:
                        progress(min(i + size, len(cands)), len(cands))
                    if config.policy.pause and i + size < len(cands):
                        _pause(config.policy.pause, stop)
                if done_keys and config.policy.late_token_sweep:
                    _pause(config.policy.late_token_sweep, stop)  # on a stop request: sweep at once
                    late = [k for k in reaper_.live_now(done_keys) if k not in result.restored_late]
                    if late:
                        result.restored_late += restore_keys(config, reaper_, late, "late credential after run")
            except BaseException as exc:
                status, message = "failed", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                acted = result.total_acted - len(result.restored_late)
                try:
                    with (ledger_engine or engine).begin() as lconn:
                        reaper_.ledger.finish_run(lconn, run_id, status, acted, message)
                except DBAPIError:
                    log.warning("could not record the end of run %s", run_id)
    except DBAPIError as exc:
        raise DatabaseError(f"reap on {redact(engine.url)} failed: {describe_error(exc, engine.url)}") from None
    finally:
        engine.dispose()
        if ledger_engine is not None:
            ledger_engine.dispose()
    result.duration = time.monotonic() - started
    return result


def _pause(seconds: float, stop: threading.Event | None) -> None:
    """Sleep, but wake at once when a stop is requested."""
    if stop is None:
        time.sleep(seconds)
    else:
        stop.wait(seconds)


def bind_profile_for(config: Config) -> BoundProfile:
    from reaper.profile import bind_profile

    return bind_profile(config)


def reap(
    config: Config,
    do_apply: bool = False,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Plan (always) and, with do_apply, execute. Dry-run is the default."""
    the_plan = plan(config, progress=progress)
    if not do_apply:
        return RunResult(the_plan, applied=False)
    return apply(config, the_plan, force=force, stop=stop)
