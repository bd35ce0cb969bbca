"""Scan: one set-based, streamed query that yields each client with its credential facts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import TableClause

from reaper.dialects import Dialect
from reaper.predicates import Compiler
from reaper.profile import BoundProfile, CredentialMap, FieldMap

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
    schema, _, bare = name.rpartition(".")
    return sa.table(bare, *(sa.column(c) for c in sorted(columns)), schema=schema or None)


def _credential_columns(cred: CredentialMap) -> set[str]:
    cols = {cred.ref}
    if cred.issued_at and cred.issued_at.column:
        cols.add(cred.issued_at.column)
    for cond in (cred.live, cred.exclude):
        if cond is not None:
            cols |= cond.columns()
    if cred.tenant:
        cols.add(cred.tenant["column"])
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
        cols.add(c.tenant["column"])
    return cols


def profile_columns(profile: BoundProfile) -> dict[str, set[str]]:
    """Physical table -> columns read, for schema checks."""
    out: dict[str, set[str]] = {profile.table(profile.client.table): client_columns(profile)}
    for cred in profile.credentials:
        out.setdefault(profile.table(cred.table), set()).update(_credential_columns(cred))
    for name in FIELDS:
        f = getattr(profile.client, name)
        if f is not None and f.rows is not None:
            out.setdefault(profile.table(f.rows.table), set()).update({f.rows.ref, f.rows.column})
    return out


def live_condition(cred: CredentialMap, compiler: Compiler) -> Any:
    """SQL for 'this row is a live credential' (a consent alone never keeps a client alive)."""
    if cred.live is not None:
        return compiler.compile(cred.live)
    return sa.false() if cred.kind == "consent" else sa.true()


def _flag(cond_sql: Any) -> Any:
    return sa.case((cond_sql, 1), else_=0)


def _tenant_filter(table: TableClause, tenant: dict[str, str] | None, options: dict[str, Any]) -> list[Any]:
    if not tenant or options.get(tenant["option"]) in (None, ""):
        return []
    return [table.c[tenant["column"]] == options[tenant["option"]]]


def build_query(profile: BoundProfile, dialect: Dialect, now: datetime) -> sa.Select[Any]:
    """The scan query: clients LEFT JOIN per-credential aggregates, newest first."""
    cm = profile.client
    client = _table(profile.table(cm.table), client_columns(profile)).alias("c")
    comp = Compiler(client, now, profile.options, dialect)
    cols: list[Any] = [client.c[cm.key].label("k"), client.c[cm.client_id].label("client_id")]
    data_cols = sorted(
        {f.column for f in (cm.created_at, *(getattr(cm, n) for n in FIELDS)) if f is not None and f.column}
    )
    cols += [client.c[name].label(f"f_{i}") for i, name in enumerate(data_cols)]
    for flag in ("dynamic", "cimd", "disabled"):
        cond = getattr(cm, flag)
        if cond is not None:
            cols.append(_flag(comp.compile(cond)).label(f"is_{flag}"))
    query_from: Any = client
    for i, cred in enumerate(profile.credentials):
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
        query_from = query_from.outerjoin(sub, sub.c.ref == client.c[cm.key])
        cols += [sub.c.live.label(f"live_{i}"), sub.c.total.label(f"total_{i}")]
        if "last" in sub.c:
            cols.append(sub.c.last.label(f"last_{i}"))
    for name in FIELDS:
        f = getattr(cm, name)
        if f is not None and f.rows is not None:
            rt = _table(profile.table(f.rows.table), {f.rows.ref, f.rows.column}).alias(f"r_{name}")
            agg = dialect.group_concat(rt.c[f.rows.column])
            sub = sa.select(rt.c[f.rows.ref].label("ref"), agg.label("vals")).group_by(rt.c[f.rows.ref])
            subq = sub.subquery(f"rows_{name}")
            query_from = query_from.outerjoin(subq, subq.c.ref == client.c[cm.key])
            cols.append(subq.c.vals.label(f"rows_{name}"))
    query = sa.select(*cols).select_from(query_from).where(*_tenant_filter(client, cm.tenant, profile.options))
    if cm.created_at is not None and cm.created_at.column:
        created = client.c[cm.created_at.column]
        query = query.order_by(created.is_(None), created.desc(), client.c[cm.key].desc())
    else:
        query = query.order_by(client.c[cm.key].desc())
    return query


def _split(value: Any, fmt: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if v is not None)
    text = str(value)
    if fmt == "json":
        parsed = json.loads(text)
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
    """Turns one raw result row into a ClientRow; bad data becomes a problem, never an exception."""

    def __init__(self, profile: BoundProfile, now: datetime, skew: float):
        cm = profile.client
        self.profile = profile
        self.now = now.timestamp()
        self.skew = skew
        data_cols = sorted(
            {f.column for f in (cm.created_at, *(getattr(cm, n) for n in FIELDS)) if f is not None and f.column}
        )
        self.col_index = {name: f"f_{i}" for i, name in enumerate(data_cols)}
        self.fields = {n: getattr(cm, n) for n in FIELDS if getattr(cm, n) is not None}
        self.creds = [(i, c) for i, c in enumerate(profile.credentials)]

    def _json(self, row: Any, column: str, cache: dict[str, Any], problems: list[str]) -> Any:
        if column not in cache:
            raw = getattr(row, self.col_index[column])
            if raw is None or isinstance(raw, dict | list):
                cache[column] = raw
            else:
                try:
                    cache[column] = json.loads(raw)
                except (ValueError, TypeError):
                    problems.append(f"{column}: malformed JSON")
                    cache[column] = None
        return cache[column]

    def _value(self, row: Any, name: str, f: FieldMap, cache: dict[str, Any], problems: list[str]) -> Any:
        if f.rows is not None:
            return getattr(row, f"rows_{name}")
        if f.json_path:
            doc = self._json(row, f.column or "", cache, problems)
            for part in f.json_path.split("."):
                doc = doc.get(part) if isinstance(doc, dict) else None
            return doc
        return getattr(row, self.col_index[f.column or ""])

    def decode(self, row: Any) -> ClientRow:
        problems: list[str] = []
        cm = self.profile.client
        created = None
        if cm.created_at is not None and cm.created_at.column:
            raw = getattr(row, self.col_index[cm.created_at.column])
            try:
                created = to_epoch(raw, cm.created_at.encoding)
            except (TypeError, ValueError):
                problems.append(f"{cm.created_at.column}: unreadable time {str(raw)[:40]!r}")
            if created is not None and created > self.now + self.skew:
                problems.append(f"{cm.created_at.column}: registration time is in the future")
        out = ClientRow(key=str(row.k), client_id=str(row.client_id), created_at=created, problems=problems)
        cache: dict[str, Any] = {}
        for name, f in self.fields.items():
            value = self._value(row, name, f, cache, problems)
            if name == "redirect_uris":
                try:
                    out.redirect_uris = _split(value, f.format)
                except (ValueError, TypeError):
                    problems.append(f"{f.column}: redirect URIs unreadable")
            elif value is not None:
                setattr(out, name, value if isinstance(value, str) else str(value))
        mapping = row._mapping
        out.dynamic = bool(mapping.get("is_dynamic", 1))
        out.cimd = bool(mapping.get("is_cimd", 0))
        out.disabled = bool(mapping.get("is_disabled", 0))
        last = None
        for i, cred in self.creds:
            live = mapping[f"live_{i}"]
            if live:
                out.live[cred.kind] = out.live.get(cred.kind, 0) + int(live)
            out.total_credentials += int(mapping[f"total_{i}"] or 0)
            raw_last = mapping.get(f"last_{i}")
            if raw_last is not None:
                try:
                    t = to_epoch(raw_last, cred.issued_at.encoding if cred.issued_at else None)
                except (TypeError, ValueError):
                    t = None
                if t is not None and (last is None or t > last):
                    last = t
        out.last_used = last
        return out


def scan(conn: Connection, profile: BoundProfile, dialect: Dialect, now: datetime, skew: float,
         batch: int = 2000) -> Iterator[ClientRow]:
    """Stream every client, newest first, with its credential facts."""
    query = build_query(profile, dialect, now)
    decoder = RowDecoder(profile, now, skew)
    result = conn.execution_options(**dialect.stream_options(batch)).execute(query)
    try:
        for row in result:
            yield decoder.decode(row)
    finally:
        result.close()


def count_clients(conn: Connection, profile: BoundProfile) -> int:
    """How many clients the scan will visit (for progress)."""
    cm = profile.client
    t = _table(profile.table(cm.table), client_columns(profile))
    q = sa.select(sa.func.count()).select_from(t).where(*_tenant_filter(t, cm.tenant, profile.options))
    return int(conn.execute(q).scalar_one())
