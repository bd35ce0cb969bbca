"""The reaper's own tables: runs, tombstones (every reaped row, restorable), restores (which tombstones were put
back), aliases (merged client_ids) and the evidence each run acted on (loops, floods, the families it reaped from).

A Ledger owns the engine of the database it lives in: the auth database itself (SQL backends, by default) or a
separate one (`ledger.url`; required where the auth store is never written through SQL). Methods that take a
connection write inside the caller's transaction, so a tombstone commits with its delete (S5).

Tombstone payloads can be sealed with Fernet (`ledger.key` / `ledger.key_file`): the whole payload, so every
secret a store keeps (hashes, token values, a Keycloak representation, a key-value entry's bytes) is covered
without a list of secret columns to keep up to date; what `runs` and prefixes need (run, client_id, key,
family, verdict) stays in plain columns.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from reaper.config import LedgerConfig
from reaper.db import DatabaseImpl, describe_error, redact
from reaper.errors import ConfigError, DatabaseError, ReaperError

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

SEALED = "fernet:"  # a sealed payload's prefix; a plain one is a JSON object ("{...")
KEY_HINT = "ledger.key_file or DCR_REAPER_LEDGER__KEY"
CUT = re.compile(r"(?:…|\.\.\.)(?:\(\+\d+\))?$")  # how reports cut a long ID: "Y9h9MK…(+7)"


def holder_identity() -> str:
    """Who is acting: host and process id."""
    return f"{socket.gethostname()} pid {os.getpid()}"


@dataclass(frozen=True, slots=True)
class Tombstone:
    """One reaped client, as the ledger keeps it."""

    id: int
    run_id: str
    client_key: str
    client_id: str
    action: str
    verdict: str
    reason: str
    family: str
    acted_at: float
    state: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run as `runs` lists it; the counts come from its tombstones where they are kept."""

    id: str
    kind: str
    profile: str
    status: str
    started_at: float
    finished_at: float | None
    planned: int
    acted: int
    restored: int
    late: int
    pending: int
    tombstones: int
    holder: str
    message: str

    @property
    def purged(self) -> bool:
        """Its tombstones were purged (`ledger purge`): nothing of it can be restored any more."""
        return self.acted > 0 and self.tombstones == 0


def load_keys(settings: LedgerConfig) -> list[bytes]:
    """The Fernet keys from ledger.key or ledger.key_file ([] when neither is set); a bad key is a ConfigError."""
    if settings.key is not None:
        raw, where = settings.key.get_secret_value(), "ledger.key"
    elif settings.key_file is not None:
        where = f"ledger.key_file {settings.key_file}"
        try:
            raw = Path(settings.key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    else:
        return []
    keys = [k.strip().encode() for k in re.split(r"[,\s]+", raw) if k.strip()]
    if not keys:
        raise ConfigError(f"{where}: empty")
    from cryptography.fernet import Fernet  # here: 7 MB of OpenSSL only for a ledger with a key

    for k in keys:
        try:
            Fernet(k)
        except ValueError:
            raise ConfigError(
                f"{where}: not a Fernet key (32 url-safe base64 bytes; make one with `dcr-reaper ledger keygen`)"
            ) from None
    return keys


class Ledger:
    """Table definitions and operations on one database."""

    def __init__(self, engine: Engine, settings: LedgerConfig, shared: bool = False):
        self.engine = engine
        self.shared = shared  # the ledger lives in the auth database: tombstones commit with the delete
        keys = load_keys(settings)
        self.cipher: MultiFernet | None = None
        if keys:
            from cryptography.fernet import Fernet, MultiFernet

            self.cipher = MultiFernet([Fernet(k) for k in keys])
        impl = DatabaseImpl.for_engine(engine)
        self.impl = impl
        p, schema = settings.prefix, settings.schema_
        self.prefix = p
        self.metadata = sa.MetaData(schema=schema)
        self.runs = sa.Table(
            f"{p}runs",
            self.metadata,
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("finished_at", sa.Float),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("profile", sa.String(100), nullable=False),
            sa.Column("holder", sa.String(200), nullable=False),
            sa.Column("planned", sa.Integer, nullable=False, default=0),
            sa.Column("acted", sa.Integer, nullable=False, default=0),
            sa.Column("message", sa.Text),
        )
        self.tombstones = sa.Table(
            f"{p}tombstones",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(36), nullable=False, index=True),
            sa.Column("client_key", sa.String(255), nullable=False, index=True),
            sa.Column("client_id", sa.String(255), nullable=False, index=True),
            sa.Column("action", sa.String(16), nullable=False),
            sa.Column("verdict", sa.String(16), nullable=False),
            sa.Column("reason", sa.String(64), nullable=False),
            sa.Column("family", sa.String(32), nullable=False),
            sa.Column("acted_at", sa.Float, nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("restored_at", sa.Float),
            sa.Column("payload", impl.long_text(), nullable=False),
        )
        self.aliases = sa.Table(
            f"{p}aliases",
            self.metadata,
            sa.Column("alias_client_id", sa.String(255), primary_key=True),
            sa.Column("canonical_client_id", sa.String(255), nullable=False, index=True),
            sa.Column("family", sa.String(32), nullable=False),
            sa.Column("run_id", sa.String(36), nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
        )
        # Marks of restored tombstones. Inserting a narrow row costs a tenth of rewriting a tombstone (its
        # payload and four index entries) to set `restored_at`, which now only holds marks older ledgers wrote;
        # both are read. Like evidence, a table of its own: an older ledger gains it on `create()` unaltered.
        # Keyed by run too: a mark an older release's purge left behind never matches a tombstone that reuses
        # its id (SQLite reuses the highest id once it is deleted).
        self.restores = sa.Table(
            f"{p}restores",
            self.metadata,
            sa.Column("tombstone_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("run_id", sa.String(36), primary_key=True),
            sa.Column("restored_at", sa.Float, nullable=False),
        )
        self._has_restores = False
        # A table of its own (not a column of runs), so a ledger made by an older release gains it on its next
        # `create()` without altering a table.
        self.evidence_table = sa.Table(
            f"{p}evidence",
            self.metadata,
            sa.Column("run_id", sa.String(36), primary_key=True),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("payload", impl.long_text(), nullable=False),
        )

    # -- errors ----------------------------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database errors as one line naming the ledger's database; a refused permission names the schema, the
        role and the fix."""
        try:
            yield
        except DBAPIError as exc:
            url = self.engine.url
            text = describe_error(exc, url)
            if re.search(r"permission denied|command denied|access denied|must be owner", text, re.I):
                raise DatabaseError(self._denied(text)) from None
            raise DatabaseError(f"ledger on {redact(url)}: {text}") from None

    def _whereabouts(self) -> tuple[str, list[str], str]:
        """(the schema the ledger is created in, the schemas that already hold its tables, the current role)."""
        schema, found, role = self.metadata.schema or "", [], "this role"
        try:
            with self.engine.connect() as conn:
                insp = sa.inspect(conn)
                schema = schema or insp.default_schema_name or ""
                names = [self.metadata.schema] if self.metadata.schema else insp.get_schema_names()
                found = [s for s in names if s and insp.has_table(self.runs.name, schema=s)]
                role = str(conn.execute(sa.select(sa.func.current_user())).scalar_one())
        except (DBAPIError, NotImplementedError):
            pass
        return schema, found, role

    def _denied(self, text: str) -> str:
        schema, found, role = self._whereabouts()
        if found:
            where = ", ".join(f"{s}.{self.prefix}*" for s in found)
            return (
                f"ledger: role {role} may not use the ledger tables in {where} ({text}); they were made by another "
                "role (a first run as the owner or a superuser). Fix: run the roles script of deploy/sql/ again as "
                "the owner, it moves them into the schema the reap role owns (docs/deployment.md, 'Moving an "
                "existing ledger'), or set ledger.schema to a schema this role owns"
            )
        return (
            f"ledger: role {role} may not create the ledger tables in schema {schema or '(default)'} ({text}). "
            "Fix: reap and restore as the reap role the roles script of deploy/sql/ makes (it owns the ledger "
            "schema; docs/deployment.md), or give this role a schema of its own and set ledger.schema; report, "
            "check and serve need no ledger"
        )

    # -- connections -----------------------------------------------------------------------------------------

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on the ledger's database."""
        with self._errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._errors(), self.engine.connect() as conn:
            yield conn

    def create(self) -> None:
        """Create the ledger tables if missing (first --apply only; never from report)."""
        with self.begin() as conn:
            if self.metadata.schema:
                self.impl.ensure_schema(conn, self.metadata.schema)
            self.metadata.create_all(conn, checkfirst=True)

    def exists(self) -> bool:
        with self.connect() as conn:
            return sa.inspect(conn).has_table(self.tombstones.name, schema=self.metadata.schema)

    def has_restores_table(self, conn: Connection | None = None) -> bool:
        """Whether the restores table exists (a ledger made by an older release gains it on its next write). Asked
        on the caller's connection when it has one: SQLite would lock out a second."""
        if not self._has_restores:  # once there, it stays
            if conn is None:
                with self.connect() as own:
                    return self.has_restores_table(own)
            self._has_restores = sa.inspect(conn).has_table(self.restores.name, schema=self.metadata.schema)
        return self._has_restores

    def _with_marks(self, conn: Connection, q: sa.Select[Any]) -> tuple[sa.Select[Any], Any]:
        """A query over tombstones joined to their restore marks, and when each was restored (NULL: open)."""
        t = self.tombstones
        if not self.has_restores_table(conn):
            return q.select_from(t), t.c.restored_at
        r = self.restores
        marked = sa.and_(r.c.tombstone_id == t.c.id, r.c.run_id == t.c.run_id)
        return q.select_from(t.outerjoin(r, marked)), sa.func.coalesce(r.c.restored_at, t.c.restored_at)

    def has_evidence_table(self) -> bool:
        with self.connect() as conn:
            return sa.inspect(conn).has_table(self.evidence_table.name, schema=self.metadata.schema)

    # -- runs ----------------------------------------------------------------------------------------------

    def start_run(self, kind: str, profile: str, planned: int) -> str:
        run_id = str(uuid.uuid4())
        with self.begin() as conn:
            conn.execute(
                self.runs.insert().values(
                    id=run_id,
                    started_at=time.time(),
                    status="running",
                    kind=kind,
                    profile=profile,
                    holder=holder_identity(),
                    planned=planned,
                    acted=0,
                )
            )
        return run_id

    def progress(self, run_id: str, acted: int) -> None:
        """How many clients a running run has acted on so far (after each batch)."""
        with self.begin() as conn:
            conn.execute(self.runs.update().where(self.runs.c.id == run_id).values(acted=acted))

    def finish_run(self, run_id: str, status: str, acted: int, message: str = "") -> None:
        with self.begin() as conn:
            conn.execute(
                self.runs.update()
                .where(self.runs.c.id == run_id)
                .values(finished_at=time.time(), status=status, acted=acted, message=message[:2000])
            )

    def _counts(self, conn: Connection, run_ids: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """Per run: acted (done), restored (done and restored), late, pending, and all its tombstones."""
        t = self.tombstones

        def count(*cond: Any) -> Any:
            return sa.func.sum(sa.case((sa.and_(*cond), 1), else_=0))

        base, restored_at = self._with_marks(conn, sa.select(t.c.run_id))
        q = base.add_columns(
            count(t.c.state == "done"),
            count(t.c.state == "done", restored_at.is_not(None)),
            count(t.c.state == "late"),
            count(t.c.state == "pending"),
            sa.func.count(),
        ).group_by(t.c.run_id)
        if run_ids is not None:
            q = q.where(t.c.run_id.in_(list(run_ids)))
        keys = ("acted", "restored", "late", "pending", "tombstones")
        return {str(r[0]): {k: int(v or 0) for k, v in zip(keys, r[1:], strict=True)} for r in conn.execute(q)}

    def list_runs(self, limit: int | None = None, run_id: str | None = None) -> list[RunInfo]:
        """Runs, newest first, with their counts from the tombstones."""
        r = self.runs
        q = sa.select(r).order_by(r.c.started_at.desc())
        if run_id is not None:
            q = q.where(r.c.id == run_id)
        if limit:
            q = q.limit(limit)
        with self.connect() as conn:
            rows = list(conn.execute(q))
            counts = self._counts(conn, [row.id for row in rows]) if rows else {}
        out = []
        for row in rows:
            c = counts.get(row.id, {})
            kept = c.get("tombstones", 0)
            out.append(
                RunInfo(
                    row.id,
                    row.kind,
                    row.profile,
                    row.status,
                    row.started_at,
                    row.finished_at,
                    row.planned,
                    c["acted"] if kept else row.acted,
                    c.get("restored", 0),
                    c.get("late", 0),
                    c.get("pending", 0),
                    kept,
                    row.holder,
                    row.message or "",
                )
            )
        return out

    def run(self, run_id: str) -> RunInfo:
        found = self.list_runs(run_id=run_id)
        if not found:
            raise ReaperError(f"no run {run_id} in the ledger (`dcr-reaper runs` lists them)")
        return found[0]

    def reconcile(self) -> list[RunInfo]:
        """Runs left `running` by a process that died (call only while holding the run lock, so none is really
        running): their count from their tombstones, their status `interrupted`."""
        r, t = self.runs, self.tombstones
        with self.begin() as conn:
            stale = [row.id for row in conn.execute(sa.select(r.c.id).where(r.c.status == "running"))]
            if not stale:
                return []
            counts = self._counts(conn, stale)
            for run_id in stale:
                acted = counts.get(run_id, {}).get("acted", 0) + counts.get(run_id, {}).get("late", 0)
                last = conn.execute(sa.select(sa.func.max(t.c.acted_at)).where(t.c.run_id == run_id)).scalar()
                conn.execute(
                    r.update()
                    .where(r.c.id == run_id, r.c.status == "running")
                    .values(
                        status="interrupted",
                        finished_at=last,
                        acted=counts.get(run_id, {}).get("acted", 0),
                        message=f"interrupted: the process ended mid-run; {acted} client(s) acted on, counted from "
                        "the tombstones",
                    )
                )
        return [self.run(run_id) for run_id in stale]

    # -- prefixes --------------------------------------------------------------------------------------------

    def resolve_run(self, text: str) -> str:
        """A run id from the id itself or a unique prefix of it (as `runs` prints them)."""
        wanted = CUT.sub("", text.strip())
        if not wanted:
            raise ConfigError("--run: empty run id")
        r = self.runs
        with self.connect() as conn:
            ids = [row[0] for row in conn.execute(sa.select(r.c.id).where(r.c.id.startswith(wanted, autoescape=True)))]
        return _one(ids, wanted, "run", "`dcr-reaper runs` lists them")

    def resolve_client(self, text: str, run_id: str | None = None) -> str:
        """A reaped client's key from its client_id, its key, or a unique prefix of either (a pasted cut ID:
        "Y9h9MK…(+7)" reads as the prefix "Y9h9MK")."""
        raw = text.strip()
        wanted = CUT.sub("", raw)
        if not wanted:
            raise ConfigError("--client: empty client id")
        t = self.tombstones
        base = sa.select(t.c.client_key).distinct()
        if run_id is not None:
            base = base.where(t.c.run_id == run_id)
        with self.connect() as conn:
            if wanted == raw:
                exact = [
                    row[0] for row in conn.execute(base.where(sa.or_(t.c.client_id == raw, t.c.client_key == raw)))
                ]
                if exact:
                    return _one(exact, raw, "client", "")
            like = sa.or_(
                t.c.client_id.startswith(wanted, autoescape=True), t.c.client_key.startswith(wanted, autoescape=True)
            )
            keys = [row[0] for row in conn.execute(base.where(like).limit(6))]
        return _one(keys, wanted, "reaped client", "`dcr-reaper runs show RUN` lists a run's clients")

    # -- tombstones ---------------------------------------------------------------------------------------

    def seal(self, payload: dict[str, Any]) -> str:
        text = encode_payload(payload)
        if self.cipher is None:
            return text
        return SEALED + self.cipher.encrypt(text.encode()).decode()

    def unseal(self, text: str, tomb_id: int, run_id: str) -> dict[str, Any]:
        if not text.startswith(SEALED):
            return decode_payload(text)
        if self.cipher is None:
            raise ConfigError(
                f"the tombstones of run {run_id} are sealed: restoring needs the key that sealed them ({KEY_HINT})"
            )
        from cryptography.fernet import InvalidToken

        try:
            return decode_payload(self.cipher.decrypt(text[len(SEALED) :].encode()).decode())
        except InvalidToken:
            raise ConfigError(
                f"tombstone {tomb_id} of run {run_id} does not open with the configured ledger key: it was sealed "
                f"with another one (give every key, comma-separated, the newest first: {KEY_HINT})"
            ) from None

    def tombstone_row(
        self,
        run_id: str,
        key: str,
        client_id: str,
        action: str,
        verdict: str,
        reason: str,
        family: str,
        payload: dict[str, Any],
        state: str = "done",
    ) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "client_key": key,
            "client_id": client_id,
            "action": action,
            "verdict": verdict,
            "reason": reason,
            "family": family,
            "acted_at": time.time(),
            "state": state,
            "payload": self.seal(payload),
        }

    def add_tombstones(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert a batch's tombstones, many rows a statement."""
        insert_many(conn, self.tombstones, rows)

    def set_state(self, run_id: str, keys: Sequence[str], state: str, only: str = "pending") -> None:
        """Move tombstones of a run from `only` (pending) to `state` (done or void)."""
        t = self.tombstones
        with self.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.run_id == run_id, t.c.client_key.in_(list(keys)), t.c.state == only)
                .values(state=state)
            )

    def mark_late(self, ids: Sequence[int]) -> None:
        """Tombstones the late-token sweep restored at once: not counted as acted on."""
        if ids:
            t = self.tombstones
            with self.begin() as conn:
                conn.execute(sa.update(t).where(t.c.id.in_(list(ids))).values(state="late"))

    def pending(self) -> list[tuple[int, str, str]]:
        """(id, client key, action) of tombstones whose act was never confirmed."""
        t = self.tombstones
        with self.connect() as conn:
            rows = conn.execute(sa.select(t.c.id, t.c.client_key, t.c.action).where(t.c.state == "pending"))
            return [(int(i), str(k), str(a)) for i, k, a in rows]

    def settle(self, states: dict[int, str]) -> None:
        """Set the state of tombstones by id."""
        t = self.tombstones
        with self.begin() as conn:
            for tomb_id, state in states.items():
                conn.execute(sa.update(t).where(t.c.id == tomb_id).values(state=state))

    def _open_query(
        self, conn: Connection, run_id: str | None, client_id: str | None, keys: list[str] | None
    ) -> sa.Select[Any]:
        t = self.tombstones
        q = sa.select(t).where(t.c.restored_at.is_(None), t.c.state == "done")
        if self.has_restores_table(conn):
            r = self.restores
            q = q.where(~sa.exists().where(r.c.tombstone_id == t.c.id, r.c.run_id == t.c.run_id))
        if run_id:
            q = q.where(t.c.run_id == run_id)
        if client_id:
            q = q.where(sa.or_(t.c.client_id == client_id, t.c.client_key == client_id))
        if keys is not None:
            q = q.where(t.c.client_key.in_(keys))
        return q

    def _tombstone(self, r: Any) -> Tombstone:
        # By position (a page holds thousands): the tombstone table's columns in order, less restored_at.
        tomb_id, run_id, key, client_id, action, verdict, reason, family, acted_at, state, _, payload = r
        return Tombstone(
            tomb_id,
            run_id,
            key,
            client_id,
            action,
            verdict,
            reason,
            family,
            acted_at,
            state,
            self.unseal(payload, tomb_id, run_id),
        )

    def open_tombstones(
        self,
        run_id: str | None = None,
        client_id: str | None = None,
        keys: list[str] | None = None,
    ) -> list[Tombstone]:
        """Tombstones not yet restored, oldest first, selected by run, client_id or client key."""
        with self.connect() as conn:
            q = self._open_query(conn, run_id, client_id, keys).order_by(self.tombstones.c.id)
            return [self._tombstone(r) for r in conn.execute(q).all()]

    def open_ids(self, run_id: str) -> list[int]:
        """The ids of a run's open tombstones, oldest first (one query on the run's index)."""
        t = self.tombstones
        with self.connect() as conn:
            q = self._open_query(conn, run_id, None, None).with_only_columns(t.c.id)
            return sorted(int(i) for i in conn.execute(q).scalars().all())

    def pages(self, ids: list[int], batch: int = 1000) -> Iterator[list[Tombstone]]:
        """These open tombstones in pages of `batch`, each read by primary key: a page is a short query whatever
        the run's size (a keyset query on `run_id, id > after` re-read the run's whole index for every page), and
        holds no cursor open. A tombstone restored meanwhile is left out."""
        t = self.tombstones
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            with self.connect() as conn:
                q = self._open_query(conn, None, None, None).where(self.impl.in_(t.c.id, chunk)).order_by(t.c.id)
                page = [self._tombstone(r) for r in conn.execute(q).all()]
            if page:
                yield page

    def mark_restored(self, conn: Connection, tombs: Sequence[Tombstone]) -> None:
        """Record a restore (inside the caller's transaction): tombstones closed, merge aliases dropped."""
        now = time.time()
        insert_many(
            conn, self.restores, [{"tombstone_id": t.id, "run_id": t.run_id, "restored_at": now} for t in tombs]
        )
        aliases = [t.client_id for t in tombs if t.action == "merge"]
        if aliases:
            conn.execute(sa.delete(self.aliases).where(self.aliases.c.alias_client_id.in_(aliases)))

    def clients_of(self, run_id: str, limit: int | None = None) -> list[Any]:
        """A run's tombstones without payloads (client_id, key, action, verdict, reason, family, state, times)."""
        t = self.tombstones
        with self.connect() as conn:
            base, restored_at = self._with_marks(
                conn,
                sa.select(t.c.client_id, t.c.client_key, t.c.action, t.c.verdict, t.c.reason, t.c.family, t.c.state),
            )
            q = (
                base.add_columns(t.c.acted_at, restored_at.label("restored_at"))
                .where(t.c.run_id == run_id)
                .order_by(t.c.id)
            )
            if limit:
                q = q.limit(limit)
            return list(conn.execute(q))

    # -- evidence -----------------------------------------------------------------------------------------

    def add_evidence(self, run_id: str, record: dict[str, Any]) -> None:
        """What a run acted on, as its report showed it (loops, floods, families): kept after the clients go."""
        with self.begin() as conn:
            conn.execute(
                self.evidence_table.insert().values(
                    run_id=run_id, created_at=time.time(), payload=encode_payload(record)
                )
            )

    def evidence(self, run_id: str) -> dict[str, Any] | None:
        if not self.has_evidence_table():
            return None
        e = self.evidence_table
        with self.connect() as conn:
            text = conn.execute(sa.select(e.c.payload).where(e.c.run_id == run_id)).scalar()
        return decode_payload(text) if text else None

    # -- retention ----------------------------------------------------------------------------------------

    def purge(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Delete tombstones acted on, and evidence of runs started, more than `older_than` seconds ago; runs
        stay listed (as purged). Returns (tombstones, evidence records)."""
        cutoff = time.time() - older_than
        t, e, r = self.tombstones, self.evidence_table, self.runs
        old_runs = sa.select(r.c.id).where(r.c.started_at < cutoff)
        has_evidence = self.has_evidence_table()
        with self.begin() as conn:
            n_t = int(conn.execute(sa.select(sa.func.count()).where(t.c.acted_at < cutoff)).scalar_one())
            n_e = 0
            if has_evidence:
                n_e = int(conn.execute(sa.select(sa.func.count()).where(e.c.run_id.in_(old_runs))).scalar_one())
            if not dry_run:
                if self.has_restores_table(conn):
                    r = self.restores
                    old = sa.exists().where(t.c.id == r.c.tombstone_id, t.c.run_id == r.c.run_id, t.c.acted_at < cutoff)
                    conn.execute(sa.delete(r).where(old))
                conn.execute(sa.delete(t).where(t.c.acted_at < cutoff))
                if has_evidence:
                    conn.execute(sa.delete(e).where(e.c.run_id.in_(old_runs)))
        return n_t, n_e

    # -- aliases ------------------------------------------------------------------------------------------

    def add_alias(self, conn: Connection, alias: str, canonical: str, family: str, run_id: str) -> None:
        conn.execute(self.aliases.delete().where(self.aliases.c.alias_client_id == alias))
        conn.execute(
            self.aliases.insert().values(
                alias_client_id=alias,
                canonical_client_id=canonical,
                family=family,
                run_id=run_id,
                created_at=time.time(),
            )
        )

    def aliases_by_canonical(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.connect() as conn:
            for alias, canonical in conn.execute(
                sa.select(self.aliases.c.alias_client_id, self.aliases.c.canonical_client_id)
            ):
                out.setdefault(canonical, []).append(alias)
        return out


def _one(found: list[str], wanted: str, what: str, hint: str) -> str:
    """The one match of a prefix, or an error that says what matched."""
    unique = list(dict.fromkeys(found))
    if len(unique) == 1:
        return unique[0]
    if not unique:
        raise ReaperError(f"no {what} matches '{wanted}'" + (f" ({hint})" if hint else ""))
    shown = ", ".join(unique[:5]) + (", ..." if len(unique) > 5 else "")
    raise ReaperError(f"'{wanted}' matches more than one {what} ({shown}): give more of it")


def new_key() -> str:
    """A fresh Fernet key for ledger.key."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"$float": repr(value)}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$timedelta": value.total_seconds()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, dict | list):
        return {"$json": value}
    return {"$str": str(value)}


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$float": float,
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$timedelta": lambda s: dt.timedelta(seconds=s),
    "$decimal": Decimal,
    "$bytes": base64.b64decode,
    "$uuid": uuid.UUID,
    "$json": lambda v: v,
    "$str": str,
}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag in _DECODERS:
            return _DECODERS[tag](inner)
    return value


_PLAIN = frozenset({type(None), bool, int, str})


def encode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A database row as JSON-safe data, every type kept exactly (the row itself when it holds only plain
    values, as most do: the type check runs in C)."""
    if _PLAIN.issuperset(map(type, row.values())):
        return row
    return {k: v if v.__class__ in _PLAIN else _encode(v) for k, v in row.items()}


def encode_values(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row's values, in its table's column order, as JSON-safe data (`encode_row` without the names)."""
    if _PLAIN.issuperset(map(type, values)):
        return values
    return tuple(v if v.__class__ in _PLAIN else _encode(v) for v in values)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    if dict not in set(map(type, row.values())):
        return row
    return {k: _decode(v) if v.__class__ is dict else v for k, v in row.items()}


def encode_payload(payload: dict[str, Any]) -> str:
    try:
        return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode()  # reflected names: str subclasses
    except TypeError:  # a lone surrogate (SQLite text that is not UTF-8): the json module escapes it
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def decode_payload(text: str) -> dict[str, Any]:
    """A tombstone's payload. A SQL store's rows (its `client` and `children`) come back decoded, with names: child
    rows written as value arrays under their table's `columns` as much as those of tombstones written before
    that form."""
    try:
        payload = dict(orjson.loads(text))
    except orjson.JSONDecodeError:
        payload = dict(json.loads(text))
    if "children" not in payload:  # another store's payload (a key-value entry, a Keycloak representation)
        return payload
    # An encoded value is an object with one "$..." key: text without `"$` holds none (a string with `"$` in it
    # only costs the decoding).
    columns = payload.pop("columns", None) or {}
    children = {
        name: [dict(zip(columns[name], row, strict=True)) for row in rows] if name in columns else rows
        for name, rows in payload["children"].items()
    }
    if '"$' in text:
        payload["client"] = decode_row(payload["client"])
        children = {name: [decode_row(row) for row in rows] for name, rows in children.items()}
    payload["children"] = children
    return payload


def insert_many(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many rows of one table in the caller's transaction, the database's fastest way (COPY on
    PostgreSQL)."""
    DatabaseImpl.for_engine(conn).insert_rows(conn, table, list(rows))
