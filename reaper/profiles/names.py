"""Physical names: table renames and a naming convention, baked into a profile once when it is bound.

Baking the names in means every consumer (scan, check, the reaper, restore) reads the same names without being
told about renames or conventions.
"""

from __future__ import annotations

import re

from reaper.profiles.conditions import Rename
from reaper.profiles.model import (
    ClientMap,
    CredentialMap,
    DeleteMap,
    FieldMap,
    LoopMap,
    Profile,
    TenantMap,
)

_WORDS = re.compile(r"[\da-z]+|[A-Z]+(?![a-z])|[A-Z][\da-z]+")


def snake_case(name: str) -> str:
    """camelCase -> snake_case as Drizzle's `casing: "snake_case"` does it (`clientId` -> `client_id`)."""
    schema, dot, bare = name.rpartition(".")
    words = _WORDS.findall(bare.replace("'", ""))
    return f"{schema}{dot}{'_'.join(w.lower() for w in words) if words else bare}"


def _as_is(name: str) -> str:
    return name


CONVENTIONS: dict[str, Rename] = {"as_is": _as_is, "snake_case": snake_case}


class _Names:
    """The two renames every part of a profile goes through."""

    def __init__(self, tables: dict[str, str], naming: str, columns: dict[str, str] | None = None):
        convention = CONVENTIONS[naming]
        overrides = columns or {}
        self.column: Rename = lambda name: convention(overrides.get(name, name))
        self.tables = tables

    def table(self, name: str) -> str:
        return self.tables.get(name) or self.column(name)

    def field(self, f: FieldMap) -> FieldMap:
        col, tab = self.column, self.table
        update: dict[str, object] = {}
        if f.column is not None:
            update["column"] = col(f.column)
        if f.rows is not None:
            r = f.rows
            update["rows"] = r.model_copy(update={"table": tab(r.table), "ref": col(r.ref), "column": col(r.column)})
        if f.lookup is not None:
            lk = f.lookup
            update["lookup"] = lk.model_copy(
                update={
                    "table": tab(lk.table),
                    "on": {col(k): col(v) for k, v in lk.on.items()},
                    "column": col(lk.column),
                    "where": lk.where.renamed(col, tab) if lk.where is not None else None,
                }
            )
        return f.model_copy(update=update)

    def tenant(self, t: TenantMap | None) -> TenantMap | None:
        if t is None:
            return None
        via = t.via
        if via is not None:
            via = via.model_copy(
                update={"table": self.table(via.table), "key": self.column(via.key), "column": self.column(via.column)}
            )
        return t.model_copy(update={"column": self.column(t.column), "via": via})

    def client(self, c: ClientMap) -> ClientMap:
        col = self.column
        update: dict[str, object] = {
            "table": self.table(c.table),
            "key": col(c.key),
            "client_id": col(c.client_id),
            "row_id": tuple(col(r) for r in c.row_id),
            "tenant": self.tenant(c.tenant),
        }
        update.update({name: self.field(f) for name, f in c.fields()})
        update.update({name: cond.renamed(col, self.table) for name, cond in c.flags()})
        return c.model_copy(update=update)

    def credential(self, c: CredentialMap) -> CredentialMap:
        col, tab = self.column, self.table
        return c.model_copy(
            update={
                "table": tab(c.table),
                "ref": col(c.ref),
                "client_column": col(c.client_column) if c.client_column else None,
                "issued_at": self.field(c.issued_at) if c.issued_at else None,
                "live": c.live.renamed(col, tab) if c.live is not None else None,
                "exclude": c.exclude.renamed(col, tab) if c.exclude is not None else None,
                "changed_at": tuple(col(x) for x in c.changed_at) if c.changed_at is not None else None,
                "tenant": self.tenant(c.tenant),
                "unique_by": tuple(col(u) for u in c.unique_by),
            }
        )

    def delete(self, d: DeleteMap) -> DeleteMap:
        update: dict[str, object] = {
            "detach": tuple(x.model_copy(update={"column": self.column(x.column)}) for x in d.detach)
        }
        if d.disable_set:
            update["disable_set"] = {self.column(k): v for k, v in d.disable_set.items()}
        return d.model_copy(update=update)

    def loops(self, lm: LoopMap | None) -> LoopMap | None:
        if lm is None:
            return None
        return lm.model_copy(
            update={"revoked": lm.revoked.renamed(self.column, self.table), "revoked_at": self.field(lm.revoked_at)}
        )


def resolve_names(
    profile: Profile, tables: dict[str, str], naming: str = "as_is", columns: dict[str, str] | None = None
) -> Profile:
    """The profile with physical table and column names (`columns`: spellings chosen for this database)."""
    names = _Names(tables, naming, columns)
    convention = CONVENTIONS[naming]
    return profile.model_copy(
        update={
            "client": names.client(profile.client),
            "credentials": tuple(names.credential(c) for c in profile.credentials),
            "delete": names.delete(profile.delete),
            "loops": names.loops(profile.loops),
            "spellings": {names.column(k): tuple(convention(v) for v in vs) for k, vs in profile.spellings.items()},
        }
    )
