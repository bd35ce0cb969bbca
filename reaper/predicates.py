"""Compile a profile Condition into a SQL expression over one table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import FromClause, TableClause

from reaper.dialects import Dialect
from reaper.profile import Condition, ExistsSpec


def untyped(value: Any) -> Any:
    """A bound value without a SQL type, so the database reads it as the column's type (a PostgreSQL uuid or
    enum column compared with a string: SQLAlchemy would otherwise send `::VARCHAR` and fail)."""
    return sa.bindparam(None, value, type_=sa.types.NullType())


def table_clause(name: str, columns: set[str]) -> TableClause:
    """An untyped table clause for a physical name, `schema.table` allowed."""
    schema, _, bare = name.rpartition(".")
    return sa.table(bare, *(sa.column(c) for c in sorted(columns)), schema=schema or None)


def now_param(now: datetime, encoding: str | None) -> Any:
    """`now` in a column's encoding: epoch seconds, epoch ms, naive UTC or aware UTC datetime."""
    if encoding == "epoch":
        return now.timestamp()
    if encoding == "epoch_ms":
        return now.timestamp() * 1000
    if encoding == "timestamptz":
        return now.astimezone(UTC)
    return now.astimezone(UTC).replace(tzinfo=None)


def _shift(now: datetime, seconds: float, encoding: str | None) -> Any:
    if encoding == "epoch":
        return now.timestamp() - seconds
    if encoding == "epoch_ms":
        return (now.timestamp() - seconds) * 1000
    return now_param(now - timedelta(seconds=seconds), encoding)


class Compiler:
    """Turns conditions into SQLAlchemy expressions for one table, one clock and one set of options."""

    def __init__(self, table: FromClause, now: datetime, options: dict[str, Any], dialect: Dialect):
        self.t = table
        self.now = now
        self.options = options
        self.dialect = dialect

    def col(self, name: str) -> ColumnElement[Any]:
        return self.t.c[name]

    def compile(self, cond: Condition) -> ColumnElement[bool]:
        key, value = cond.kind()
        return getattr(self, f"_{key}")(value)

    def _all(self, items: tuple[Condition, ...]) -> ColumnElement[bool]:
        return sa.and_(*(self.compile(c) for c in items))

    def _any(self, items: tuple[Condition, ...]) -> ColumnElement[bool]:
        return sa.or_(*(self.compile(c) for c in items))

    def _not_(self, inner: Condition) -> ColumnElement[bool]:
        return sa.not_(self.compile(inner))

    def _is_null(self, column: str) -> ColumnElement[bool]:
        return self.col(column).is_(None)

    def _not_null(self, column: str) -> ColumnElement[bool]:
        return self.col(column).is_not(None)

    def _is_true(self, column: str) -> ColumnElement[bool]:
        # Through an integer so it reads booleans and 0/1 integer flags alike, on every database.
        return sa.cast(self.col(column), sa.Integer) != 0

    def _is_false(self, column: str) -> ColumnElement[bool]:
        c = self.col(column)
        return sa.or_(c.is_(None), sa.cast(c, sa.Integer) == 0)

    def _value(self, spec: dict[str, Any], key: str) -> Any:
        """A literal (`value`) or an option's value (`value_option`: the operator's setting)."""
        if f"{key}_option" in spec:
            return self.options.get(spec[f"{key}_option"])
        return spec[key]

    def _equals(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        return self.col(spec["column"]) == untyped(self._value(spec, "value"))

    def _not_equals(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        c = self.col(spec["column"])
        return sa.or_(c.is_(None), c != untyped(self._value(spec, "value")))

    def _gt(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        return self.col(spec["column"]) > untyped(self._value(spec, "value"))

    def _like(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        return self.col(spec["column"]).like(self._value(spec, "pattern"))

    def _contains(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        return self.col(spec["column"]).contains(self._value(spec, "text"), autoescape=True)

    def _not_revoked(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        c, enc = self.col(spec["column"]), spec.get("encoding")
        future = c > now_param(self.now, enc)
        if enc in ("epoch", "epoch_ms"):
            return sa.or_(c.is_(None), c == 0, future)
        return sa.or_(c.is_(None), future)

    def _expires_at(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        c = self.col(spec["column"])
        alive = c > now_param(self.now, spec.get("encoding"))
        return sa.or_(c.is_(None), alive) if spec.get("null", "expired") == "never" else alive

    def _lifetime(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        start, enc = self.col(spec["start"]), spec.get("encoding")
        zero_never = spec.get("zero", "expired") == "never"
        null_never = spec.get("null", "expired") == "never"
        if "seconds_column" in spec:
            secs = self.col(spec["seconds_column"])
            if enc in ("epoch", "epoch_ms"):
                factor = 1000 if enc == "epoch_ms" else 1
                alive = start + secs * factor > now_param(self.now, enc)
            else:
                alive = self.dialect.add_seconds(start, secs) > now_param(self.now, enc)
            extra = []
            if zero_never:
                extra.append(secs == 0)
            if null_never:
                extra.append(secs.is_(None))
            return sa.or_(alive, *extra) if extra else alive
        seconds = spec.get("seconds")
        if "seconds_option" in spec:
            seconds = self.options.get(spec["seconds_option"])
        if seconds is None:
            return sa.true() if null_never else sa.false()
        if seconds == 0:
            return sa.true() if zero_never else sa.false()
        return start > _shift(self.now, float(seconds), enc)

    def _equals_client(self, spec: dict[str, Any]) -> ColumnElement[bool]:
        # Correlated EXISTS on the client row this row references, so the condition stays about one row and
        # compiles the same in the scan, the reaper's re-check and its deletes. (Spring's registration token:
        # principal_name = the client's own client_id.)
        cols = {spec["ref_client_column"], spec["client_column"]}
        client = table_clause(spec["client_table"], cols).alias()
        return sa.exists().where(
            client.c[spec["ref_client_column"]] == self.col(spec["ref"]),
            client.c[spec["client_column"]] == self.col(spec["column"]),
        )

    def _exists(self, spec: ExistsSpec) -> ColumnElement[bool]:
        cols = set(spec.on) | (spec.where.columns() if spec.where is not None else set())
        other = table_clause(spec.table, cols).alias()
        where = [other.c[theirs] == self.col(ours) for theirs, ours in spec.on.items()]
        if spec.where is not None:
            where.append(Compiler(other, self.now, self.options, self.dialect).compile(spec.where))
        return sa.exists().where(*where)
