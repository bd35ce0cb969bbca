"""The SQL scan: one set-based, streamed query that yields each client with its credential facts, and the
token-side query loop detection needs."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import FromClause

from reaper.analysis.loops import RevokedIndex
from reaper.analysis.model import ClientRow
from reaper.backends.values import MAX_EPOCH, MIN_EPOCH, invalid_text, parse_json, parse_json_prefix, to_epoch
from reaper.db import Compiler, DatabaseImpl, Owner, now_param, table_clause, untyped
from reaper.db.impl import close_server_cursor
from reaper.profiles import FIELDS, BoundProfile, ClientMap, CredentialMap, TenantMap, credential_columns, profile_reads
from reaper.profiles.conditions import Lifetime

# What a field may cost, in characters read from the database: memory stays bounded whatever a row holds.
CAPS = {"name": 1024, "redirect_uris": 8192, "json": 16384}
SMALL_CAP = 256  # software_id, software_version, subject, ip


def _cap(cm: ClientMap, column: str) -> int | None:
    """The most characters the scan reads of a client column (None: read it whole, e.g. a time)."""
    caps = []
    for name, f in cm.fields():
        if f.column != column:
            continue
        if name == "created_at":
            return None
        caps.append(CAPS["json"] if f.json_path else CAPS.get(name, SMALL_CAP))
    return max(caps) if caps else None


def live_condition(cred: CredentialMap, compiler: Compiler) -> Any:
    """SQL for 'this row is a live credential' (a consent alone never keeps a client alive)."""
    if cred.live is not None:
        return compiler.compile(cred.live)
    return sa.false() if cred.kind in ("consent", "record") else sa.true()


def credential_compiler(
    profile: BoundProfile,
    cred: CredentialMap,
    table: FromClause,
    now: datetime,
    impl: DatabaseImpl,
    strict: bool = False,
) -> Compiler:
    """A compiler for one credential table's conditions, knowing the row's own client (`equals_client`)."""
    owner = Owner(cred.ref, profile.client.table, cred.client_column or profile.client.key)
    return Compiler(table, now, profile.options, impl, owner, strict)


def forever_fix(profile: BoundProfile) -> str:
    """The options that give the profile's never-expiring credentials a lifetime, where it has such options."""
    names = sorted(
        {
            c.lifetime.seconds_option
            for cred in profile.scan_credentials
            if cred.live is not None
            for c in cred.live.walk()
            if isinstance(c, Lifetime) and c.never_expires() and c.lifetime.seconds_option
        }
    )
    return " or ".join(f"options.{n}" for n in names if n)


def can_live_forever(cred: CredentialMap) -> bool:
    """Whether the credential's live condition reads NULL or 0 as "never expires" anywhere."""
    return cred.live is not None and any(c.never_expires() for c in cred.live.walk())


def tenant_filter(table: FromClause, tenant: TenantMap | None, options: dict[str, Any]) -> list[Any]:
    """Rows of one tenant only (Hydra's nid, Keycloak's realm) when the option is set."""
    if not tenant or options.get(tenant.option) in (None, ""):
        return []
    value = options[tenant.option]
    if tenant.via is not None:
        via = table_clause(tenant.via.table, {tenant.via.key, tenant.via.column}).alias("tenant_via")
        ids = sa.select(via.c[tenant.via.key]).where(via.c[tenant.via.column] == untyped(value))
        return [table.c[tenant.column].in_(ids.scalar_subquery())]
    return [table.c[tenant.column] == untyped(value)]


def credential_filter(
    profile: BoundProfile, cred: CredentialMap, table: FromClause, now: datetime, impl: DatabaseImpl
) -> list[Any]:
    """The rows of a credential table that count: its tenant, without its excluded rows."""
    where = tenant_filter(table, cred.tenant, profile.options)
    if cred.exclude is not None:
        where.append(sa.not_(credential_compiler(profile, cred, table, now, impl).compile(cred.exclude)))
    return where


def _flag(cond_sql: Any) -> Any:
    return sa.case((cond_sql, 1), else_=0)


def _data_columns(cm: ClientMap) -> list[str]:
    return sorted({f.column for _, f in cm.fields() if f.column})


def _revocation(profile: BoundProfile, t: Any, comp: Compiler, since: float | None) -> tuple[Any, Any]:
    """For the loop map's credential table `t`: (this row's refresh token was revoked, since `since` when given;
    the latest such revocation, as an aggregate)."""
    lmap = profile.profile.loops
    assert lmap is not None and lmap.revoked_at.column
    revoked_at = t.c[lmap.revoked_at.column]
    revoked = comp.compile(lmap.revoked)
    if since is not None:
        value = now_param(datetime.fromtimestamp(since, UTC), lmap.revoked_at.encoding)
        value = int(value) if lmap.revoked_at.encoding == "epoch" else value  # integer columns compare to integers
        revoked = sa.and_(revoked, revoked_at >= value)
    return revoked, sa.func.max(sa.case((revoked, revoked_at), else_=None))


def revocations_on_rows(profile: BoundProfile) -> CredentialMap | None:
    """The loop map's credential when the scan query can read each client's latest revocation in its own
    aggregate (a credential keyed by the client's key), so the revoked index needs no pass of its own."""
    lmap = profile.profile.loops
    if lmap is None:
        return None
    for cred in profile.scan_credentials:
        if cred.name == lmap.credential and cred.client_column in (None, profile.client.key) and cred.via is None:
            return cred
    return None


def build_query(
    profile: BoundProfile,
    impl: DatabaseImpl,
    now: datetime,
    only: Sequence[str] | None = None,
    revoked_since: float | None = None,
) -> sa.Select[Any]:
    """The scan query: clients LEFT JOIN per-credential aggregates. With `only`, just the clients with these keys
    (the aggregates narrowed to them too where a credential references the key). With `revoked_since`, the loop
    map credential's aggregate also carries its latest refresh revocation since then (`revocations_on_rows`)."""
    cm = profile.client
    reads = profile_reads(profile.profile)
    loop_cred = revocations_on_rows(profile) if revoked_since is not None else None
    client = table_clause(cm.table, reads[cm.table]).alias("c")
    comp = Compiler(client, now, profile.options, impl)
    cols: list[Any] = [client.c[cm.key].label("k")]
    if cm.client_id != cm.key:  # read once where the key is the client_id (the decoder reuses the string)
        cols.append(client.c[cm.client_id].label("client_id"))
    for i, name in enumerate(_data_columns(cm)):
        cap = _cap(cm, name)
        col = client.c[name] if cap is None else impl.prefix(client.c[name], cap)
        cols.append(col.label(f"f_{i}"))
    for flag, cond in cm.flags():
        cols.append(_flag(comp.compile(cond)).label(f"is_{flag}"))
    query_from: Any = client
    for i, cred in enumerate(profile.scan_credentials):
        columns = credential_columns(cred) | (reads[cred.table] if cred is loop_cred else set())
        t = table_clause(cred.table, columns).alias(f"t{i}")
        comp_t = credential_compiler(profile, cred, t, now, impl)
        live = live_condition(cred, comp_t)
        aggs = [t.c[cred.ref].label("ref"), sa.func.sum(_flag(live)).label("live"), sa.func.count().label("total")]
        if cred is loop_cred:
            aggs.append(_revocation(profile, t, comp_t, revoked_since)[1].label("revoked"))
        if can_live_forever(cred):  # live counted again with "never expires" read as expired
            strict = live_condition(cred, credential_compiler(profile, cred, t, now, impl, strict=True))
            aggs.append(sa.func.sum(_flag(strict)).label("strict"))
        if cred.issued_at and cred.issued_at.column:
            aggs.append(sa.func.max(t.c[cred.issued_at.column]).label("last"))
        where = credential_filter(profile, cred, t, now, impl)
        if only is not None and cred.client_column in (None, cm.key):
            where.append(impl.in_(t.c[cred.ref], only))
        sub = sa.select(*aggs).where(*where).group_by(t.c[cred.ref]).subquery(f"a{i}")
        query_from = query_from.outerjoin(sub, sub.c.ref == client.c[cred.client_column or cm.key])
        cols += [sub.c.live.label(f"live_{i}"), sub.c.total.label(f"total_{i}")]
        if "strict" in sub.c:
            cols.append(sub.c.strict.label(f"strict_{i}"))
        if "last" in sub.c:
            cols.append(sub.c.last.label(f"last_{i}"))
        if "revoked" in sub.c:
            cols.append(sub.c.revoked.label("revoked_at"))
    looked_up: dict[str, Any] = {}
    for name, f in cm.fields():
        if f.rows is not None:
            rt = table_clause(f.rows.table, {f.rows.ref, f.rows.column}).alias(f"r_{name}")
            agg = impl.group_concat(rt.c[f.rows.column])
            rsel = sa.select(rt.c[f.rows.ref].label("ref"), agg.label("vals")).group_by(rt.c[f.rows.ref])
            if only is not None:
                rsel = rsel.where(impl.in_(rt.c[f.rows.ref], only))
            subq = rsel.subquery(f"rows_{name}")
            query_from = query_from.outerjoin(subq, subq.c.ref == client.c[cm.key])
            cols.append(subq.c.vals.label(f"rows_{name}"))
        if f.lookup is not None:
            lookup = f.lookup
            lt = table_clause(lookup.table, reads[lookup.table]).alias(f"l_{name}")
            pick = sa.func.min if lookup.pick == "min" else sa.func.max
            keys = list(lookup.on)
            on_cols = (lt.c[k].label(f"o{j}") for j, k in enumerate(keys))
            lsel = sa.select(*on_cols, pick(lt.c[lookup.column]).label("v"))
            if lookup.where is not None:
                lsel = lsel.where(Compiler(lt, now, profile.options, impl).compile(lookup.where))
            lsub = lsel.group_by(*(lt.c[k] for k in keys)).subquery(f"lookup_{name}")
            on = sa.and_(*(lsub.c[f"o{j}"] == client.c[lookup.on[k]] for j, k in enumerate(keys)))
            query_from = query_from.outerjoin(lsub, on)
            looked_up[name] = lsub.c.v
            cols.append(lsub.c.v.label(f"lk_{name}"))
    tenant = tenant_filter(client, cm.tenant, profile.options)
    if only is not None:
        tenant.append(impl.in_(client.c[cm.key], only))
    query = sa.select(*cols).select_from(query_from).where(*tenant)
    # No ORDER BY: a sort would keep the database busy before the first row; the classifier needs no order.
    return query


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
        try:
            parsed = parse_json(text)
        except ValueError:
            if len(text) < CAPS["redirect_uris"]:
                raise
            parsed = parse_json_prefix(text)  # cut at the cap: the complete URIs before the cut
        if isinstance(parsed, str):
            return (parsed,)
        if not isinstance(parsed, list):
            raise ValueError("expected a JSON array")
        return tuple(str(v) for v in parsed if v is not None)
    if len(text) >= CAPS["redirect_uris"]:
        text = text[: max(text.rfind(" "), text.rfind(","), 0)]  # a URI cut at the cap would mislead
    if fmt == "comma":
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if fmt == "rows":
        return tuple(p for p in text.split("\n") if p)
    return tuple(text.split())


# Distinct values remembered per decoder (names, redirect URI lists, software ids): most rows repeat a value an
# earlier row had, so the per-row work is a dictionary lookup. A cache that fills up starts over: bounded memory
# (a few MB each at this size, measured with tracemalloc).
CACHE_SIZE = 16384

FieldSetter = Callable[[ClientRow, Any, list[str]], None]


def _text_setter(name: str, column: str) -> FieldSetter:
    """Sets a text field, cut at its cap; invalid UTF-8 is a problem. Remembers each distinct value."""
    cap = CAPS.get(name, SMALL_CAP)
    cache: dict[str, tuple[str, bool]] = {}
    problem = f"{column}: {name} is not valid UTF-8"

    def put(out: ClientRow, value: Any, problems: list[str]) -> None:
        if value is None:
            return
        known = cache.get(value) if value.__class__ is str else None
        if known is None:
            text = value if value.__class__ is str else str(value)
            if len(text) > cap:
                text = text[:cap]
            known = (text, invalid_text(text))
            if value.__class__ is str:
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[value] = known
        if known[1]:
            problems.append(problem)
        setattr(out, name, known[0])

    return put


def _redirects_setter(column: str, fmt: str | None) -> FieldSetter:
    """Sets redirect_uris from a list or a text in the field's format. Remembers each distinct value."""
    cache: dict[Any, tuple[tuple[str, ...], str | None]] = {}
    unreadable, not_utf8 = f"{column}: redirect URIs unreadable", f"{column}: redirect URIs are not valid UTF-8"

    def put(out: ClientRow, value: Any, problems: list[str]) -> None:
        key = tuple(value) if value.__class__ is list else value if value.__class__ is str else None
        try:
            known = cache.get(key) if key is not None else None
        except TypeError:  # a JSON array holding objects: not hashable, decoded every time
            key, known = None, None
        if known is None:
            try:
                uris = _split(value, fmt)
                uris = key if uris == key else uris  # one tuple for the key and the value
                known = (uris, not_utf8 if any(invalid_text(u) for u in uris) else None)
            except (ValueError, TypeError):
                known = ((), unreadable)
            if key is not None:
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[key] = known
        out.redirect_uris = known[0]
        if known[1] is not None:
            problems.append(known[1])

    return put


class RowDecoder:
    """Turns one raw result row into a ClientRow; bad data becomes a problem, never an exception.

    Column positions, decoding steps and field setters are worked out once, so the per-row work is plain
    indexing and, for values seen before, a dictionary lookup.
    """

    def __init__(self, profile: BoundProfile, now: datetime, skew: float, keys: list[str]):
        cm = profile.client
        self.now = now.timestamp()
        self.skew = skew
        self.latest = self.now + skew  # a registration after this is in the future
        pos = {k: i for i, k in enumerate(keys)}
        col_pos = {name: pos[f"f_{i}"] for i, name in enumerate(_data_columns(cm))}
        self.created: tuple[int, str, str | None] | None = None
        self.unknown_age_ok = False
        if cm.created_at is not None and cm.created_at.lookup is not None:
            lk = cm.created_at.lookup
            self.created = (pos["lk_created_at"], f"{lk.table}.{lk.column}", cm.created_at.encoding)
        elif cm.created_at is not None and cm.created_at.column:
            self.created = (col_pos[cm.created_at.column], cm.created_at.column, cm.created_at.encoding)
        if cm.created_at is not None:
            self.unknown_age_ok = cm.created_at.null == "unknown"
        # Plain fields: (position, setter). JSON fields grouped by column, so each document is parsed once:
        # (position, column, [(path parts, setter)]).
        self.plain: list[tuple[int, FieldSetter]] = []
        groups: dict[int, tuple[int, str, list[tuple[tuple[str, ...], FieldSetter]]]] = {}
        for name in FIELDS:
            f = getattr(cm, name)
            if f is None:
                continue
            column = f.column or ""
            if f.rows is not None:
                at, column, fmt = pos[f"rows_{name}"], f.rows.table, "rows"
            elif f.lookup is not None:
                at, column, fmt = pos[f"lk_{name}"], f"{f.lookup.table}.{f.lookup.column}", f.format
            else:
                at, fmt = col_pos[column], f.format
            setter = _redirects_setter(column, fmt) if name == "redirect_uris" else _text_setter(name, column)
            if f.json_path and f.rows is None and f.lookup is None:
                groups.setdefault(at, (at, column, []))[2].append((tuple(f.json_path.split(".")), setter))
            else:
                self.plain.append((at, setter))
        # A one-part path (the usual case) is read with one get, a longer one member by member; fields keep the
        # profile's order (so do the problems they report): (position, column, [(member or None, parts, setter)]).
        self.json_groups = [
            (at, column, [(p[0] if len(p) == 1 else None, p, put) for p, put in fields])
            for at, column, fields in groups.values()
        ]
        self.dynamic_at, self.cimd_at, self.disabled_at = (pos.get(f"is_{f}") for f in ("dynamic", "cimd", "disabled"))
        self.creds = []
        for i, cred in enumerate(profile.scan_credentials):
            enc = cred.issued_at.encoding if cred.issued_at else None
            strict_at = pos.get(f"strict_{i}", pos[f"live_{i}"])  # no "never" rule: strict is live itself
            self.creds.append((cred.kind, pos[f"live_{i}"], pos[f"total_{i}"], pos.get(f"last_{i}"), enc, strict_at))
        self.key_pos, self.id_pos = pos["k"], pos.get("client_id", pos["k"])
        # (position, the loop credential's live count when a live row clears the revocation, encoding)
        self.revoked: tuple[int, int | None, str | None] | None = None
        lmap = profile.profile.loops
        if "revoked_at" in pos and lmap is not None:
            i = next(i for i, c in enumerate(profile.scan_credentials) if c.name == lmap.credential)
            live_at = pos[f"live_{i}"] if lmap.evidence == "replay" else None
            self.revoked = (pos["revoked_at"], live_at, lmap.revoked_at.encoding)

    def decode(self, row: Any) -> ClientRow:
        problems: list[str] = []
        created = None
        if self.created is not None:
            at, column, encoding = self.created
            raw = row[at]
            if raw.__class__ is int and encoding == "epoch" and MIN_EPOCH <= raw <= MAX_EPOCH:
                created = float(raw)  # the usual case first
            elif encoding == "epoch" and raw.__class__ is float and MIN_EPOCH <= raw <= MAX_EPOCH:
                created = raw
            elif encoding in ("epoch", "epoch_ms") and isinstance(raw, str):
                # Text in a number column (SQLite keeps what it is given): the statement that re-checks the age
                # compares numbers, so such a row could be planned and never acted on. A problem row instead.
                problems.append(f"{column}: text {raw[:40]!r} in an epoch column")
            else:
                try:
                    created = to_epoch(raw, encoding)
                except (TypeError, ValueError):
                    problems.append(f"{column}: unreadable time {str(raw)[:40]!r}")
            if created is None and not problems and not self.unknown_age_ok:
                problems.append(f"{column}: no registration time (NULL)")
            elif created is not None and created > self.latest:
                problems.append(f"{column}: registration time is in the future")
        key = row[self.key_pos]
        key = key if key.__class__ is str else str(key)
        if self.id_pos == self.key_pos:
            client_id = key  # one string for both: families and evidence keep it
        else:
            client_id = row[self.id_pos]
            client_id = client_id if client_id.__class__ is str else str(client_id)
        out = ClientRow(key, client_id, created, problems=problems)
        if not (client_id.isascii() and key.isascii()) and (invalid_text(client_id) or invalid_text(key)):
            problems.append("client_id: not valid UTF-8")
        for at, put in self.plain:
            put(out, row[at], problems)
        for at, column, fields in self.json_groups:
            raw_doc = row[at]
            try:
                doc = orjson.loads(raw_doc) if raw_doc.__class__ is str else _parse_json(raw_doc, column, problems)
            except orjson.JSONDecodeError:  # NaN, Infinity, a document cut at the cap, or no JSON at all
                doc = _parse_json(raw_doc, column, problems)
            get = doc.get if doc.__class__ is dict else _nothing
            for member, path, put in fields:
                if member is not None:
                    put(out, get(member), problems)
                    continue
                value = doc
                for part in path:
                    value = value.get(part) if value.__class__ is dict else None
                put(out, value, problems)
        if self.dynamic_at is not None:
            out.dynamic = bool(row[self.dynamic_at])
        if self.cimd_at is not None:
            out.cimd = bool(row[self.cimd_at])
        if self.disabled_at is not None:
            out.disabled = bool(row[self.disabled_at])
        last = None
        strict_live = 0
        for kind, live_at, total_at, last_at, enc, strict_at in self.creds:
            live = row[live_at]
            if live:
                out.live[kind] = out.live.get(kind, 0) + int(live)
                strict_live += int(row[strict_at] or 0)
            total = row[total_at]
            if total and kind != "login":  # a login in progress is no sign the client was ever used
                out.total_credentials += int(total)
            if last_at is not None:
                raw_last = row[last_at]
                if raw_last is None:
                    continue
                t: float | None
                if enc == "epoch" and raw_last.__class__ in (int, float) and MIN_EPOCH <= raw_last <= MAX_EPOCH:
                    t = float(raw_last)
                else:
                    try:
                        t = to_epoch(raw_last, enc)
                    except (TypeError, ValueError):
                        problems.append(f"{kind} issue time unreadable or out of range: {str(raw_last)[:40]!r}")
                        t = None
                if t is not None and (last is None or t > last):
                    last = t
        out.last_used = last
        out.live_forever_only = bool(out.live) and strict_live == 0
        if self.revoked is not None:
            revoked_at, cleared_at, revoked_enc = self.revoked
            raw_revoked = row[revoked_at]
            if raw_revoked is not None and (cleared_at is None or not row[cleared_at]):
                try:
                    out.revoked_at = to_epoch(raw_revoked, revoked_enc)
                except (TypeError, ValueError):
                    pass  # as the revoked index reads it: an unreadable time is no revocation
        return out


def _nothing(_member: str) -> None:
    """`dict.get` for a document that is not an object: no member has a value."""
    return None


def _parse_json(raw: Any, column: str, problems: list[str]) -> Any:
    if raw is None or isinstance(raw, dict | list):
        return raw
    try:
        return parse_json(raw)
    except (ValueError, TypeError):
        if isinstance(raw, str) and len(raw) >= CAPS["json"]:
            return parse_json_prefix(raw)  # cut at the cap: every member before the cut
        problems.append(f"{column}: malformed JSON")
        return None


def close_streamed(result: Any) -> None:
    """Close a streamed result; when the connection died under it, close the driver's cursor all the same."""
    cursor = getattr(result, "cursor", None)
    try:
        result.close()
    finally:
        # SQLAlchemy logs (and swallows) a failed close; psycopg then still counts its server-side cursor as
        # open. A second close sees the broken connection and only marks the cursor closed.
        if cursor is not None and not getattr(cursor, "closed", True):
            close_server_cursor(cursor)


_DONE = object()


def prefetched(batches: Iterator[Sequence[Any]]) -> Iterator[Sequence[Any]]:
    """The same batches, each read one ahead by a helper thread; its errors re-raised here. The reader fetches
    the next batch only once the last was taken: two batches in memory at most."""
    box: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        try:
            for rows in batches:
                box.put(rows)
                box.join()  # taken: fetch the next while it is decoded
                if stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put(exc)
        box.put(_DONE)

    thread = threading.Thread(target=reader, name="scan-reader", daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not _DONE:
            box.task_done()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                box.get(timeout=0.05)
                box.task_done()
            except queue.Empty:
                pass
        thread.join()


def paced(batches: Iterator[Sequence[Any]], rows_per_second: int) -> Iterator[Sequence[Any]]:
    """The same rows, in slices of a tenth of a second's worth, none handed out before its time: at most
    `rows_per_second` on average. A sleep is never longer than a slice, so a stop request is not kept waiting."""
    size = max(1, rows_per_second // 10)
    started = time.monotonic()
    done = 0
    for rows in batches:
        for at in range(0, len(rows), size):
            ahead = started + done / rows_per_second - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            chunk = rows[at : at + size]
            done += len(chunk)
            yield chunk


def revoked_query(profile: BoundProfile, impl: DatabaseImpl, now: datetime, since: float | None) -> sa.Select[Any]:
    """Clients with a refresh token revoked since `since` and no live row left in the loop map's credential
    table, with the time of their latest revocation: one grouped pass over that table, no join."""
    lmap = profile.profile.loops
    assert lmap is not None and lmap.revoked_at.column
    cred = profile.profile.credential(lmap.credential)
    reads = profile_reads(profile.profile)
    t: Any = table_clause(cred.table, reads[cred.table]).alias("lt")
    comp = credential_compiler(profile, cred, t, now, impl)
    revoked, latest = _revocation(profile, t, comp, since)
    live = live_condition(cred, comp)
    where = credential_filter(profile, cred, t, now, impl)
    # Only rows that matter: recent revocations, and live rows (one live row clears its client).
    where.append(sa.or_(revoked, live))
    query = sa.select(t.c[cred.ref].label("ref"), latest).where(*where).group_by(t.c[cred.ref])
    if lmap.evidence == "replay":  # a live row clears its client; with rotation evidence the successor is live
        query = query.having(sa.func.sum(sa.case((live, 1), else_=0)) == 0)
    else:
        query = query.having(latest.is_not(None))
    # Ordering by an aggregate needs every input row before the first result, so a streamed (server-side)
    # cursor's fast-start planning cannot pick a slow index walk over the whole table.
    return query.order_by(latest)


class SqlScan:
    """A ScanSource over one read-only connection: count, the revoked index, and the rows themselves."""

    def __init__(
        self,
        conn: Connection,
        profile: BoundProfile,
        impl: DatabaseImpl,
        now: datetime,
        skew: float,
        batch: int,
        description: str,
        max_rows_per_second: int | None = None,
    ):
        self.conn = conn
        self.profile = profile
        self.impl = impl
        self.at = now
        self.skew = skew
        self.batch = batch
        self.profile_name = profile.name
        self.description = description
        self.max_rows_per_second = max_rows_per_second
        self.has_ips = profile.client.ip is not None
        self.now = now.timestamp()
        self.forever_fix = forever_fix(profile)
        self.revoked_since: float | None = None  # set by revoked() when the rows carry the revocations

    def count(self) -> int:
        cm = self.profile.client
        t = table_clause(cm.table, {cm.key} | ({cm.tenant.column} if cm.tenant else set()))
        q = sa.select(sa.func.count()).select_from(t).where(*tenant_filter(t, cm.tenant, self.profile.options))
        return int(self.conn.execute(q).scalar_one())

    def revoked(self, since: float) -> RevokedIndex | None:
        lmap = self.profile.profile.loops
        if lmap is None:
            return None
        if revocations_on_rows(self.profile) is not None:
            self.revoked_since = since  # read by rows(): one pass over the credential table, not two
            return RevokedIndex.read_with_rows(lmap.evidence)
        query = revoked_query(self.profile, self.impl, self.at, since)
        encoding = lmap.revoked_at.encoding
        conn, impl = self.conn, self.impl

        def pairs() -> Iterator[tuple[str, float]]:
            # Per statement: Connection.execution_options() would change the connection the scan goes on to use.
            result = conn.execute(query, execution_options=impl.stream_options(5000))
            try:
                for ref, raw_at in result:
                    try:
                        at = to_epoch(raw_at, encoding)
                    except (TypeError, ValueError):
                        at = None
                    if at is not None and ref is not None:
                        yield str(ref), at
            finally:
                close_streamed(result)

        return RevokedIndex(pairs(), lmap.evidence)

    def registration_times(self) -> Iterator[float]:
        cm = self.profile.client
        if cm.created_at is None:
            return
        if cm.created_at.column is None:  # kept in another table: read it through the scan query itself
            yield from (r.created_at for r in self.rows() if r.created_at is not None)
            return
        t = table_clause(cm.table, {cm.created_at.column} | ({cm.tenant.column} if cm.tenant else set()))
        query = sa.select(t.c[cm.created_at.column]).where(*tenant_filter(t, cm.tenant, self.profile.options))
        result = self.conn.execute(query, execution_options=self.impl.stream_options(self.batch))
        try:
            for (raw,) in result:
                try:
                    at = to_epoch(raw, cm.created_at.encoding)
                except (TypeError, ValueError):
                    continue
                if at is not None:
                    yield at
        finally:
            close_streamed(result)

    def rows(self) -> Generator[ClientRow, None, None]:
        """Stream every client, in the order the database reads them, with its credential facts.

        A reader thread fetches the next batch while this one decodes and classifies the last: the database
        computes the next rows while Python works (psycopg waits for the server without the GIL).
        """
        query = build_query(self.profile, self.impl, self.at, revoked_since=self.revoked_since)
        with self.impl.scan_rows(self.conn, query, self.batch) as (keys, batches):
            decode = RowDecoder(self.profile, self.at, self.skew, keys).decode
            batches = prefetched(batches)
            if self.max_rows_per_second:
                batches = paced(batches, self.max_rows_per_second)
            for rows in batches:
                for row in rows:
                    yield decode(row)
