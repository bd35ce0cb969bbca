"""Acting on a SQL store: short batches where each statement re-checks liveness (S2), tombstones in the same
transaction as the delete (S5), timeouts and skipped row locks (S7); and restore from those tombstones.

Statements are built apart from running them, so `reap --sql` can print exactly what a batch would run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from reaper.backends.base import BatchOutcome, Candidate
from reaper.backends.sql.scan import credential_compiler, credential_filter, live_condition, tenant_filter
from reaper.config import PolicyConfig
from reaper.db import Compiler, DatabaseImpl, describe_error, exists_where, now_param, redact
from reaper.errors import DatabaseError, RestoreConflict
from reaper.ledger import Ledger, Tombstone, decode_row, encode_row
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
        try:
            self.client = self._reflect(md, engine, profile.client.table)
            self.creds = [(c, self._reflect(md, engine, c.table)) for c in profile.credentials]
        except DBAPIError as exc:
            raise DatabaseError(f"reflecting tables: {describe_error(exc, engine.url)}") from None
        by_name = {c.name: (c, t) for c, t in self.creds}
        self.children = [by_name[n] for n in profile.profile.delete.children]
        self.tables = {t.name: t for _, t in self.creds}

    def _reflect(self, md: sa.MetaData, engine: Engine, name: str) -> sa.Table:
        schema, _, bare = name.rpartition(".")
        return sa.Table(bare, md, autoload_with=engine, schema=schema or None, listeners=self.impl.reflect_listeners())

    @property
    def key_col(self) -> Any:
        return self.client.c[self.profile.client.key]

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

    def live_exists(self, now: datetime, idle_since: datetime | None = None) -> list[Any]:
        """One EXISTS per credential table: a live credential references the client."""
        out = []
        for cred, table in self.creds:
            if cred.kind == "record":
                continue
            cond = [table.c[cred.ref] == self.key_col, self.alive(cred, table, now, idle_since)]
            cond += credential_filter(self.profile, cred, table, now, self.impl)
            out.append(exists_where(*cond))
        return out

    def recheck(self, now: datetime, idle_since: datetime | None = None) -> Any:
        """The authority (S2): still no live credential, old enough, not CIMD, dynamic."""
        cm = self.profile.client
        comp = Compiler(self.client, now, self.profile.options, self.impl)
        cond = [sa.not_(e) for e in self.live_exists(now, idle_since)]
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
        q = sa.select(self.client).where(self.impl.in_(self.key_col, keys), self.recheck(now, idle_since))
        return self.impl.lock_rows(q)

    def dead_children(
        self, cred: CredentialMap, table: sa.Table, keys: list[str], now: datetime, idle_since: datetime | None = None
    ) -> Any:
        """A child table's rows of these clients that are not live credentials (a live one stays, and so does
        its client)."""
        dead = sa.case((self.alive(cred, table, now, idle_since), 1), else_=0) == 0
        if cred.exclude is not None:
            dead = sa.or_(dead, self._compiler(cred, table, now).compile(cred.exclude))
        return sa.and_(
            self.impl.in_(table.c[cred.ref], keys), dead, *tenant_filter(table, cred.tenant, self.profile.options)
        )

    def client_delete(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> Any:
        """The client goes only if nothing references it any more: a child row left behind is live, and so is
        any live row in a table not deleted from (S2)."""
        if self.profile.profile.delete.cascade:
            remaining = self.live_exists(now, idle_since)
        else:
            child_names = {t.name for _, t in self.children}
            remaining = [
                exists_where(t.c[c.ref] == self.key_col, *tenant_filter(t, c.tenant, self.profile.options))
                for c, t in self.children
            ]
            live_tables = [t.name for c, t in self.creds if c.kind != "record"]
            remaining += [
                e
                for name, e in zip(live_tables, self.live_exists(now, idle_since), strict=True)
                if name not in child_names
            ]
        return sa.and_(self.impl.in_(self.key_col, keys), *(sa.not_(e) for e in remaining))

    def disable(self, keys: list[str], now: datetime, idle_since: datetime | None = None) -> Any:
        values = self.profile.profile.delete.disable_set or {}
        where = self.recheck(now, idle_since)
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
                    stmts += [sa.select(t).where(self.impl.in_(t.c[c.ref], deleting)) for c, t in self.creds]
                else:
                    stmts += [
                        sa.delete(t).where(self.dead_children(c, t, deleting, now, idle)) for c, t in self.children
                    ]
                stmts.append(sa.delete(self.client).where(self.client_delete(deleting, now, idle)))
        return [
            str(s.compile(dialect=dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True}))
            for s in stmts
        ]


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
        now = datetime.fromtimestamp(self.impl.now(conn), UTC)  # the database's clock, in this transaction (S9)
        # Stale candidates live only through credentials that never expire: re-checked with those read as
        # expired, and with any credential issued since stale_after counting as the client coming back.
        idle = now - timedelta(seconds=self.stale_after) if stale and self.stale_after is not None else None
        if stale and idle is None:
            return [], list(batch)  # stale_after switched off since the plan: nothing is stale
        self.impl.set_timeouts(conn, self.pol.lock_timeout, self.pol.statement_timeout)
        keys = [c.key for c in batch]
        key_name = self.profile.client.key
        locked = {str(r[key_name]): r for r in (x._asdict() for x in conn.execute(sql.lock_clients(keys, now, idle)))}
        acting = [c for c in batch if c.key in locked]
        skipped = [c for c in batch if c.key not in locked]
        if not acting:
            return [], skipped
        payloads: dict[str, dict[str, Any]] = {
            c.key: {"client_table": sql.client.name, "client": encode_row(locked[c.key]), "children": {}, "moved": []}
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
        ref_of = {t.name: c.ref for c, t in sql.creds}
        if self.profile.profile.delete.cascade:
            for cred, table in sql.creds:
                for row in conn.execute(sa.select(table).where(self.impl.in_(table.c[cred.ref], keys))):
                    r = row._asdict()
                    payloads[str(r[cred.ref])]["children"].setdefault(table.name, []).append(encode_row(r))
        else:
            for cred, table in sql.children:
                for r in self.impl.delete_returning(conn, table, sql.dead_children(cred, table, keys, now, idle)):
                    payloads[str(r[ref_of[table.name]])]["children"].setdefault(table.name, []).append(encode_row(r))
        key_name = self.profile.client.key
        gone = self.impl.delete_returning(conn, sql.client, sql.client_delete(keys, now, idle))
        late = set(keys) - {str(r[key_name]) for r in gone}
        if late:
            raise _LateCredential(late)

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
                now = datetime.fromtimestamp(self.impl.now(conn), UTC)
                for cred, table in self.sql.creds:
                    if cred.kind == "record":
                        continue
                    comp = self.sql._compiler(cred, table, now)
                    for i in range(0, len(keys), 500):
                        chunk = keys[i : i + 500]
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

    def _pk_where(self, table: sa.Table, row: dict[str, Any]) -> Any:
        pk = list(table.primary_key.columns)
        if not pk:
            return None
        return sa.and_(*(c == row[c.name] for c in pk))

    def _conflicts(self, conn: Connection, tomb: Tombstone) -> list[str]:
        if tomb.action == "disable":
            return []
        sql = self.sql
        problems = []
        key_col = sql.key_col
        client = decode_row(tomb.payload["client"])
        if conn.execute(sa.select(sa.literal(1)).where(key_col == client[key_col.name])).first():
            problems.append(f"client {tomb.client_id}: a client with {key_col.name} = {client[key_col.name]!r} exists")
        else:
            where = self._pk_where(sql.client, client)
            if (
                where is not None
                and conn.execute(sa.select(sa.literal(1)).select_from(sql.client).where(where)).first()
            ):
                problems.append(f"client {tomb.client_id}: its primary key is taken by another client row")
        for name, rows in tomb.payload["children"].items():
            table = sql.tables[name]
            for raw in rows:
                where = self._pk_where(table, decode_row(raw))
                if where is not None and conn.execute(sa.select(sa.literal(1)).select_from(table).where(where)).first():
                    problems.append(f"client {tomb.client_id}: a row with the same primary key exists in {name}")
        return problems

    def _put_back(self, conn: Connection, tomb: Tombstone) -> int:
        sql = self.sql
        client = decode_row(tomb.payload["client"])
        if tomb.action == "disable":
            cols = (self.profile.profile.delete.disable_set or {}).keys()
            conn.execute(
                sa.update(sql.client)
                .where(sql.key_col == client[sql.key_col.name])
                .values({c: client[c] for c in cols})
            )
            return 1
        conn.execute(sql.client.insert().values(client))
        count = 1
        for name, rows in tomb.payload["children"].items():
            if rows:
                conn.execute(sql.tables[name].insert(), [decode_row(r) for r in rows])
                count += len(rows)
        for move in tomb.payload.get("moved", []):
            table = sql.tables[move["table"]]
            where = sa.and_(self._pk_where(table, decode_row(move["pk"])), table.c[move["column"]] == move["to"])
            conn.execute(sa.update(table).where(where).values({move["column"]: move["from"]}))
        return count

    def restore(self, tombs: Sequence[Tombstone]) -> int:
        """Put clients back in one transaction; the ledger records it in the same transaction when it shares the
        database, else only once the rows are committed."""
        if not tombs:
            return 0
        rows = 0
        try:
            with self.engine.begin() as conn:
                problems = [p for t in tombs for p in self._conflicts(conn, t)]
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise RestoreConflict(f"{problems[0]}{more}; nothing restored")
                for t in tombs:
                    rows += self._put_back(conn, t)
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
