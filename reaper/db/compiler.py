"""Compile profile conditions into SQL expressions over one table (one method per condition type)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import singledispatchmethod
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.expression import FromClause, TableClause

from reaper.db.impl import DatabaseImpl
from reaper.profiles import conditions as c


def untyped(value: Any) -> BindParameter[Any]:
    """A bound value without a SQL type, so the database reads it as the column's type (a PostgreSQL uuid or
    enum column compared with a string: SQLAlchemy would otherwise send `::VARCHAR` and fail)."""
    return sa.bindparam(None, value, type_=sa.types.NullType())


def exists_where(*where: Any) -> ColumnElement[bool]:
    """EXISTS (SELECT 1 ... WHERE ...): never `SELECT *`, which a role granted only some columns may not run."""
    return sa.select(sa.literal(1)).where(*where).exists()


def table_clause(name: str, columns: set[str]) -> TableClause:
    """An untyped table clause for a physical name, `schema.table` allowed."""
    schema, _, bare = name.rpartition(".")
    return sa.table(bare, *(sa.column(col) for col in sorted(columns)), schema=schema or None)


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


@dataclass(frozen=True)
class Owner:
    """For credential conditions: the row's own client (`equals_client`)."""

    ref: str  # the credential column holding the client's key (or `client_column`)
    client_table: str
    client_ref_column: str  # the client column `ref` holds


class Compiler:
    """Turns conditions into SQLAlchemy expressions for one table, one clock and one set of options."""

    def __init__(
        self,
        table: FromClause,
        now: datetime,
        options: dict[str, Any],
        impl: DatabaseImpl,
        owner: Owner | None = None,
        strict: bool = False,
    ):
        self.t = table
        self.now = now
        self.options = options
        self.impl = impl
        self.owner = owner
        self.strict = strict  # read "never expires" (NULL or 0 meaning forever) as expired
        # Every comparison with the clock compiled so far: (value, the threshold at a given clock). A row's
        # condition can only change between two clocks where one of these values lies between its thresholds.
        self.thresholds: list[tuple[ColumnElement[Any], Callable[[datetime], Any]]] = []

    def _later(self, value: ColumnElement[Any], at: Callable[[datetime], Any]) -> ColumnElement[bool]:
        """`value > at(now)`, remembered as one of the clock's thresholds."""
        self.thresholds.append((value, at))
        return cast(ColumnElement[bool], value > at(self.now))

    def col(self, name: str) -> ColumnElement[Any]:
        return self.t.c[name]

    def _value(self, op: Any) -> Any:
        """A literal, or an option's value (`*_option`: the operator's setting)."""
        literal, option = op.literal_or_option()
        return self.options.get(option) if option is not None else literal

    @singledispatchmethod
    def compile(self, cond: c.ConditionBase) -> ColumnElement[bool]:
        raise TypeError(f"no SQL for condition {type(cond).__name__}")

    @compile.register
    def _(self, cond: c.All) -> ColumnElement[bool]:
        return sa.and_(*(self.compile(x) for x in cond.all))

    @compile.register
    def _(self, cond: c.AnyOf) -> ColumnElement[bool]:
        return sa.or_(*(self.compile(x) for x in cond.any))

    @compile.register
    def _(self, cond: c.Not) -> ColumnElement[bool]:
        return sa.not_(self.compile(cond.not_))

    @compile.register
    def _(self, cond: c.IsNull) -> ColumnElement[bool]:
        return self.col(cond.is_null).is_(None)

    @compile.register
    def _(self, cond: c.NotNull) -> ColumnElement[bool]:
        return self.col(cond.not_null).is_not(None)

    @compile.register
    def _(self, cond: c.IsTrue) -> ColumnElement[bool]:
        # Through an integer so it reads booleans and 0/1 integer flags alike, on every database.
        return sa.cast(self.col(cond.is_true), sa.Integer) != 0

    @compile.register
    def _(self, cond: c.IsFalse) -> ColumnElement[bool]:
        col = self.col(cond.is_false)
        return sa.or_(col.is_(None), sa.cast(col, sa.Integer) == 0)

    @compile.register
    def _(self, cond: c.Equals) -> ColumnElement[bool]:
        return self.col(cond.equals.column) == untyped(self._value(cond.equals))

    @compile.register
    def _(self, cond: c.NotEquals) -> ColumnElement[bool]:
        col = self.col(cond.not_equals.column)
        return sa.or_(col.is_(None), col != untyped(self._value(cond.not_equals)))

    @compile.register
    def _(self, cond: c.Gt) -> ColumnElement[bool]:
        return self.col(cond.gt.column) > untyped(self._value(cond.gt))

    @compile.register
    def _(self, cond: c.Like) -> ColumnElement[bool]:
        return self.col(cond.like.column).like(self._value(cond.like))

    @compile.register
    def _(self, cond: c.Contains) -> ColumnElement[bool]:
        return self.col(cond.contains.column).contains(self._value(cond.contains), autoescape=True)

    @compile.register
    def _(self, cond: c.NotRevoked) -> ColumnElement[bool]:
        op = cond.not_revoked
        col = self.col(op.column)
        future = self._later(col, lambda at: now_param(at, op.encoding))
        if op.encoding in ("epoch", "epoch_ms"):
            return sa.or_(col.is_(None), col == 0, future)
        return sa.or_(col.is_(None), future)

    @compile.register
    def _(self, cond: c.ExpiresAt) -> ColumnElement[bool]:
        op = cond.expires_at
        col = self.col(op.column)
        alive = self._later(col, lambda at: now_param(at, op.encoding))
        return sa.or_(col.is_(None), alive) if op.null == "never" and not self.strict else alive

    @compile.register
    def _(self, cond: c.Lifetime) -> ColumnElement[bool]:
        op = cond.lifetime
        start, enc = self.col(op.start), op.encoding
        if op.seconds_column is not None:
            secs = self.col(op.seconds_column)
            if enc in ("epoch", "epoch_ms"):
                factor = 1000 if enc == "epoch_ms" else 1
                alive = self._later(start + secs * factor, lambda at: now_param(at, enc))
            else:
                alive = self._later(self.impl.add_seconds(start, secs), lambda at: now_param(at, enc))
            extra = []
            if op.zero == "never" and not self.strict:
                extra.append(secs == 0)
            if op.null == "never" and not self.strict:
                extra.append(secs.is_(None))
            return sa.or_(alive, *extra) if extra else alive
        seconds = self.options.get(op.seconds_option) if op.seconds_option is not None else op.seconds
        if seconds is None:
            return sa.true() if op.null == "never" and not self.strict else sa.false()
        if seconds == 0:
            return sa.true() if op.zero == "never" and not self.strict else sa.false()
        return self._later(start, lambda at: _shift(at, float(seconds), enc))

    @compile.register
    def _(self, cond: c.After) -> ColumnElement[bool]:
        return self.col(cond.after.column) > self.col(cond.after.than)

    @compile.register
    def _(self, cond: c.EqualsClient) -> ColumnElement[bool]:
        # Correlated EXISTS on the client row this row references, so the condition stays about one row and
        # compiles the same in the scan, the reaper's re-check and its deletes. (Spring's registration token:
        # principal_name = the client's own client_id.)
        if self.owner is None:
            raise TypeError("equals_client only applies to credential conditions")
        op, own = cond.equals_client, self.owner
        client = table_clause(own.client_table, {own.client_ref_column, op.client_column}).alias()
        return exists_where(
            client.c[own.client_ref_column] == self.col(own.ref),
            client.c[op.client_column] == self.col(op.column),
        )

    @compile.register
    def _(self, cond: c.Exists) -> ColumnElement[bool]:
        op = cond.exists
        cols = set(op.on) | (op.where.columns() if op.where is not None else set())
        other = table_clause(op.table, cols).alias()
        where = [other.c[theirs] == self.col(ours) for theirs, ours in op.on.items()]
        if op.where is not None:
            where.append(Compiler(other, self.now, self.options, self.impl, strict=self.strict).compile(op.where))
        return exists_where(*where)
