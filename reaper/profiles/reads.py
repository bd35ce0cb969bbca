"""What a profile reads: every (table, column), from one visitor over the whole profile.

The schema check, the scan's table clauses, the grants of the least-privilege roles and the docs all use this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from reaper.profiles.conditions import CLIENT, ConditionBase
from reaper.profiles.model import CredentialMap, Profile

Reads = dict[str, set[str]]


def condition_reads(cond: ConditionBase | None, here: str, client_table: str) -> Iterator[tuple[str, str]]:
    """(table, column) read by a condition evaluated on a row of `here`."""
    if cond is None:
        return
    for table, column in cond.reads():
        yield (here if table is None else client_table if table == CLIENT else table), column


def credential_columns(cred: CredentialMap) -> set[str]:
    """Columns of a credential's own table that the scan and the reaper read."""
    cols = {cred.ref}
    if cred.issued_at is not None and cred.issued_at.column:
        cols.add(cred.issued_at.column)
    cols.update(cred.changed_at or ())
    if cred.tenant is not None:
        cols.add(cred.tenant.column)
    for cond in cred.conditions():
        cols |= cond.columns()
    return cols


def profile_reads(profile: Profile) -> Reads:
    """Physical table -> columns read, for the whole profile (client, lookups, credentials, loop map)."""
    out: Reads = {}

    def add(table: str, columns: Iterable[str]) -> None:
        out.setdefault(table, set()).update(columns)

    def add_pairs(pairs: Iterable[tuple[str, str]]) -> None:
        for table, column in pairs:
            add(table, (column,))

    cm = profile.client
    ct = cm.table
    add(ct, (cm.key, cm.client_id))
    if cm.tenant is not None:
        add(ct, (cm.tenant.column,))
        if cm.tenant.via is not None:
            add(cm.tenant.via.table, (cm.tenant.via.key, cm.tenant.via.column))
    for _, cond in cm.flags():
        add_pairs(condition_reads(cond, ct, ct))
    for _, f in cm.fields():
        if f.column is not None:
            add(ct, (f.column,))
        if f.rows is not None:
            add(f.rows.table, (f.rows.ref, f.rows.column))
        if f.lookup is not None:
            lk = f.lookup
            add(lk.table, (*lk.on, lk.column))
            add(ct, lk.on.values())
            add_pairs(condition_reads(lk.where, lk.table, ct))
    for cred in profile.credentials:
        add(cred.table, credential_columns(cred))
        add(ct, (cred.client_column or cm.key,))
        for cond in cred.conditions():
            add_pairs(condition_reads(cond, cred.table, ct))
    if profile.loops is not None:
        cred = profile.credential(profile.loops.credential)
        add(cred.table, (profile.loops.revoked_at.column or "",))
        add_pairs(condition_reads(profile.loops.revoked, cred.table, ct))
    return out
