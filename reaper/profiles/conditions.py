"""Conditions: the boolean predicates a profile states over one table's row, as a typed union.

In TOML a condition is a table with exactly one key (`{ is_null = "revoked" }`, `{ all = [...] }`); each key is one
small model here, picked by that key. Every condition can say which columns it reads (`reads`) and rename them
(`renamed`): the one visitor the schema check, the scan, grants and name resolution all use. Compiling to SQL is
the database layer's job (`reaper.db.compiler`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Encoding = Literal["epoch", "epoch_ms", "timestamp", "timestamptz"]
Rename = Callable[[str], str]
Read = tuple[str | None, str]  # (table, column); table None means "the row's own table"
CLIENT = "\x00client"  # the table of a credential row's own client, in reads of `equals_client`


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# -- operands ------------------------------------------------------------------------------------------------


class _Valued(_Model):
    """`{column, <what>}` or `{column, <what>_option}`: a literal, or the operator's option value."""

    column: str
    _what: ClassVar[str] = "value"

    def literal_or_option(self) -> tuple[Any, str | None]:
        """(literal, None) or (None, option name)."""
        option = getattr(self, f"{self._what}_option")
        return (None, option) if option is not None else (getattr(self, self._what), None)

    @model_validator(mode="after")
    def _one_source(self) -> _Valued:
        given = [k for k in (self._what, f"{self._what}_option") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError(f"give exactly one of '{self._what}' or '{self._what}_option'")
        return self


class ValueOperand(_Valued):
    value: Any = None
    value_option: str | None = None


class PatternOperand(_Valued):
    _what: ClassVar[str] = "pattern"
    pattern: str | None = None
    pattern_option: str | None = None


class TextOperand(_Valued):
    _what: ClassVar[str] = "text"
    text: str | None = None
    text_option: str | None = None


class RevokedOperand(_Model):
    column: str
    encoding: Encoding | None = None


class ExpiryOperand(_Model):
    column: str
    encoding: Encoding | None = None
    null: Literal["never", "expired"] = "expired"


class LifetimeOperand(_Model):
    start: str
    encoding: Encoding | None = None
    seconds_column: str | None = None
    seconds: float | None = None
    seconds_option: str | None = None
    zero: Literal["never", "expired"] = "expired"
    null: Literal["never", "expired"] = "expired"

    @model_validator(mode="after")
    def _one_length(self) -> LifetimeOperand:
        given = [k for k in ("seconds_column", "seconds", "seconds_option") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("give exactly one of 'seconds_column', 'seconds' or 'seconds_option'")
        return self


class AfterOperand(_Model):
    column: str
    than: str = Field(description="another column of the same row")


class ClientOperand(_Model):
    column: str = Field(description="this credential row's column")
    client_column: str = Field(description="a column of the row's own client")


class ExistsOperand(_Model):
    table: str
    on: dict[str, str] = Field(description="{other table's column = this table's column}")
    where: Condition | None = None

    @model_validator(mode="after")
    def _matches_something(self) -> ExistsOperand:
        if not self.on:
            raise ValueError("exists needs at least one 'on' column pair")
        return self


# -- the conditions ----------------------------------------------------------------------------------------


class ConditionBase(_Model):
    """Behaviour every condition shares; subclasses hold exactly one field, named as in TOML."""

    def children(self) -> tuple[ConditionBase, ...]:
        """Nested conditions over the same row."""
        return ()

    def own_reads(self) -> Iterator[Read]:
        """Columns this condition itself reads (not its children)."""
        return iter(())

    def reads(self) -> Iterator[Read]:
        """Every (table, column) the condition reads, nested ones included."""
        yield from self.own_reads()
        for child in self.children():
            yield from child.reads()

    def columns(self) -> set[str]:
        """Columns of the row's own table that the condition reads."""
        return {col for table, col in self.reads() if table is None}

    def never_expires(self) -> bool:
        """Whether this condition (not its children) can hold forever: NULL or 0 read as "never"."""
        return False

    def walk(self) -> Iterator[ConditionBase]:
        """This condition and every condition nested in it, over any table."""
        yield self
        for child in self.children():
            yield from child.walk()

    def renamed(self, column: Rename, table: Rename) -> Condition:
        """The same condition with physical names."""
        raise NotImplementedError


class All(ConditionBase):
    all: tuple[Condition, ...]

    def children(self) -> tuple[ConditionBase, ...]:
        return self.all

    def renamed(self, column: Rename, table: Rename) -> Condition:
        return All(all=tuple(c.renamed(column, table) for c in self.all))


class AnyOf(ConditionBase):
    any: tuple[Condition, ...]

    def children(self) -> tuple[ConditionBase, ...]:
        return self.any

    def renamed(self, column: Rename, table: Rename) -> Condition:
        return AnyOf(any=tuple(c.renamed(column, table) for c in self.any))


class Not(ConditionBase):
    not_: Condition = Field(alias="not")

    def children(self) -> tuple[ConditionBase, ...]:
        return (self.not_,)

    def renamed(self, column: Rename, table: Rename) -> Condition:
        return Not(not_=self.not_.renamed(column, table))


class _OneColumn(ConditionBase):
    def _column(self) -> str:
        return str(next(iter(self.__dict__.values())))

    def own_reads(self) -> Iterator[Read]:
        yield None, self._column()

    def renamed(self, column: Rename, table: Rename) -> Condition:
        ((key, value),) = self.__dict__.items()
        return cast("Condition", type(self).model_validate({key: column(value)}))


class IsNull(_OneColumn):
    is_null: str


class NotNull(_OneColumn):
    not_null: str


class IsTrue(_OneColumn):
    is_true: str


class IsFalse(_OneColumn):
    """False or NULL."""

    is_false: str


class _OnOperand(ConditionBase):
    """A condition whose one field is an operand model with a `column` (and maybe more columns)."""

    _columns: ClassVar[tuple[str, ...]] = ("column",)

    def _operand(self) -> Any:
        return next(iter(self.__dict__.values()))

    def own_reads(self) -> Iterator[Read]:
        op = self._operand()
        for name in self._columns:
            value = getattr(op, name)
            if value is not None:
                yield None, value

    def renamed(self, column: Rename, table: Rename) -> Condition:
        ((key, op),) = self.__dict__.items()
        update = {name: column(getattr(op, name)) for name in self._columns if getattr(op, name) is not None}
        return cast("Condition", type(self).model_validate({key: op.model_copy(update=update)}))


class Equals(_OnOperand):
    equals: ValueOperand


class NotEquals(_OnOperand):
    """NULL counts as not equal."""

    not_equals: ValueOperand


class Gt(_OnOperand):
    gt: ValueOperand


class Like(_OnOperand):
    like: PatternOperand


class Contains(_OnOperand):
    """A substring, matched literally."""

    contains: TextOperand


class NotRevoked(_OnOperand):
    """NULL, 0 (epochs) or a time still in the future mean "not revoked (yet)"."""

    not_revoked: RevokedOperand


class ExpiresAt(_OnOperand):
    """Still valid while the column is in the future."""

    expires_at: ExpiryOperand

    def never_expires(self) -> bool:
        return self.expires_at.null == "never"


class Lifetime(_OnOperand):
    """`start + seconds > now`."""

    _columns: ClassVar[tuple[str, ...]] = ("start", "seconds_column")
    lifetime: LifetimeOperand

    def never_expires(self) -> bool:
        return self.lifetime.zero == "never" or self.lifetime.null == "never"


class After(_OnOperand):
    """The column holds a later value than another column of the same row (NULL on either side: false)."""

    _columns: ClassVar[tuple[str, ...]] = ("column", "than")
    after: AfterOperand


class EqualsClient(ConditionBase):
    """This credential row's column equals a column of its own client row (credential conditions only)."""

    equals_client: ClientOperand

    def own_reads(self) -> Iterator[Read]:
        yield None, self.equals_client.column
        yield CLIENT, self.equals_client.client_column

    def renamed(self, column: Rename, table: Rename) -> Condition:
        op = self.equals_client
        return EqualsClient(
            equals_client=ClientOperand(column=column(op.column), client_column=column(op.client_column))
        )


class Exists(ConditionBase):
    """A row of another table matches this one (`on`) and satisfies `where`."""

    exists: ExistsOperand

    def own_reads(self) -> Iterator[Read]:
        op = self.exists
        for theirs, ours in op.on.items():
            yield op.table, theirs
            yield None, ours
        if op.where is not None:
            for table, col in op.where.reads():
                yield (op.table if table is None else table), col

    def walk(self) -> Iterator[ConditionBase]:
        yield self
        if self.exists.where is not None:
            yield from self.exists.where.walk()

    def renamed(self, column: Rename, table: Rename) -> Condition:
        op = self.exists
        return Exists(
            exists=ExistsOperand(
                table=table(op.table),
                on={column(k): column(v) for k, v in op.on.items()},
                where=op.where.renamed(column, table) if op.where is not None else None,
            )
        )


_KINDS: dict[str, type[ConditionBase]] = {
    "all": All,
    "any": AnyOf,
    "not": Not,
    "is_null": IsNull,
    "not_null": NotNull,
    "is_true": IsTrue,
    "is_false": IsFalse,
    "equals": Equals,
    "not_equals": NotEquals,
    "gt": Gt,
    "like": Like,
    "contains": Contains,
    "not_revoked": NotRevoked,
    "expires_at": ExpiresAt,
    "lifetime": Lifetime,
    "after": After,
    "equals_client": EqualsClient,
    "exists": Exists,
}


def _kind(value: Any) -> str | None:
    """The discriminator: a condition is picked by its one key."""
    if isinstance(value, ConditionBase):
        return next(k for k, cls in _KINDS.items() if isinstance(value, cls))
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return "not" if key == "not_" else key if key in _KINDS else None
    return None


Condition = Annotated[
    Annotated[All, Tag("all")]
    | Annotated[AnyOf, Tag("any")]
    | Annotated[Not, Tag("not")]
    | Annotated[IsNull, Tag("is_null")]
    | Annotated[NotNull, Tag("not_null")]
    | Annotated[IsTrue, Tag("is_true")]
    | Annotated[IsFalse, Tag("is_false")]
    | Annotated[Equals, Tag("equals")]
    | Annotated[NotEquals, Tag("not_equals")]
    | Annotated[Gt, Tag("gt")]
    | Annotated[Like, Tag("like")]
    | Annotated[Contains, Tag("contains")]
    | Annotated[NotRevoked, Tag("not_revoked")]
    | Annotated[ExpiresAt, Tag("expires_at")]
    | Annotated[Lifetime, Tag("lifetime")]
    | Annotated[After, Tag("after")]
    | Annotated[EqualsClient, Tag("equals_client")]
    | Annotated[Exists, Tag("exists")],
    Discriminator(
        _kind,
        custom_error_type="condition",
        custom_error_message=f"a condition is a table with exactly one of the keys {', '.join(_KINDS)}",
    ),
]

for _model in (All, AnyOf, Not, ExistsOperand):
    _model.model_rebuild()
