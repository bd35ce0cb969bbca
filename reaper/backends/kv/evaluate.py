"""Profile conditions evaluated in Python over one key-value entry: the key-value store's counterpart of
`reaper.db.compiler` (one method per condition type, the same meaning, SQL's NULL rules included).

An entry is a mapping of "columns": the fields of its decoded value, plus `$key` (the entry's key) and the
envelope's `$created_at` and `$expires_at` (py-key-value's ManagedEntry). A dotted column reads a nested field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache, singledispatchmethod
from typing import Any

from reaper.profiles import conditions as c

Doc = Mapping[str, Any]


def to_epoch(value: Any, encoding: str | None = None) -> float | None:
    """Seconds since the epoch from a stored time: a number (epoch, epoch_ms) or an ISO-8601 string."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) / 1000 if encoding == "epoch_ms" else float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


def column(doc: Doc, name: str) -> Any:
    """A column of an entry: a field of its value, `a.b` nested, or a `$` field of its envelope."""
    if name in doc:
        return doc[name]
    value: Any = doc
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


@lru_cache(maxsize=256)
def _like(pattern: str) -> re.Pattern[str]:
    """SQL LIKE as a regular expression: % any run, _ one character, the rest literal (case-sensitive)."""
    out = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.compile(out, re.DOTALL)


def _comparable(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (isinstance(a, str) and isinstance(b, str))


class Evaluator:
    """Evaluates conditions for one clock and one set of options; a missing field is SQL's NULL."""

    def __init__(self, now: float, options: dict[str, Any]):
        self.now = now
        self.options = options

    def _value(self, op: Any) -> Any:
        literal, option = op.literal_or_option()
        return self.options.get(option) if option is not None else literal

    @singledispatchmethod
    def holds(self, cond: c.ConditionBase, doc: Doc) -> bool:
        raise TypeError(f"a key-value entry cannot be tested with {type(cond).__name__}")

    @holds.register
    def _(self, cond: c.All, doc: Doc) -> bool:
        return all(self.holds(x, doc) for x in cond.all)

    @holds.register
    def _(self, cond: c.AnyOf, doc: Doc) -> bool:
        return any(self.holds(x, doc) for x in cond.any)

    @holds.register
    def _(self, cond: c.Not, doc: Doc) -> bool:
        return not self.holds(cond.not_, doc)

    @holds.register
    def _(self, cond: c.IsNull, doc: Doc) -> bool:
        return column(doc, cond.is_null) is None

    @holds.register
    def _(self, cond: c.NotNull, doc: Doc) -> bool:
        return column(doc, cond.not_null) is not None

    @holds.register
    def _(self, cond: c.IsTrue, doc: Doc) -> bool:
        value = column(doc, cond.is_true)
        return value is not None and value is not False and value != 0

    @holds.register
    def _(self, cond: c.IsFalse, doc: Doc) -> bool:
        value = column(doc, cond.is_false)
        return value is None or value is False or value == 0

    @holds.register
    def _(self, cond: c.Equals, doc: Doc) -> bool:
        value, wanted = column(doc, cond.equals.column), self._value(cond.equals)
        return value is not None and wanted is not None and _comparable(value, wanted) and value == wanted

    @holds.register
    def _(self, cond: c.NotEquals, doc: Doc) -> bool:
        value, other = column(doc, cond.not_equals.column), self._value(cond.not_equals)
        return value is None or not (_comparable(value, other) and value == other)

    @holds.register
    def _(self, cond: c.Gt, doc: Doc) -> bool:
        value, bound = column(doc, cond.gt.column), self._value(cond.gt)
        return value is not None and bound is not None and _comparable(value, bound) and value > bound

    @holds.register
    def _(self, cond: c.Like, doc: Doc) -> bool:
        value, pattern = column(doc, cond.like.column), self._value(cond.like)
        return isinstance(value, str) and isinstance(pattern, str) and _like(pattern).fullmatch(value) is not None

    @holds.register
    def _(self, cond: c.Contains, doc: Doc) -> bool:
        value, text = column(doc, cond.contains.column), self._value(cond.contains)
        return isinstance(value, str) and isinstance(text, str) and text in value

    @holds.register
    def _(self, cond: c.NotRevoked, doc: Doc) -> bool:
        op = cond.not_revoked
        raw = column(doc, op.column)
        if raw is None or (op.encoding in ("epoch", "epoch_ms") and raw == 0):
            return True
        at = to_epoch(raw, op.encoding)
        return at is not None and at > self.now

    @holds.register
    def _(self, cond: c.ExpiresAt, doc: Doc) -> bool:
        op = cond.expires_at
        raw = column(doc, op.column)
        if raw is None:
            return op.null == "never"
        at = to_epoch(raw, op.encoding)
        return at is not None and at > self.now

    @holds.register
    def _(self, cond: c.Lifetime, doc: Doc) -> bool:
        op = cond.lifetime
        start = to_epoch(column(doc, op.start), op.encoding)
        if op.seconds_column is not None:
            seconds = column(doc, op.seconds_column)
        elif op.seconds_option is not None:
            seconds = self.options.get(op.seconds_option)
        else:
            seconds = op.seconds
        if seconds is None:
            return op.null == "never"
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            return False
        if seconds == 0:
            return op.zero == "never"
        if start is None:
            return False
        return start + float(seconds) > self.now  # `start` is in seconds whatever its encoding
