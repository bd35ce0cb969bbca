"""Acting on a SQL store: short batches where each statement re-checks liveness (S2), tombstones in the same
transaction as the delete (S5), timeouts and skipped row locks (S7); and restore from those tombstones.

Statements are built apart from running them, so `reap --sql` can print exactly what a batch would run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import CompileError, DBAPIError, IntegrityError

from reaper.backends.base import BatchOutcome, Candidate
from reaper.backends.sql.scan import credential_compiler, credential_filter, live_condition, tenant_filter
from reaper.config import PolicyConfig
from reaper.db import Compiler, DatabaseImpl, describe_error, exists_where, now_param, redact
from reaper.errors import DatabaseError, RestoreConflict, SchemaError
from reaper.ledger import Ledger, Tombstone, decode_row, encode_row, encode_values, insert_many
from reaper.profiles import BoundProfile, CredentialMap


class _LateCredential(Exception):
    def __init__(self, keys: set[str]):
        self.keys = keys


class SqlStatements:
    """The statements of a reap over reflected tables: built here, run by SqlActor, printed by `reap --sql`."""

    def __init__(self, profile: BoundProfile, engine: Engine, policy: PolicyConfig):
        self.profile = profile
        self.policy = policy
        self.impl = DatabaseImpl.for_engine(engine)
        md = sa.MetaData()
        # Credentials that reference the client's key, and those that reference another of its columns (DOT's
        # device grants hold the public client_id): both are re-checked and deleted; only the first are swept.
        by_column = [c for c in profile.scan_credentials if c.client_column is not None and c.via is None]
        try:
            self.client = self._reflect(md, engine, profile.client.table)
            self.creds = [(c, self._reflect(md, engine, c.table)) for c in profile.credentials]
            self.column_creds = [(c, self._reflect(md, engine, c.table)) for c in by_column]
        except DBAPIError as exc:
            raise DatabaseError(f"reflecting tables: {describe_error(exc, engine.url)}") from None
        self.all_creds = self.creds + self.column_creds
        by_name = {c.name: (c, t) for c, t in self.all_creds}
        self.children = [by_name[n] for n in profile.profile.delete.children if n in by_name]
        self.tables = {t.name: t for _, t in self.all_creds}
        self.detach: list[Detach] = []
        for d in profile.profile.delete.detach:
            (src_cred, src), (ref_cred, ref) = by_name[d.table], by_name[d.references]
            ref_pk = list(ref.primary_key.columns)
            if d.column not in src.c or len(ref_pk) != 1:
                raise SchemaError(
                    f"delete.detach: {src.name}.{d.column} must be a column pointing at the one-column primary key "
                    f"of {ref.name}"
                )
            self.detach.append(Detach(src_cred, src, d.column, ref_cred, ref, ref_pk[0]))

    def _reflect(self, md: sa.MetaData, engine: Engine, name: str) -> sa.Table:
        schema, _, bare = name.rpartition(".")
        # resolve_fks=False: a table a foreign key refers to would be reflected on the way without the listeners
        # (SQLite's untyped columns), and that copy would then be the one the metadata hands back.
        return sa.Table(
            bare,
            md,
            autoload_with=engine,
            schema=schema or None,
            listeners=self.impl.reflect_listeners(),
            resolve_fks=False,
        )

    @property
    def key_col(self) -> Any:
        return self.client.c[self.profile.client.key]

    def owner(self, cred: CredentialMap) -> Any:
        """The client column a credential's `ref` holds: the key, or its `client_column`."""
        return self.client.c[cred.client_column] if cred.client_column else self.key_col

    def refs(self, cred: CredentialMap, table: sa.Table, keys: list[str]) -> Any:
        """A credential table's rows of these clients (by key)."""
        if cred.client_column is None:
            return self.impl.in_(table.c[cred.ref], keys)
        return table.c[cred.ref].in_(sa.select(self.owner(cred)).where(self.impl.in_(self.key_col, keys)))

    def _compiler(self, cred: CredentialMap, table: sa.Table, now: datetime, strict: bool = False) -> Compiler:
        return credential_compiler(self.profile, cred, table, now, self.impl, strict)

    def alive(self, cred: CredentialMap, table: sa.Table, now: datetime, idle_since: datetime | None) -> Any:
        """A row that still works. For a stale candidate (idle_since set): a row that works without "never
        expires", or one issued since idle_since (the client came back)."""
        alive = live_condition(cred, self._compiler(cred, table, now, strict=idle_since is not None))
        if idle_since is not None and cred.issued_at is not None and cred.issued_at.column:
            recent = table.c[cred.issued_at.column] > now_param(idle_since, cred.issued_at.encoding)
            alive = sa.or_(alive, recent)
        return alive

    def referenced(self, cred: CredentialMap, table: sa.Table, keys: list[str], *cond: Any) -> Any:
        """A row of this table that matches `cond` references the client. For a table keyed by the client's key:
        `key IN (SELECT ref ... WHERE ref IN keys AND cond)`, which does not depend on the client row, so the
        database runs it once per statement (a hashed subplan, an index lookup per key where there is an index)
        instead of once per client: correlated, PostgreSQL planned a batch of 500 as 500 scans of a token table
        without an index on its client_id (37 s). Other references (a client_id column): correlated EXISTS."""
        if cred.client_column is None:
            ref = table.c[cred.ref]
            return self.key_col.in_(sa.select(ref).where(self.impl.in_(ref, keys), *cond))
        return exists_where(table.c[cred.ref] == self.owner(cred), *cond)

    def live_exists(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> list[Any]:
        """One condition per credential table: a live credential references the client."""
        out = []
        for cred, table in self.all_creds:
            if cred.kind == "record":
                continue
            cond = [self.alive(cred, table, now, idle_since)]
            cond += credential_filter(self.profile, cred, table, now, self.impl)
            out.append(self.referenced(cred, table, keys, *cond))
        return out

    def recheck(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> Any:
        """The authority (S2): still no live credential, old enough, not CIMD, dynamic."""
        cm = self.profile.client
        comp = Compiler(self.client, now, self.profile.options, self.impl)
        cond = [sa.not_(e) for e in self.live_exists(keys, now, idle_since)]
        cond += tenant_filter(self.client, cm.tenant, self.profile.options)  # Hydra's nid, Keycloak's realm
        if cm.created_at is not None and cm.created_at.column:
            min_created = now_param(now - timedelta(seconds=self.policy.min_age), cm.created_at.encoding)
            cond.append(self.client.c[cm.created_at.column] < min_created)
        if cm.cimd is not None:
            cond.append(sa.case((comp.compile(cm.cimd), 1), else_=0) == 0)
        if cm.dynamic is not None:
            cond.append(sa.case((comp.compile(cm.dynamic), 1), else_=0) == 1)
        return sa.and_(*cond)

    def lock_clients(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> sa.Select[Any]:
        """Lock the batch's clients that still pass the re-check (rows the auth server holds are skipped)."""
        q = sa.select(self.client).where(self.impl.in_(self.key_col, keys), self.recheck(keys, now, idle_since))
        return self.impl.lock_rows(q)

    def dead_children(
        self, cred: CredentialMap, table: sa.Table, keys: list[str], now: datetime, idle_since: datetime | None = None
    ) -> Any:
        """A child table's rows of these clients that are not live credentials (a live one stays, and so does
        its client)."""
        dead = sa.case((self.alive(cred, table, now, idle_since), 1), else_=0) == 0
        if cred.exclude is not None:
            dead = sa.or_(dead, self._compiler(cred, table, now).compile(cred.exclude))
        return sa.and_(self.refs(cred, table, keys), dead, *tenant_filter(table, cred.tenant, self.profile.options))

    def client_delete(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> Any:
        """The client goes only if nothing references it any more: a child row left behind is live, and so is
        any live row in a table not deleted from (S2)."""
        if self.profile.profile.delete.cascade:
            remaining = self.live_exists(keys, now, idle_since)
        else:
            child_names = {t.name for _, t in self.children}
            remaining = [
                self.referenced(c, t, keys, *tenant_filter(t, c.tenant, self.profile.options)) for c, t in self.children
            ]
            live_tables = [t.name for c, t in self.all_creds if c.kind != "record"]
            remaining += [
                e
                for name, e in zip(live_tables, self.live_exists(keys, now, idle_since), strict=True)
                if name not in child_names
            ]
        return sa.and_(self.impl.in_(self.key_col, keys), *(sa.not_(e) for e in remaining))

    def disable(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> Any:
        values = self.profile.profile.delete.disable_set or {}
        where = self.recheck(keys, now, idle_since)
        return sa.update(self.client).where(self.impl.in_(self.key_col, keys), where).values(values)

    def review(
        self, batch: Sequence[Candidate], now: datetime, dialect: Any, stale_after: float | None = None
    ) -> list[str]:
        """The statements of one batch as SQL text with its values, for a DBA to read."""
        stmts: list[Any] = []
        for stale in (False, True):
            group = [c for c in batch if (c.reason == "stale") == stale]
            if not group or (stale and stale_after is None):
                continue
            idle = now - timedelta(seconds=stale_after) if stale and stale_after is not None else None
            keys = [c.key for c in group]
            deleting = [c.key for c in group if c.action in ("delete", "merge")]
            disabling = [c.key for c in group if c.action == "disable"]
            stmts.append(self.lock_clients(keys, now, idle))
            if disabling:
                stmts.append(self.disable(disabling, now, idle))
            if deleting:
                if self.profile.profile.delete.cascade:
                    stmts += [sa.select(t).where(self.refs(c, t, deleting)) for c, t in self.all_creds]
                else:
                    stmts += [
                        sa.update(d.table)
                        .where(d.table.c[d.column].in_(d.doomed(self, deleting, now, idle)))
                        .values({d.column: None})
                        for d in self.detach
                    ]
                    stmts += [
                        sa.delete(t).where(self.dead_children(c, t, deleting, now, idle)) for c, t in self.children
                    ]
                stmts.append(sa.delete(self.client).where(self.client_delete(deleting, now, idle)))
        return [_review_text(s, dialect) for s in stmts]


def _review_text(stmt: Any, dialect: Any) -> str:
    """A statement with its values inline; where a value has no literal form (SQLite's untyped columns), with
    its parameters after it."""
    try:
        return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True}))
    except CompileError:
        compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        return f"{compiled} -- parameters: {compiled.params!r}"


@dataclass(frozen=True)
class Detach:
    """A pointer column set NULL before the rows it points at go (profile `[delete] detach`)."""

    cred: CredentialMap
    table: sa.Table
    column: str
    ref_cred: CredentialMap
    ref: sa.Table
    ref_pk: Any

    def doomed(self, sql: SqlStatements, keys: list[str], now: datetime, idle: datetime | None) -> Any:
        """The referenced rows this batch deletes."""
        return sa.select(self.ref_pk).where(sql.dead_children(self.ref_cred, self.ref, keys, now, idle))


def _pk_cols(table: sa.Table) -> list[Any]:
    return list(table.primary_key.columns)


def _norm(values: Sequence[Any]) -> tuple[str, ...]:
    """A primary key as comparable text (a value read back may come in another Python type than decoded)."""
    return tuple(str(v) for v in values)


class SqlActor:
    """Applies batches on a read-write engine, with tombstones in the ledger (S2, S5, S7), and restores."""

    def __init__(
        self,
        profile: BoundProfile,
        engine: Engine,
        ledger: Ledger,
        policy: PolicyConfig,
        stale_after: float | None = None,
    ):
        self.profile = profile
        self.engine = engine
        self.ledger = ledger
        self.pol = policy
        self.stale_after = stale_after
        self.impl = DatabaseImpl.for_engine(engine)
        self.batches_at_once = self.impl.concurrent_batches
        self.sql = SqlStatements(profile, engine, policy)

    def close(self) -> None:
        """The engines belong to the backend."""

    def _fail(self, what: str, exc: DBAPIError) -> DatabaseError:
        return DatabaseError(f"{what} on {redact(self.engine.url)} failed: {describe_error(exc, self.engine.url)}")

    # -- one batch -------------------------------------------------------------------------------------------

    def _act(
        self, conn: Connection, batch: list[Candidate], run_id: str, ledger_conn: Connection, stale: bool
    ) -> tuple[list[Candidate], list[Candidate]]:
        sql = self.sql
        # The database's clock, in this transaction (S9), and the batch's timeouts (S7).
        now = datetime.fromtimestamp(
            self.impl.begin_batch(conn, self.pol.lock_timeout, self.pol.statement_timeout), UTC
        )
        # Stale candidates live only through credentials that never expire: re-checked with those read as
        # expired, and with any credential issued since stale_after counting as the client coming back.
        idle = now - timedelta(seconds=self.stale_after) if stale and self.stale_after is not None else None
        if stale and idle is None:
            return [], list(batch)  # stale_after switched off since the plan: nothing is stale
        keys = [c.key for c in batch]
        key_name = self.profile.client.key
        result = conn.execute(sql.lock_clients(keys, now, idle))
        names = list(result.keys())
        locked = {str(r[key_name]): r for r in (dict(zip(names, x, strict=True)) for x in result.all())}
        acting = [c for c in batch if c.key in locked]
        skipped = [c for c in batch if c.key not in locked]
        if not acting:
            return [], skipped
        payloads: dict[str, dict[str, Any]] = {
            c.key: {
                "client_table": sql.client.name,
                "client": encode_row(locked[c.key]),
                "columns": {},
                "children": {},
                "moved": [],
            }
            for c in acting
        }
        deleting = [c for c in acting if c.action in ("delete", "merge")]
        disabling = [c for c in acting if c.action == "disable"]
        if disabling:
            result = conn.execute(sql.disable([c.key for c in disabling], now, idle))
            if result.rowcount != len(disabling):
                raise _LateCredential({c.key for c in disabling})  # changed since we locked it: retry the batch
        if deleting:
            for c in deleting:
                if c.action == "merge" and c.canonical_key:
                    payloads[c.key]["moved"] = self._move(conn, c)
            self._delete(conn, [c.key for c in deleting], payloads, now, idle)
        state = "done" if ledger_conn is conn else "pending"
        self.ledger.add_tombstones(
            ledger_conn,
            [
                self.ledger.tombstone_row(
                    run_id, c.key, c.client_id, c.action, c.verdict, c.reason, c.family, payloads[c.key], state
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
        for cred, table in self.sql.creds:
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
            rows = conn.execute(self.impl.lock_rows(sa.select(table).where(ref == c.key)))
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

    def _delete(
        self,
        conn: Connection,
        keys: list[str],
        payloads: dict[str, dict[str, Any]],
        now: datetime,
        idle: datetime | None,
    ) -> None:
        sql = self.sql
        # Which client a child row belongs to: its ref is the key, or another client column (DOT's client_id).
        owner_of: dict[str, dict[str, str]] = {}
        for cred, table in sql.column_creds:
            col = cred.client_column or ""
            owner_of[table.name] = {str(payloads[k]["client"].get(col)): k for k in keys}
        ref_of = {t.name: c.ref for c, t in sql.all_creds}

        def keep(table: str, names: list[str], rows: list[tuple[Any, ...]]) -> None:
            """Child rows into their clients' tombstones, as value arrays under the table's column names (a
            name per column, not per row: half the tombstone, and no dict a row)."""
            at = names.index(ref_of[table])
            owners = owner_of.get(table)
            for r in rows:
                value = str(r[at])
                p = payloads[owners.get(value, value) if owners is not None else value]
                p["columns"][table] = names
                p["children"].setdefault(table, []).append(encode_values(r))

        if self.profile.profile.delete.cascade:
            for cred, table in sql.all_creds:
                result = conn.execute(sa.select(table).where(sql.refs(cred, table, keys)))
                keep(table.name, list(result.keys()), [tuple(r) for r in result.all()])
        else:
            pointers = self._detach(conn, keys, now, idle)
            for cred, table in sql.children:
                names, rows = self.impl.delete_returning(conn, table, sql.dead_children(cred, table, keys, now, idle))
                patched = [d for d in sql.detach if d.table is table]
                if pointers and patched:
                    # A detached pointer goes into the tombstone with the value it held.
                    pk = [names.index(c.name) for c in _pk_cols(table)]
                    for i, r in enumerate(rows):
                        row_pk = _norm([r[j] for j in pk])
                        for d in patched:
                            if (table.name, d.column, row_pk) in pointers:
                                values = list(rows[i])
                                values[names.index(d.column)] = pointers.pop((table.name, d.column, row_pk))[0]
                                rows[i] = tuple(values)
                keep(table.name, names, rows)
            # Pointers of rows that stay (another client's, in theory): their tombstone sets them back.
            for (name, column, _at), (value, who, pk_row) in pointers.items():
                payloads[who].setdefault("detached", []).append(
                    {"table": name, "pk": encode_row(pk_row), "column": column, "value": encode_row({"v": value})}
                )
        names, gone = self.impl.delete_returning(conn, sql.client, sql.client_delete(keys, now, idle))
        key_at = names.index(self.profile.client.key)
        late = set(keys) - {str(r[key_at]) for r in gone}
        if late:
            raise _LateCredential(late)

    def _detach(
        self, conn: Connection, keys: list[str], now: datetime, idle: datetime | None
    ) -> dict[tuple[str, str, tuple[str, ...]], tuple[Any, str, dict[str, Any]]]:
        """Set NULL the pointers at rows this batch deletes, as the server's own delete does; return what they held:
        (table, column, primary key) -> (value, owning client's key, primary key row)."""
        sql = self.sql
        held: dict[tuple[str, str, tuple[str, ...]], tuple[Any, str, dict[str, Any]]] = {}
        for d in sql.detach:
            pk = _pk_cols(d.table)
            src, col = d.table, d.table.c[d.column]
            q = (
                sa.select(*pk, col, d.ref.c[d.ref_cred.ref])
                .select_from(src.join(d.ref, col == d.ref_pk))
                .where(sql.dead_children(d.ref_cred, d.ref, keys, now, idle))
            )
            found = [tuple(r) for r in conn.execute(q)]
            if not found:
                continue
            n = len(pk)
            for r in found:
                held[(src.name, d.column, _norm(r[:n]))] = (
                    r[n],
                    str(r[n + 1]),
                    {c.name: v for c, v in zip(pk, r, strict=False)},
                )
            match = pk[0].in_([r[0] for r in found]) if n == 1 else sa.tuple_(*pk).in_([r[:n] for r in found])
            conn.execute(sa.update(src).where(match).values({d.column: None}))
        return held

    def act(self, batch: Sequence[Candidate], run_id: str) -> BatchOutcome:
        """Act on one batch in short transactions (stale candidates apart); a late credential drops that client
        and retries."""
        outcome = BatchOutcome()
        for stale in (False, True):
            group = [c for c in batch if (c.reason == "stale") == stale]
            if group:
                part = self._act_group(group, run_id, stale)
                outcome.done += part.done
                outcome.skipped.update(part.skipped)
        return outcome

    def _act_group(self, batch: list[Candidate], run_id: str, stale: bool) -> BatchOutcome:
        todo = list(batch)
        outcome = BatchOutcome()
        try:
            for _attempt in range(5):
                try:
                    if self.ledger.shared:
                        with self.engine.begin() as conn:
                            done, skip = self._act(conn, todo, run_id, conn, stale)
                    else:
                        with self.engine.begin() as conn, self.ledger.begin() as lconn:
                            done, skip = self._act(conn, todo, run_id, lconn, stale)
                            lconn.commit()  # pending tombstones are durable before the delete commits (S5)
                        if done:
                            self.ledger.set_state(run_id, [c.key for c in done], "done")
                    outcome.done = done
                    if skip:
                        outcome.skipped["changed_since_scan"] += len(skip)
                    return outcome
                except _LateCredential as exc:
                    outcome.skipped["changed_since_scan"] += sum(c.key in exc.keys for c in todo)
                    todo = [c for c in todo if c.key not in exc.keys]
                    if not todo:
                        return outcome
        except DBAPIError as exc:
            if self.impl.is_lock_timeout(exc):
                # The auth server holds a row of this batch: leave the batch to the next run (S7).
                return BatchOutcome(skipped=Counter({"locked_by_auth_server": len(batch)}))
            raise self._fail("reap", exc) from None
        raise DatabaseError("a batch kept changing under the reaper; giving up on it")

    def recover(self) -> int:
        """After a crash with a separate ledger: keep tombstones whose client is gone, drop the others."""
        if self.ledger.shared:
            return 0
        pending = self.ledger.pending()
        if not pending:
            return 0
        sql = self.sql
        with self.engine.connect() as conn:
            present = {
                str(k)
                for (k,) in conn.execute(
                    sa.select(sql.key_col).where(self.impl.in_(sql.key_col, [key for _, key, _ in pending]))
                )
            }
        # Deleted and gone: the delete committed. Still there: it rolled back, the tombstone is void. A disable
        # leaves the row either way; keeping its tombstone is harmless (restore rewrites the values it had).
        self.ledger.settle(
            {i: "done" if key not in present or action == "disable" else "void" for i, key, action in pending}
        )
        return len(pending)

    def live_now(self, keys: Sequence[str]) -> list[str]:
        """Of these reaped client keys, those that a credential issued after the delete now references."""
        found: set[str] = set()
        keys = list(keys)
        try:
            with self.engine.connect() as conn:
                now = datetime.fromtimestamp(self.impl.begin_batch(conn), UTC)
                for cred, table in self.sql.creds:
                    if cred.kind == "record":
                        continue
                    comp = self.sql._compiler(cred, table, now)
                    for i in range(0, len(keys), 5000):
                        chunk = keys[i : i + 5000]
                        q = (
                            sa.select(table.c[cred.ref])
                            .where(self.impl.in_(table.c[cred.ref], chunk), live_condition(cred, comp))
                            .distinct()
                        )
                        found |= {str(r[0]) for r in conn.execute(q)}
                conn.rollback()
        except DBAPIError as exc:
            raise self._fail("late-token check", exc) from None
        return sorted(found)

    # -- restore ------------------------------------------------------------------------------------------

    def _present(self, conn: Connection, table: sa.Table, cols: list[Any], values: list[tuple[Any, ...]]) -> set[Any]:
        """Which of these values of `cols` a table holds (as normalized tuples)."""
        found: set[tuple[str, ...]] = set()
        for i in range(0, len(values), 5000):
            chunk = values[i : i + 5000]
            if len(cols) == 1:
                where = self.impl.in_(cols[0], [v[0] for v in chunk])
            else:
                where = sa.tuple_(*cols).in_(chunk)
            found |= {_norm(tuple(r)) for r in conn.execute(sa.select(*cols).where(where))}
        return found

    def _conflicts(
        self,
        conn: Connection,
        tombs: Sequence[Tombstone],
        clients: dict[int, dict[str, Any]],
        children: dict[int, dict[str, list[dict[str, Any]]]],
        keys_only: bool = False,
    ) -> list[str]:
        """Every row of these tombstones that cannot go back because its key or primary key is taken (a few
        queries per table for the whole batch)."""
        sql = self.sql
        problems: list[str] = []
        deleting = [t for t in tombs if t.action != "disable"]
        if not deleting:
            return problems
        key_col = sql.key_col
        taken = self._present(conn, sql.client, [key_col], [(clients[t.id][key_col.name],) for t in deleting])
        for t in deleting:
            value = clients[t.id][key_col.name]
            if _norm([value]) in taken:
                problems.append(f"client {t.client_id}: a client with {key_col.name} = {value!r} exists")
        if keys_only:
            return problems
        pk = _pk_cols(sql.client)
        if pk and [c.name for c in pk] != [key_col.name]:
            rows = {t.id: tuple(clients[t.id][c.name] for c in pk) for t in deleting}
            taken = self._present(conn, sql.client, pk, list(rows.values()))
            problems += [
                f"client {t.client_id}: its primary key is taken by another client row"
                for t in deleting
                if _norm(rows[t.id]) in taken and not any(p.startswith(f"client {t.client_id}:") for p in problems)
            ]
        by_table: dict[str, list[tuple[Tombstone, tuple[Any, ...]]]] = {}
        for t in deleting:
            for name, rows_ in children[t.id].items():
                tpk = _pk_cols(sql.tables[name])
                if tpk:
                    by_table.setdefault(name, []).extend((t, tuple(row[c.name] for c in tpk)) for row in rows_)
        for name, entries in by_table.items():
            table = sql.tables[name]
            taken = self._present(conn, table, _pk_cols(table), [v for _, v in entries])
            hit = {t.id: t for t, v in entries if _norm(v) in taken}
            problems += [
                f"client {t.client_id}: a row with the same primary key exists in {name}" for t in hit.values()
            ]
        return problems

    @staticmethod
    def _refuse(problems: list[str]) -> None:
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RestoreConflict(f"{problems[0]}{more}; nothing restored")

    def _order(self, names: set[str]) -> list[str]:
        """Child tables in an order their rows can go back in where foreign keys are checked at once: a table
        after those its foreign keys point at (pointers the profile detaches do not count: they go in NULL and
        are set afterwards), else in the profile's order."""
        sql = self.sql
        base = [t.name for _, t in sql.all_creds if t.name in names]
        base += sorted(names - set(base))
        detached = {(d.table.name, d.column) for d in sql.detach}
        needs = {
            n: {
                fk.target_fullname.split(".")[-2]
                for fk in sql.tables[n].foreign_keys
                if (n, fk.parent.name) not in detached
            }
            & (names - {n})
            for n in base
        }
        out: list[str] = []
        while len(out) < len(base):
            ready = [n for n in base if n not in out and needs[n] <= set(out)]
            out.append(ready[0] if ready else next(n for n in base if n not in out))  # a cycle: the profile's order
        return out

    def _fix_pointers(self, conn: Connection, fixes: dict[tuple[str, str], list[tuple[dict[str, Any], Any]]]) -> None:
        """Set detached pointers back, one executemany per (table, column)."""
        for (name, column), items in fixes.items():
            table = self.sql.tables[name]
            pk = _pk_cols(table)
            stmt = (
                sa.update(table)
                .where(*(c == sa.bindparam(f"pk_{i}") for i, c in enumerate(pk)))
                .values({column: sa.bindparam("v_")})
            )
            conn.execute(stmt, [{**{f"pk_{i}": row[c.name] for i, c in enumerate(pk)}, "v_": v} for row, v in items])

    def _put_back(
        self,
        conn: Connection,
        tombs: Sequence[Tombstone],
        clients: dict[int, dict[str, Any]],
        children: dict[int, dict[str, list[dict[str, Any]]]],
    ) -> int:
        sql = self.sql
        count = 0
        cols = (self.profile.profile.delete.disable_set or {}).keys()
        for tomb in tombs:
            if tomb.action == "disable":
                client = clients[tomb.id]
                conn.execute(
                    sa.update(sql.client)
                    .where(sql.key_col == client[sql.key_col.name])
                    .values({c: client[c] for c in cols})
                )
                count += 1
        deleting = [t for t in tombs if t.action != "disable"]
        if not deleting:
            return count
        insert_many(conn, sql.client, [clients[t.id] for t in deleting])
        count += len(deleting)
        pointers: dict[str, list[str]] = {}
        for d in sql.detach:
            pointers.setdefault(d.table.name, []).append(d.column)
        fixes: dict[tuple[str, str], list[tuple[dict[str, Any], Any]]] = {}
        names = {name for t in deleting for name, rows in children[t.id].items() if rows}
        for name in self._order(names):
            rows = [r for t in deleting for r in children[t.id].get(name, [])]
            for column in pointers.get(name, []):
                # In with the pointer NULL, set once every row it may point at is back (immediate foreign keys).
                for row in rows:
                    if row.get(column) is not None:
                        fixes.setdefault((name, column), []).append((row, row[column]))
                        row[column] = None
            insert_many(conn, sql.tables[name], rows)
            count += len(rows)
        for t in deleting:
            for d in t.payload.get("detached", []):
                fixes.setdefault((d["table"], d["column"]), []).append(
                    (decode_row(d["pk"]), decode_row(d["value"])["v"])
                )
        self._fix_pointers(conn, fixes)
        for tomb in deleting:
            for move in tomb.payload.get("moved", []):
                table = sql.tables[move["table"]]
                where = sa.and_(
                    *(c == v for c, v in zip(_pk_cols(table), decode_row(move["pk"]).values(), strict=False)),
                    table.c[move["column"]] == move["to"],
                )
                conn.execute(sa.update(table).where(where).values({move["column"]: move["from"]}))
        return count

    def restore(self, tombs: Sequence[Tombstone]) -> int:
        """Put a batch of clients back in one transaction; the ledger records it in the same transaction when it
        shares the database, else only once the rows are committed."""
        if not tombs:
            return 0
        clients = {t.id: t.payload["client"] for t in tombs}  # rows decoded by the ledger
        children = {t.id: t.payload["children"] for t in tombs if t.action != "disable"}
        try:
            with self.engine.begin() as conn:
                self.impl.begin_batch(conn)  # the checks below look keys up in the index
                # The client key first (it need not be unique in the schema: Authlib's client_id is not); a row
                # whose primary key is taken fails the insert, and then the whole check says which.
                self._refuse(self._conflicts(conn, tombs, clients, children, keys_only=True))
                try:
                    with conn.begin_nested():
                        rows = self._put_back(conn, tombs, clients, children)
                except IntegrityError:
                    self._refuse(self._conflicts(conn, tombs, clients, children))
                    raise
                if self.ledger.shared:
                    self.ledger.mark_restored(conn, tombs)  # same transaction as the rows
            if not self.ledger.shared:
                # Had the ledger committed first, a refused auth commit would leave the tombstones marked restored
                # and the clients gone for good. This way round, a failed ledger write leaves them open and a
                # retry stops at RestoreConflict.
                with self.ledger.begin() as lconn:
                    self.ledger.mark_restored(lconn, tombs)
        except DBAPIError as exc:
            raise self._fail("restore", exc) from None
        return rows
