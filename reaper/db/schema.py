"""Check a bound profile against the live schema by reflection; list every mismatch."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.engine.reflection import ObjectKind, ObjectScope

from reaper.db.impl import NUMERIC_TYPES, TEXT_TYPES, DatabaseImpl
from reaper.profiles import BoundProfile, FieldMap, Profile, profile_reads

Expectation = tuple[str, str]  # (what, "time" | "number" | "text")


def expected_types(profile: Profile) -> dict[tuple[str, str], Expectation]:
    """(table, column) -> (what it must hold, type family) for columns whose type matters."""
    out: dict[tuple[str, str], Expectation] = {}
    ct = profile.client.table

    def time(table: str, column: str | None, encoding: str | None) -> None:
        if column:
            numeric = encoding in ("epoch", "epoch_ms")
            out[(table, column)] = ("an epoch number", "number") if numeric else ("a timestamp", "time")

    def field_time(f: FieldMap | None, table: str) -> None:
        if f is None:
            return
        if f.lookup is not None:
            time(f.lookup.table, f.lookup.column, f.encoding)
        else:
            time(table, f.column, f.encoding)

    field_time(profile.client.created_at, ct)
    for name, f in profile.client.fields():
        if name != "created_at" and f.column and f.json_path:
            out[(ct, f.column)] = ("JSON text", "text")
    for cred in profile.credentials:
        field_time(cred.issued_at, cred.table)
    if profile.loops is not None:
        field_time(profile.loops.revoked_at, profile.credential(profile.loops.credential).table)
    return out


def _acceptable(coltype: Any, family: str, impl: DatabaseImpl) -> bool:
    if isinstance(coltype, sa.types.NullType):
        return True
    if family == "time":
        return impl.time_type_ok(coltype)
    return isinstance(coltype, NUMERIC_TYPES if family == "number" else TEXT_TYPES)


def check_schema(engine: Engine, profile: Profile | BoundProfile) -> list[str]:
    """Every problem between the profile and the database: missing tables, columns, wrong type family."""
    if isinstance(profile, BoundProfile):
        profile = profile.profile
    impl = DatabaseImpl.for_engine(engine)
    inspector = sa.inspect(engine)
    problems: list[str] = []
    expected = expected_types(profile)
    optional = {c.table for c in profile.credentials if c.optional}
    reads = profile_reads(profile)
    # Every table of a schema in one reflection (`serve` checks before each tick): tables, views, temporary or not.
    names: dict[str | None, list[str]] = {}
    for table in reads:
        schema, _, bare = table.rpartition(".")
        names.setdefault(schema or None, []).append(bare)
    found_columns: dict[tuple[str | None, str], list[Any]] = {}
    for in_schema, bares in names.items():
        if in_schema is not None and not inspector.has_schema(in_schema):
            continue  # its tables are not found (MySQL and SQLite would raise on an unknown database)
        found_columns.update(
            inspector.get_multi_columns(
                schema=in_schema, filter_names=bares, kind=ObjectKind.ANY, scope=ObjectScope.ANY
            )
        )
    for table, columns in sorted(reads.items()):
        schema, _, bare = table.rpartition(".")
        reflected = found_columns.get((schema or None, bare))
        if reflected is None:
            if table not in optional:  # a table some releases lack: skipped (backends drop it from the profile)
                problems.append(f"table '{table}' not found (profile '{profile.name}')")
            continue
        actual = {c["name"]: c["type"] for c in reflected}
        for column in sorted(columns):
            found = impl.find_column(column, actual)
            if found is None:
                hint = {k.lower(): k for k in actual}.get(column.lower())
                extra = f" (there is '{hint}': names are case-sensitive)" if hint else ""
                problems.append(f"column '{table}.{column}' not found{extra}")
                continue
            want = expected.get((table, column))
            if want and not _acceptable(actual[found], want[1], impl):
                problems.append(f"column '{table}.{column}' is {actual[found]}, expected {want[0]}")
    return problems
