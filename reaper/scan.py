"""Scan: one set-based, streamed query that yields each client with its credential facts."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import FromClause, TableClause

from reaper.dialects import Dialect
from reaper.fingerprint import ip_prefix
from reaper.predicates import Compiler, table_clause, untyped
from reaper.profile import BoundProfile, ClientMap, Condition, CredentialMap, TenantMap

FIELDS = ("name", "redirect_uris", "software_id", "software_version", "subject", "ip")


@dataclass(slots=True)
class ClientRow:
    """One client as the scan saw it. Holds no secret: secrets and tokens are never selected (S8)."""

    key: str
    client_id: str
    created_at: float | None
    name: str | None = None
    redirect_uris: tuple[str, ...] = ()
    software_id: str | None = None
    software_version: str | None = None
    subject: str | None = None
    ip: str | None = None
    ip_network: str | None = None  # the IP aggregated to the configured prefix: what families and reports use
    dynamic: bool = True
    cimd: bool = False
    disabled: bool = False
    live: dict[str, int] = field(default_factory=dict)
    total_credentials: int = 0
    last_used: float | None = None
    problems: list[str] = field(default_factory=list)


def to_epoch(value: Any, encoding: str | None) -> float | None:
    """Seconds since the epoch from a stored time, whatever its encoding."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return to_epoch(parsed, encoding)
    number = float(value)
    return number / 1000 if encoding == "epoch_ms" else number


def _table(name: str, columns: set[str]) -> TableClause:
    return table_clause(name, columns)


def _credential_columns(cred: CredentialMap) -> set[str]:
    cols = {cred.ref}
    if cred.issued_at and cred.issued_at.column:
        cols.add(cred.issued_at.column)
    for cond in (cred.live, cred.exclude):
        if cond is not None:
            cols |= cond.columns()
    if cred.tenant:
        cols.add(cred.tenant.column)
    return cols


def client_columns(profile: BoundProfile) -> set[str]:
    """Every client-table column the profile reads."""
    c = profile.client
    cols = {c.key, c.client_id}
    for f in (c.created_at, *(getattr(c, n) for n in FIELDS)):
        if f is not None and f.column:
            cols.add(f.column)
    for cond in (c.disabled, c.dynamic, c.cimd):
        if cond is not None:
            cols |= cond.columns()
    if c.tenant:
        cols.add(c.tenant.column)
    for lookup in _lookups(c).values():
        cols |= set(lookup.on.values())
    for cred in profile.scan_credentials:
        if cred.client_column:
            cols.add(cred.client_column)
        for cond in (cred.live, cred.exclude):
            for sub in cond.walk() if cond is not None else ():
                key, value = sub.kind()
                if key == "equals_client":
                    cols |= {value["client_column"], value.get("ref_client_column", c.key)}
    return cols


def _lookups(cm: ClientMap) -> dict[str, Any]:
    """Canonical attribute -> its LookupSource, for fields kept in another table."""
    fields = {"created_at": cm.created_at, **{n: getattr(cm, n) for n in FIELDS}}
    return {n: f.lookup for n, f in fields.items() if f is not None and f.lookup is not None}


def _other_tables(cond: Condition | None) -> Iterator[tuple[str, set[str]]]:
    """(table, columns) of every other table a condition reads through `exists`."""
    for sub in cond.walk() if cond is not None else ():
        key, value = sub.kind()
        if key == "exists":
            yield value.table, set(value.on) | (value.where.columns() if value.where is not None else set())


def profile_columns(profile: BoundProfile) -> dict[str, set[str]]:
    """Physical table -> columns read, for schema checks (and least-privilege grants)."""
    cm = profile.client
    out: dict[str, set[str]] = {profile.table(cm.table): client_columns(profile)}

    def add(table: str, cols: set[str]) -> None:
        out.setdefault(profile.table(table), set()).update(cols)

    conditions: list[Condition | None] = [cm.disabled, cm.dynamic, cm.cimd]
    for cred in profile.scan_credentials:
        add(cred.table, _credential_columns(cred))
        conditions += [cred.live, cred.exclude]
    for name in FIELDS:
        f = getattr(cm, name)
        if f is not None and f.rows is not None:
            add(f.rows.table, {f.rows.ref, f.rows.column})
    for lookup in _lookups(cm).values():
        add(
            lookup.table,
            set(lookup.on) | {lookup.column} | (lookup.where.columns() if lookup.where is not None else set()),
        )
        conditions.append(lookup.where)
    if cm.tenant and cm.tenant.via:
        add(cm.tenant.via.table, {cm.tenant.via.key, cm.tenant.via.column})
    for cond in conditions:
        for table, cols in _other_tables(cond):
            add(table, cols)
    return out


def live_condition(cred: CredentialMap, compiler: Compiler) -> Any:
    """SQL for 'this row is a live credential' (a consent alone never keeps a client alive)."""
    if cred.live is not None:
        return compiler.compile(cred.live)
    return sa.false() if cred.kind == "consent" else sa.true()


def _flag(cond_sql: Any) -> Any:
    return sa.case((cond_sql, 1), else_=0)


def _tenant_filter(table: FromClause, tenant: TenantMap | None, options: dict[str, Any]) -> list[Any]:
    if not tenant or options.get(tenant.option) in (None, ""):
        return []
    value = options[tenant.option]
    if tenant.via is not None:
        via = _table(tenant.via.table, {tenant.via.key, tenant.via.column}).alias("tenant_via")
        ids = sa.select(via.c[tenant.via.key]).where(via.c[tenant.via.column] == untyped(value))
        return [table.c[tenant.column].in_(ids.scalar_subquery())]
    return [table.c[tenant.column] == untyped(value)]


tenant_filter = _tenant_filter  # public: the reaper's re-check needs the same tenant filter as the scan


def build_query(profile: BoundProfile, dialect: Dialect, now: datetime) -> sa.Select[Any]:
    """The scan query: clients LEFT JOIN per-credential aggregates, newest first."""
    cm = profile.client
    client = _table(profile.table(cm.table), client_columns(profile)).alias("c")
    comp = Compiler(client, now, profile.options, dialect)
    cols: list[Any] = [client.c[cm.key].label("k"), client.c[cm.client_id].label("client_id")]
    data_cols = _data_columns(cm)
    cols += [client.c[name].label(f"f_{i}") for i, name in enumerate(data_cols)]
    for flag in ("dynamic", "cimd", "disabled"):
        cond = getattr(cm, flag)
        if cond is not None:
            cols.append(_flag(comp.compile(cond)).label(f"is_{flag}"))
    query_from: Any = client
    for i, cred in enumerate(profile.scan_credentials):
        t = _table(profile.table(cred.table), _credential_columns(cred)).alias(f"t{i}")
        cc = Compiler(t, now, profile.options, dialect)
        live = live_condition(cred, cc)
        aggs = [
            t.c[cred.ref].label("ref"),
            sa.func.sum(_flag(live)).label("live"),
            sa.func.count().label("total"),
        ]
        if cred.issued_at and cred.issued_at.column:
            aggs.append(sa.func.max(t.c[cred.issued_at.column]).label("last"))
        where = _tenant_filter(t, cred.tenant, profile.options)
        if cred.exclude is not None:
            where.append(sa.not_(cc.compile(cred.exclude)))
        sub = sa.select(*aggs).where(*where).group_by(t.c[cred.ref]).subquery(f"a{i}")
        query_from = query_from.outerjoin(sub, sub.c.ref == client.c[cred.client_column or cm.key])
        cols += [sub.c.live.label(f"live_{i}"), sub.c.total.label(f"total_{i}")]
        if "last" in sub.c:
            cols.append(sub.c.last.label(f"last_{i}"))
    for name in FIELDS:
        f = getattr(cm, name)
        if f is not None and f.rows is not None:
            rt = _table(profile.table(f.rows.table), {f.rows.ref, f.rows.column}).alias(f"r_{name}")
            agg = dialect.group_concat(rt.c[f.rows.column])
            rsel = sa.select(rt.c[f.rows.ref].label("ref"), agg.label("vals")).group_by(rt.c[f.rows.ref])
            subq = rsel.subquery(f"rows_{name}")
            query_from = query_from.outerjoin(subq, subq.c.ref == client.c[cm.key])
            cols.append(subq.c.vals.label(f"rows_{name}"))
    looked_up: dict[str, Any] = {}
    for name, lookup in _lookups(cm).items():
        lcols = set(lookup.on) | {lookup.column}
        if lookup.where is not None:
            lcols |= lookup.where.columns()
        lt = _table(profile.table(lookup.table), lcols).alias(f"l_{name}")
        pick = sa.func.min if lookup.pick == "min" else sa.func.max
        keys = list(lookup.on)
        on_cols = (lt.c[k].label(f"o{j}") for j, k in enumerate(keys))
        lsel = sa.select(*on_cols, pick(lt.c[lookup.column]).label("v"))
        if lookup.where is not None:
            lsel = lsel.where(Compiler(lt, now, profile.options, dialect).compile(lookup.where))
        lsub = lsel.group_by(*(lt.c[k] for k in keys)).subquery(f"lookup_{name}")
        on = sa.and_(*(lsub.c[f"o{j}"] == client.c[lookup.on[k]] for j, k in enumerate(keys)))
        query_from = query_from.outerjoin(lsub, on)
        looked_up[name] = lsub.c.v
        cols.append(lsub.c.v.label(f"lk_{name}"))
    tenant = _tenant_filter(client, cm.tenant, profile.options)
    query = sa.select(*cols).select_from(query_from).where(*tenant)
    created: Any = None
    if "created_at" in looked_up:
        created = looked_up["created_at"]
    elif cm.created_at is not None and cm.created_at.column:
        created = client.c[cm.created_at.column]
    if created is not None:
        query = query.order_by(created.is_(None), created.desc(), client.c[cm.key].desc())
    else:
        query = query.order_by(client.c[cm.key].desc())
    return query


def _data_columns(cm: ClientMap) -> list[str]:
    return sorted({f.column for f in (cm.created_at, *(getattr(cm, n) for n in FIELDS)) if f is not None and f.column})


def _split(value: Any, fmt: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if value.__class__ is list:
        items = tuple(value)
        for v in items:
            if v.__class__ is not str:
                return tuple(str(v) for v in items if v is not None)
        return items
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if v is not None)
    text = str(value)
    if fmt == "json":
        parsed = orjson.loads(text)
        if isinstance(parsed, str):
            return (parsed,)
        if not isinstance(parsed, list):
            raise ValueError("expected a JSON array")
        return tuple(str(v) for v in parsed if v is not None)
    if fmt == "comma":
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if fmt == "rows":
        return tuple(p for p in text.split("\n") if p)
    return tuple(text.split())


class RowDecoder:
    """Turns one raw result row into a ClientRow; bad data becomes a problem, never an exception.

    Column positions and decoding steps are worked out once, so the per-row work is plain indexing.
    """

    def __init__(self, profile: BoundProfile, now: datetime, skew: float, keys: list[str]):
        cm = profile.client
        self.profile = profile
        self.now = now.timestamp()
        self.skew = skew
        pos = {k: i for i, k in enumerate(keys)}
        col_pos = {name: pos[f"f_{i}"] for i, name in enumerate(_data_columns(cm))}
        self.created = None
        self.unknown_age_ok = False
        if cm.created_at is not None and cm.created_at.lookup is not None:
            lk = cm.created_at.lookup
            self.created = (pos["lk_created_at"], f"{lk.table}.{lk.column}", cm.created_at.encoding)
        elif cm.created_at is not None and cm.created_at.column:
            self.created = (col_pos[cm.created_at.column], cm.created_at.column, cm.created_at.encoding)
        if cm.created_at is not None:
            self.unknown_age_ok = cm.created_at.null == "unknown"
        # Plain fields: (attribute, position, column, list format). JSON fields grouped by column, so each
        # document is parsed once: (position, column, [(attribute, path parts, list format)]).
        self.plain: list[tuple[str, int, str, str | None]] = []
        groups: dict[int, tuple[int, str, list[tuple[str, tuple[str, ...], str | None]]]] = {}
        for name in FIELDS:
            f = getattr(cm, name)
            if f is None:
                continue
            if f.rows is not None:
                self.plain.append((name, pos[f"rows_{name}"], f.rows.table, "rows"))
            elif f.lookup is not None:
                self.plain.append((name, pos[f"lk_{name}"], f"{f.lookup.table}.{f.lookup.column}", f.format))
            elif f.json_path:
                at = col_pos[f.column or ""]
                groups.setdefault(at, (at, f.column or "", []))[2].append(
                    (name, tuple(f.json_path.split(".")), f.format)
                )
            else:
                self.plain.append((name, col_pos[f.column or ""], f.column or "", f.format))
        self.json_groups = list(groups.values())
        self.flags: list[tuple[str, int | None]] = [
            (flag, pos.get(f"is_{flag}")) for flag in ("dynamic", "cimd", "disabled")
        ]
        self.creds = []
        for i, cred in enumerate(profile.scan_credentials):
            enc = cred.issued_at.encoding if cred.issued_at else None
            self.creds.append((cred.kind, pos[f"live_{i}"], pos[f"total_{i}"], pos.get(f"last_{i}"), enc))
        self.key_pos, self.id_pos = pos["k"], pos["client_id"]

    def decode(self, row: Any) -> ClientRow:
        problems: list[str] = []
        created = None
        if self.created is not None:
            at, column, encoding = self.created
            raw = row[at]
            if encoding == "epoch" and raw.__class__ in (int, float):
                created = float(raw)
            else:
                try:
                    created = to_epoch(raw, encoding)
                except (TypeError, ValueError):
                    problems.append(f"{column}: unreadable time {str(raw)[:40]!r}")
            if created is None and not problems and not self.unknown_age_ok:
                problems.append(f"{column}: no registration time (NULL)")
            elif created is not None and created > self.now + self.skew:
                problems.append(f"{column}: registration time is in the future")
        out = ClientRow(str(row[self.key_pos]), str(row[self.id_pos]), created, problems=problems)
        for name, at, column, fmt in self.plain:
            self._set(out, name, row[at], column, fmt, problems)
        for at, column, fields in self.json_groups:
            doc = _parse_json(row[at], column, problems)
            for name, path, fmt in fields:
                value = doc
                for part in path:
                    value = value.get(part) if value.__class__ is dict else None
                self._set(out, name, value, column, fmt, problems)
        for flag, flag_at in self.flags:
            if flag_at is not None:
                setattr(out, flag, bool(row[flag_at]))
        last = None
        for kind, live_at, total_at, last_at, enc in self.creds:
            live = row[live_at]
            if live:
                out.live[kind] = out.live.get(kind, 0) + int(live)
            total = row[total_at]
            if total:
                out.total_credentials += int(total)
            if last_at is not None:
                raw_last = row[last_at]
                if raw_last is None:
                    continue
                if enc == "epoch" and raw_last.__class__ in (int, float):
                    t: float | None = float(raw_last)
                else:
                    try:
                        t = to_epoch(raw_last, enc)
                    except (TypeError, ValueError):
                        t = None
                if t is not None and (last is None or t > last):
                    last = t
        out.last_used = last
        return out

    @staticmethod
    def _set(out: ClientRow, name: str, value: Any, column: str, fmt: str | None, problems: list[str]) -> None:
        if name == "redirect_uris":
            try:
                out.redirect_uris = _split(value, fmt)
            except (ValueError, TypeError):
                problems.append(f"{column}: redirect URIs unreadable")
        elif value is not None:
            setattr(out, name, value if value.__class__ is str else str(value))


def _parse_json(raw: Any, column: str, problems: list[str]) -> Any:
    if raw is None or isinstance(raw, dict | list):
        return raw
    try:
        return orjson.loads(raw)
    except (ValueError, TypeError):
        problems.append(f"{column}: malformed JSON")
        return None


def scan(
    conn: Connection, profile: BoundProfile, dialect: Dialect, now: datetime, skew: float, batch: int = 2000
) -> Generator[ClientRow, None, None]:
    """Stream every client, newest first, with its credential facts.

    A reader thread fetches the next batch while this one decodes and classifies the last, so the database's
    work and ours overlap.
    """
    query = build_query(profile, dialect, now)
    result = conn.execution_options(**dialect.stream_options(batch)).execute(query)
    decoder = RowDecoder(profile, now, skew, list(result.keys()))
    decode = decoder.decode

    def decoded() -> Iterator[ClientRow]:
        for rows in _prefetched(result, batch):
            for row in rows:
                yield decode(row)

    try:
        if profile.client.ip is None and profile.ip.access_log is None:
            yield from decoded()  # the common case: no registrant IP anywhere, nothing more per row
        else:
            yield from with_ips(decoded(), profile)
    finally:
        close_streamed(result)


def close_streamed(result: Any) -> None:
    """Close a streamed result; when the connection died under it, close the driver's cursor all the same."""
    cursor = getattr(result, "cursor", None)
    try:
        result.close()
    finally:
        # SQLAlchemy logs (and swallows) a failed close; psycopg then still counts its server-side cursor as
        # open. A second close sees the broken connection and only marks the cursor closed.
        if cursor is not None and not getattr(cursor, "closed", True):
            try:
                cursor.close()
            except Exception:  # noqa: BLE001 - nothing more to free on a dead connection
                _forget_server_cursor(cursor)


def _forget_server_cursor(cursor: Any) -> None:
    """Mark a psycopg server-side cursor closed on our side only (its connection is gone, and with it the
    cursor on the server)."""
    for base in type(cursor).__mro__[1:]:
        if base.__name__ == "Cursor" and base.__module__.startswith("psycopg"):
            try:
                base.close(cursor)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
            return


def with_ips(rows: Iterator[ClientRow], profile: BoundProfile) -> Iterator[ClientRow]:
    """Fill IPs from the access log where the profile has none, and aggregate each to its network."""
    from reaper.accesslog import annotate, read_logs

    ip = profile.ip
    if ip.access_log is not None:
        log = ip.access_log
        rows = annotate(rows, read_logs(log.access_log, log.registration_path, log.format), log.window)
    v4, v6 = ip.v4_bits, ip.v6_bits
    for row in rows:
        if row.ip:
            row.ip_network = ip_prefix(row.ip, v4, v6)
        yield row


_DONE = object()


def _prefetched(result: Any, batch: int) -> Iterator[list[Any]]:
    """Batches of rows, read one batch ahead by a helper thread; errors re-raised here."""
    box: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                rows = result.fetchmany(batch)
                if not rows:
                    break
                box.put(rows)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put(exc)
        box.put(_DONE)

    thread = threading.Thread(target=reader, name="scan-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                box.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def count_clients(conn: Connection, profile: BoundProfile) -> int:
    """How many clients the scan will visit (for progress)."""
    cm = profile.client
    t = _table(profile.table(cm.table), client_columns(profile))
    q = sa.select(sa.func.count()).select_from(t).where(*_tenant_filter(t, cm.tenant, profile.options))
    return int(conn.execute(q).scalar_one())
