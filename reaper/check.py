"""Check a bound profile against the live schema by reflection; list every mismatch."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from reaper.profile import BoundProfile
from reaper.scan import FIELDS, profile_columns

_NUMERIC = (sa.Integer, sa.Numeric, sa.Float)
_TIME = (sa.DateTime, sa.TIMESTAMP, sa.Date)
_TEXT = (sa.String, sa.Text, sa.JSON, sa.Enum)


def _expected_types(profile: BoundProfile) -> dict[tuple[str, str], tuple[str, tuple[type, ...]]]:
    """(table, column) -> (what, acceptable SQLAlchemy type classes) for columns whose type matters."""
    out: dict[tuple[str, str], tuple[str, tuple[type, ...]]] = {}
    ct = profile.table(profile.client.table)

    def time(table: str, column: str, encoding: str | None) -> None:
        if encoding in ("epoch", "epoch_ms"):
            out[(table, column)] = ("an epoch number", _NUMERIC)
        else:
            out[(table, column)] = ("a timestamp", _TIME)

    cm = profile.client
    if cm.created_at is not None and cm.created_at.column:
        time(ct, cm.created_at.column, cm.created_at.encoding)
    if cm.created_at is not None and cm.created_at.lookup is not None:
        time(profile.table(cm.created_at.lookup.table), cm.created_at.lookup.column, cm.created_at.encoding)
    for name in FIELDS:
        f = getattr(cm, name)
        if f is not None and f.column and f.json_path:
            out[(ct, f.column)] = ("JSON text", _TEXT)
    for cred in profile.scan_credentials:
        if cred.issued_at is not None and cred.issued_at.column:
            time(profile.table(cred.table), cred.issued_at.column, cred.issued_at.encoding)
    return out


def _acceptable(coltype: Any, classes: tuple[type, ...], dialect: str) -> bool:
    if isinstance(coltype, sa.types.NullType):
        return True
    if dialect == "sqlite" and classes == _TIME and isinstance(coltype, _TEXT + _NUMERIC):
        return True  # SQLite keeps times as text or numbers
    return isinstance(coltype, classes)


def check_schema(engine: Engine, profile: BoundProfile) -> list[str]:
    """Every problem between the profile and the database: missing tables, columns, wrong type family."""
    inspector = sa.inspect(engine)
    problems: list[str] = []
    expected = _expected_types(profile)
    for table, columns in sorted(profile_columns(profile).items()):
        schema, _, bare = table.rpartition(".")
        if not inspector.has_table(bare, schema=schema or None):
            problems.append(f"table '{table}' not found (profile '{profile.name}')")
            continue
        actual = {c["name"]: c["type"] for c in inspector.get_columns(bare, schema=schema or None)}
        lowered = {k.lower(): k for k in actual}
        for column in sorted(columns):
            found = column if column in actual else None
            if found is None and engine.dialect.name in ("mysql", "mariadb"):
                found = lowered.get(column.lower())  # MySQL/MariaDB column names are case-insensitive
            if found is None:
                hint = lowered.get(column.lower())
                extra = f" (there is '{hint}': names are case-sensitive)" if hint else ""
                problems.append(f"column '{table}.{column}' not found{extra}")
                continue
            want = expected.get((table, column))
            if want and not _acceptable(actual[found], want[1], engine.dialect.name):
                problems.append(f"column '{table}.{column}' is {actual[found]}, expected {want[0]}")
    return problems
