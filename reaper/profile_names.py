"""Resolve a profile's names for one database: table renames, a naming convention, and the client context
that `equals_client` conditions need, baked into the profile data before it is validated again.

Baking the physical names in means every consumer (scan, check, the reaper, restore) reads the same names
without being told about renames or conventions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Rename = Callable[[str], str]

_WORDS = re.compile(r"[\da-z]+|[A-Z]+(?![a-z])|[A-Z][\da-z]+")


def snake_case(name: str) -> str:
    """camelCase -> snake_case as Drizzle's `casing: "snake_case"` does it (`clientId` -> `client_id`)."""
    schema, dot, bare = name.rpartition(".")
    words = _WORDS.findall(bare.replace("'", ""))
    return f"{schema}{dot}{'_'.join(w.lower() for w in words) if words else bare}"


CONVENTIONS: dict[str, Rename] = {"as_is": lambda n: n, "snake_case": snake_case}


def resolve_names(data: dict[str, Any], tables: dict[str, str], naming: str = "as_is") -> dict[str, Any]:
    """Profile data with physical table and column names, and `equals_client` completed."""
    col = CONVENTIONS[naming]

    def table(name: str) -> str:
        return tables.get(name) or col(name)

    out = dict(data)
    client = dict(data["client"])
    out["client"] = _client(client, table, col)
    ctx = {"client_table": out["client"]["table"], "client_key": out["client"]["key"]}
    creds = []
    for cred in data.get("credentials", ()):
        c = dict(cred)
        c["table"] = table(c["table"])
        c["ref"] = col(c["ref"])
        if c.get("client_column"):
            c["client_column"] = col(c["client_column"])
        ref_ctx = {**ctx, "ref": c["ref"], "ref_client_column": c.get("client_column") or ctx["client_key"]}
        for key in ("live", "exclude"):
            if key in c:
                c[key] = _condition(c[key], table, col, ref_ctx)
        if "issued_at" in c:
            c["issued_at"] = _field(c["issued_at"], table, col)
        if "tenant" in c:
            c["tenant"] = _tenant(c["tenant"], table, col)
        if "unique_by" in c:
            c["unique_by"] = [col(u) for u in c["unique_by"]]
        creds.append(c)
    out["credentials"] = creds
    if "delete" in data and data["delete"].get("disable_set"):
        out["delete"] = {
            **data["delete"],
            "disable_set": {col(k): v for k, v in data["delete"]["disable_set"].items()},
        }
    return out


def _client(c: dict[str, Any], table: Rename, col: Rename) -> dict[str, Any]:
    c["table"] = table(c["table"])
    for key in ("key", "client_id"):
        c[key] = col(c[key])
    if "row_id" in c:
        c["row_id"] = [col(r) for r in c["row_id"]]
    for key in ("created_at", "name", "redirect_uris", "software_id", "software_version", "subject", "ip"):
        if key in c:
            c[key] = _field(c[key], table, col)
    for key in ("disabled", "dynamic", "cimd"):
        if key in c:
            c[key] = _condition(c[key], table, col, None)
    if "tenant" in c:
        c["tenant"] = _tenant(c["tenant"], table, col)
    return c


def _field(f: dict[str, Any], table: Rename, col: Rename) -> dict[str, Any]:
    f = dict(f)
    if "column" in f:
        f["column"] = col(f["column"])
    if "rows" in f:
        r = f["rows"]
        f["rows"] = {**r, "table": table(r["table"]), "ref": col(r["ref"]), "column": col(r["column"])}
    if "lookup" in f:
        lk = dict(f["lookup"])
        lk["table"] = table(lk["table"])
        lk["on"] = {col(k): col(v) for k, v in lk["on"].items()}
        lk["column"] = col(lk["column"])
        if "where" in lk:
            lk["where"] = _condition(lk["where"], table, col, None)
        f["lookup"] = lk
    return f


def _tenant(t: dict[str, Any], table: Rename, col: Rename) -> dict[str, Any]:
    t = {**t, "column": col(t["column"])}
    if "via" in t:
        v = t["via"]
        t["via"] = {"table": table(v["table"]), "key": col(v["key"]), "column": col(v["column"])}
    return t


_COLUMN_KEYS = ("column", "start", "seconds_column", "client_column")


def _condition(cond: dict[str, Any], table: Rename, col: Rename, ref_ctx: dict[str, str] | None) -> dict[str, Any]:
    ((key, value),) = cond.items()
    if key in ("all", "any"):
        return {key: [_condition(c, table, col, ref_ctx) for c in value]}
    if key == "not":
        return {key: _condition(value, table, col, ref_ctx)}
    if isinstance(value, str):
        return {key: col(value)}
    if key == "exists":
        spec = {"table": table(value["table"]), "on": {col(k): col(v) for k, v in value["on"].items()}}
        if "where" in value:
            spec["where"] = _condition(value["where"], table, col, None)
        return {key: spec}
    spec = {k: col(v) if k in _COLUMN_KEYS else v for k, v in value.items()}
    if key == "equals_client" and ref_ctx is not None:
        spec.update(ref_ctx)
    return {key: spec}
