"""What changed since the last scan, where the profile can tell: the SQL half of `serve`'s incremental ticks
(the state they update is reaper/analysis/incremental.py).

A client needs a fresh look when it registered since the watermark, when one of its credential rows was issued or
changed in place since it (the profile's `issued_at` and `changed_at` columns), or when a condition the scan
evaluates at "now" (live, never-expiring, excluded, the client's flags) gives another answer now than at the last
scan: tokens expire by time alone. Deletions leave no trace, so the counts are read for the state to compare.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from reaper.analysis.model import ClientRow
from reaper.backends.sql.scan import (
    RowDecoder,
    SqlScan,
    build_query,
    can_live_forever,
    credential_compiler,
    credential_filter,
    revocations_on_rows,
    revoked_query,
    tenant_filter,
)
from reaper.backends.values import to_epoch
from reaper.db import Compiler, now_param, table_clause
from reaper.profiles import BoundProfile, credential_columns, profile_reads
from reaper.profiles import conditions as c

CHUNK = 2000  # keys per re-read statement


def _flag(cond: Any) -> Any:
    return sa.case((cond, 1), else_=0)


class SqlDelta:
    """Change detection and re-reads by key, on the scan's own read-only connection and clock."""

    def __init__(self, scan: SqlScan):
        self.scan = scan
        self.profile = scan.profile
        self.impl = scan.impl

    def unsupported(self) -> str | None:
        """None when a delta is sound for this profile; otherwise why a tick must scan fully."""
        return delta_unsupported(self.profile)

    def revoked_in_seconds(self) -> bool:
        """revoked_query cuts the lookback's start to a whole second for epoch columns."""
        lmap = self.profile.profile.loops
        return lmap is not None and lmap.revoked_at.encoding == "epoch"

    def changed_keys(self, previous: float, since: float) -> set[str]:
        """Keys of the clients to re-read: registered or credentials stamped at or after `since`, or a time
        condition that flipped between `previous` (the last scan's clock) and now."""
        profile, impl, now = self.profile, self.impl, self.scan.at
        before = datetime.fromtimestamp(previous, UTC)
        since_at = datetime.fromtimestamp(since, UTC)
        cm = profile.client
        reads = profile_reads(profile.profile)
        conn = self.scan.conn
        keys: set[str] = set()

        client = table_clause(cm.table, reads[cm.table]).alias("c")
        assert cm.created_at is not None and cm.created_at.column
        changed = [client.c[cm.created_at.column] >= _stamp(since_at, cm.created_at.encoding)]
        for _, cond in cm.flags():
            then, current = (
                Compiler(client, before, profile.options, impl),
                Compiler(client, now, profile.options, impl),
            )
            changed.append(_flipped(cond, then, current))
        query = sa.select(client.c[cm.key]).where(*tenant_filter(client, cm.tenant, profile.options), sa.or_(*changed))
        keys.update(str(k) for (k,) in conn.execute(query))

        for cred in profile.scan_credentials:
            t = table_clause(cred.table, credential_columns(cred)).alias("t")
            encoding = cred.issued_at.encoding if cred.issued_at else None
            stamps = [cred.issued_at.column] if cred.issued_at and cred.issued_at.column else []
            stamps += list(cred.changed_at or ())
            changed = [t.c[col] >= _stamp(since_at, encoding) for col in stamps]
            for strict in (False, True) if can_live_forever(cred) else (False,):
                if cred.live is None:
                    continue  # live or not whatever the clock
                then = credential_compiler(profile, cred, t, before, impl, strict)
                current = credential_compiler(profile, cred, t, now, impl, strict)
                changed.append(_flipped(cred.live, then, current))
            if cred.exclude is not None:
                then = credential_compiler(profile, cred, t, before, impl)
                current = credential_compiler(profile, cred, t, now, impl)
                changed.append(_flipped(cred.exclude, then, current))
            refs = (
                sa.select(t.c[cred.ref])
                .where(*tenant_filter(t, cred.tenant, profile.options), sa.or_(*changed))
                .distinct()
            )
            if cred.client_column in (None, cm.key):
                keys.update(str(k) for (k,) in conn.execute(refs) if k is not None)
            else:
                owner = table_clause(cm.table, {cm.key, cm.client_id}).alias("o")
                by_ref = sa.select(owner.c[cm.key]).where(owner.c[cm.client_id].in_(refs.scalar_subquery()))
                keys.update(str(k) for (k,) in conn.execute(by_ref))
        return keys

    def counts(self) -> tuple[int, int]:
        """Clients, and credential rows that count toward clients' totals (every scanned table but logins)."""
        profile, impl, now = self.profile, self.impl, self.scan.at
        rows = 0
        for cred in profile.scan_credentials:
            if cred.kind == "login":
                continue
            t = table_clause(cred.table, credential_columns(cred)).alias("t")
            where = credential_filter(profile, cred, t, now, impl)
            rows += int(self.scan.conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one())
        return self.scan.count(), rows

    def rows(self, keys: Sequence[str]) -> Iterator[ClientRow]:
        """These clients (those that still exist), read as the full scan reads them."""
        scan = self.scan
        for at in range(0, len(keys), CHUNK):
            result = scan.conn.execute(build_query(scan.profile, scan.impl, scan.at, keys[at : at + CHUNK]))
            decode = RowDecoder(scan.profile, scan.at, scan.skew, list(result.keys())).decode
            for row in result:
                yield decode(row)

    def revoked(self, keys: Sequence[str], since: float) -> dict[str, float]:
        """For these clients, what the loop map's revoked index would hold (latest refresh revocation)."""
        lmap = self.profile.profile.loops
        if lmap is None:
            return {}
        out: dict[str, float] = {}
        inner = revoked_query(self.profile, self.impl, self.scan.at, since).order_by(None).subquery("r")
        ref, latest = list(inner.c)
        cm = self.profile.client
        on_rows = revocations_on_rows(self.profile) is not None
        for at in range(0, len(keys), CHUNK):
            chunk = keys[at : at + CHUNK]
            if on_rows:
                # The full scan joins the revocations to their client in SQL: a database whose collation matches
                # keys without regard to case or trailing spaces (MariaDB's default) matches them the same here.
                client = table_clause(cm.table, {cm.key}).alias("c")
                query = sa.select(client.c[cm.key], latest).select_from(client.join(inner, ref == client.c[cm.key]))
                query = query.where(self.impl.in_(ref, chunk), self.impl.in_(client.c[cm.key], chunk))
            else:
                query = sa.select(ref, latest).where(self.impl.in_(ref, chunk))
            for ref_value, raw_at in self.scan.conn.execute(query):
                try:
                    when = to_epoch(raw_at, lmap.revoked_at.encoding)
                except (TypeError, ValueError):
                    continue
                if when is not None and ref_value is not None:
                    out[str(ref_value)] = when
        return out


def delta_unsupported(profile: BoundProfile) -> str | None:
    """None when the profile's columns show every change a scan would see; otherwise what they miss."""
    cm = profile.client
    if cm.created_at is None or not cm.created_at.column or cm.created_at.lookup is not None:
        return "the client's registration time is not a column of the client table"
    for cred in profile.scan_credentials:
        if cred.issued_at is None or not cred.issued_at.column:
            return f"credential '{cred.name}' has no issue time column"
        if cred.changed_at is None:
            return f"credential '{cred.name}' may change in place without a time stamp (no changed_at)"
        if cred.client_column not in (None, cm.key, cm.client_id):
            return f"credential '{cred.name}' references the client by {cred.client_column}"
    return None


def _flipped(cond: c.ConditionBase, then: Compiler, current: Compiler) -> Any:
    """SQL for "`cond` holds at one clock and not at the other". A value compared with the clock must lie between
    its thresholds at the two clocks for anything to change, so that cheap test goes first and the database
    skips the condition for nearly every row. Not where the condition looks into another table (EXISTS: its
    comparisons are not this row's) or the clock went back."""
    was, is_ = _flag(then.compile(cond)), _flag(current.compile(cond))
    if then.now > current.now or any(isinstance(node, c.Exists) for node in cond.walk()):
        return was != is_
    between = [sa.and_(value > at(then.now), value <= at(current.now)) for value, at in current.thresholds]
    return sa.and_(sa.or_(*between), was != is_) if between else sa.false()


def _stamp(at: datetime, encoding: str | None) -> Any:
    value = now_param(at, encoding)
    return int(value) if encoding == "epoch" else value  # integer columns compare to integers
