"""The profile format: declarative maps from one server's tables onto the canonical client model.

Built-in profiles are TOML files in `reaper/profiles/builtin/`; a custom profile is a file in the same format.
The format is documented in docs/profiles.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reaper.profiles.conditions import Condition, ConditionBase, Encoding, EqualsClient, Exists

ListFormat = Literal["json", "space", "comma", "rows"]
Action = Literal["delete", "disable", "merge"]
FIELDS = ("name", "redirect_uris", "software_id", "software_version", "subject", "ip")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RowsSource(_Model):
    """Values kept as rows of another table (Keycloak's redirect_uris)."""

    table: str
    ref: str = Field(description="column referencing the client's key")
    column: str


class LookupSource(_Model):
    """A value kept in another table, matched to the client by columns (Keycloak's event log)."""

    table: str
    on: dict[str, str] = Field(description="{lookup column = client column}: how rows match the client")
    column: str = Field(description="the value to read")
    where: Condition | None = Field(None, description="only rows of the lookup table where this holds")
    pick: Literal["min", "max"] = Field("min", description="when several rows match: the least or greatest")

    @model_validator(mode="after")
    def _matches_something(self) -> LookupSource:
        if not self.on:
            raise ValueError("a lookup needs at least one 'on' column pair")
        return self


class FieldMap(_Model):
    """Where one canonical attribute lives: a column, optionally a JSON path inside it, decoded how."""

    column: str | None = None
    json_path: str | None = Field(None, alias="json", description="dotted path inside a JSON text column")
    format: ListFormat | None = Field(None, description="for lists: JSON array, space/comma separated, rows")
    encoding: Encoding | None = Field(None, description="for times")
    rows: RowsSource | None = None
    lookup: LookupSource | None = None
    null: Literal["bad_row", "unknown"] = Field(
        "bad_row", description="created_at only: NULL is a bad row (default) or an unknown age (protected)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> FieldMap:
        if sum(x is not None for x in (self.column, self.rows, self.lookup)) != 1:
            raise ValueError("a field needs exactly one of 'column', 'rows' or 'lookup'")
        return self


class TenantVia(_Model):
    """Tenant given by name, stored by id: `column IN (SELECT key FROM table WHERE column = :option)`."""

    table: str
    key: str
    column: str


class TenantMap(_Model):
    """Filter rows to one tenant (Hydra's nid, Keycloak's realm) when the option is set."""

    column: str
    option: str
    via: TenantVia | None = None


class ClientMap(_Model):
    """The client table."""

    table: str
    key: str = Field(description="the column credential rows reference")
    client_id: str = Field(description="the public client_id")
    row_id: tuple[str, ...] = Field((), description="primary key columns when different from key")
    created_at: FieldMap | None = None
    name: FieldMap | None = None
    redirect_uris: FieldMap | None = None
    software_id: FieldMap | None = None
    software_version: FieldMap | None = None
    subject: FieldMap | None = None
    ip: FieldMap | None = None
    disabled: Condition | None = Field(None, description="true when the client is switched off")
    dynamic: Condition | None = Field(None, description="true for DCR clients; absent means all are dynamic")
    cimd: Condition | None = Field(None, description="true for Client ID Metadata Document clients")
    tenant: TenantMap | None = Field(None, description="{column, option, via}: filter rows to one tenant")

    def fields(self) -> Iterator[tuple[str, FieldMap]]:
        """(attribute, map) of every mapped attribute, created_at first."""
        for name in ("created_at", *FIELDS):
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def flags(self) -> Iterator[tuple[str, ConditionBase]]:
        """(flag, condition) of the dynamic, cimd and disabled markers the profile sets."""
        for name in ("dynamic", "cimd", "disabled"):
            value = getattr(self, name)
            if value is not None:
                yield name, value


class CredentialMap(_Model):
    """One table of credentials (tokens, codes, consents, sessions) that keep a client alive."""

    name: str
    table: str
    ref: str = Field(description="column holding the client's key (or `client_column`)")
    client_column: str | None = Field(
        None, description="the client column `ref` holds, when not the key (DOT device grants: client_id)"
    )
    kind: Literal["token", "code", "consent", "session", "login", "record"] = Field(
        "token",
        description="what the rows are; a `login` (a login in progress) is live while it lasts but is no sign of "
        "use; a `record` belongs to the client but proves nothing (kept in tombstones, never read by the scan)",
    )
    via: str | None = Field(
        None,
        description="key-value stores: `ref` holds the key of this other credential's entries, not the client's "
        "(FastMCP's jti mappings point at an upstream token set); deleted with the client, never live",
    )
    issued_at: FieldMap | None = Field(None, description="when the row was issued; feeds 'last token'")
    live: Condition | None = Field(
        None, description="when the row is a live credential; absent = always live (consents: never)"
    )
    exclude: Condition | None = Field(None, description="rows that never count (DOT's registration token)")
    changed_at: tuple[str, ...] | None = Field(
        None,
        description="columns the server stamps (in issued_at's encoding) whenever it changes a row in place, "
        "e.g. a revocation time; () = rows never change in place; unset = unknown, so `serve` always scans fully",
    )
    tenant: TenantMap | None = None
    optional: bool = Field(False, description="a table some releases lack: skipped where it does not exist")
    movable: bool = Field(False, description="a merge moves these rows to the survivor (consents)")
    unique_by: tuple[str, ...] = Field((), description="columns that identify a movable row besides the client")

    def conditions(self) -> Iterator[ConditionBase]:
        for cond in (self.live, self.exclude):
            if cond is not None:
                yield cond


class DetachMap(_Model):
    """A pointer between two credential tables to set NULL before their rows go, as the server's own delete does
    (DOT: Django's collector nulls `source_refresh_token` and `access_token`, which point at each other): on a
    database that checks foreign keys at once (MySQL/MariaDB), rows that reference each other cannot go one table
    after the other otherwise. Tombstones keep the values, and restore puts them back."""

    table: str = Field(description="the credential (by name) whose rows hold the pointer")
    column: str = Field(description="the pointer column (NULLable, holding the referenced row's primary key)")
    references: str = Field(description="the credential (by name) whose rows it points at")


class DeleteMap(_Model):
    """How a client is removed."""

    children: tuple[str, ...] = Field((), description="credential names to delete first, in order")
    detach: tuple[DetachMap, ...] = Field((), description="pointers set NULL before the children go, in order")
    cascade: bool = False
    actions: tuple[Action, ...] = Field(("delete", "merge"), description="SQL actions allowed ([] = none)")
    disable_set: dict[str, Any] | None = Field(None, description="{column: value} that disables a client")


class StoreMap(_Model):
    """What kind of store the profile reads: SQL tables (the default) or a key-value store's collections."""

    kind: Literal["sql", "kv"] = "sql"
    scheme: Literal["fastmcp"] | None = Field(
        None,
        description="kv: how the value encryption key and the file tree's directory derive from the server's key "
        "material ('fastmcp': FastMCP's OAuthProxy)",
    )


class ApiMap(_Model):
    """Act through the server's admin API instead of SQL (Keycloak): the database is only ever read."""

    kind: Literal["keycloak"]
    actions: tuple[Literal["delete", "disable"], ...] = ("delete", "disable")


class OptionSpec(_Model):
    """A knob the operator can set under [options]."""

    kind: Literal["duration", "string", "integer", "boolean"] = "string"
    default: Any = None
    doc: str = ""
    choices: tuple[str, ...] = Field((), description="for strings: the allowed values")


class LoopMap(_Model):
    """Where a profile's refresh tokens show their revocation (the `[loops]` part of a profile)."""

    credential: str = Field(description="the profile credential (by name) whose rows carry refresh tokens")
    revoked: Condition = Field(description="true for a row whose refresh token is revoked")
    revoked_at: FieldMap = Field(description="when it was revoked: {column, encoding}")
    evidence: Literal["replay", "rotation"] = Field(
        "replay",
        description="replay: the revocation is the failed refresh itself (the family re-registers within "
        "loops.window); rotation: the revocation is a rotation whose successor was never used before the family "
        "registered again",
    )

    @model_validator(mode="after")
    def _has_column(self) -> LoopMap:
        if not self.revoked_at.column:
            raise ValueError("revoked_at needs a column")
        return self


class Profile(_Model):
    """A whole profile."""

    name: str
    description: str = ""
    notes: tuple[str, ...] = ()
    database: tuple[str, ...] = ("postgresql", "mysql", "sqlite")
    options: dict[str, OptionSpec] = Field(default_factory=dict)
    naming_option: str | None = Field(
        None, description="the option choosing physical names: 'as_is' (default) or 'snake_case'"
    )
    client: ClientMap
    credentials: tuple[CredentialMap, ...] = ()
    delete: DeleteMap = DeleteMap()
    api: ApiMap | None = None
    loops: LoopMap | None = None
    spellings: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="column -> its spellings in other releases, resolved against the schema"
    )
    store: StoreMap = StoreMap()

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        names = [c.name for c in self.credentials]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"credential names must be unique, repeated: {duplicate}")
        missing = [c for c in self.delete.children if c not in names]
        if missing:
            raise ValueError(f"delete.children names unknown credentials {missing}")
        unknown = [n for d in self.delete.detach for n in (d.table, d.references) if n not in self.delete.children]
        if unknown:
            raise ValueError(f"delete.detach names credentials that are not delete.children: {unknown}")
        if self.naming_option is not None and self.naming_option not in self.options:
            raise ValueError(f"naming_option '{self.naming_option}' is not one of the profile's options")
        if any(isinstance(c, EqualsClient) for cond in self.client_conditions() for c in cond.walk()):
            raise ValueError("equals_client only applies to credential conditions (live, exclude)")
        self._check_store()
        if self.loops is not None:
            keyed = [c.name for c in self.credentials if c.client_column is None and c.via is None]
            if self.loops.credential not in keyed:
                raise ValueError(
                    f"loops.credential '{self.loops.credential}' is not one of its credentials keyed by the "
                    f"client's key ({', '.join(keyed)})"
                )
        return self

    def _check_store(self) -> None:
        vias = [c for c in self.credentials if c.via is not None]
        if self.store.kind == "sql":
            if vias:
                raise ValueError(f'credentials.via is for key-value stores ([store] kind = "kv"): {vias[0].name}')
            if self.store.scheme is not None:
                raise ValueError('store.scheme is for key-value stores ([store] kind = "kv")')
            return
        # A key-value profile: each condition reads one entry, nothing is renamed or moved, there is no SQL.
        direct = {c.name for c in self.credentials if c.via is None and c.client_column is None}
        for c in vias:
            if c.via not in direct:
                raise ValueError(f"credentials.{c.name}.via: '{c.via}' is not a credential that references the client")
        conds = [*self.client_conditions(), *(x for c in self.credentials for x in c.conditions())]
        if any(isinstance(x, EqualsClient | Exists) for cond in conds for x in cond.walk()):
            raise ValueError("a key-value profile's conditions read one entry: no equals_client or exists")
        if any(c.client_column is not None for c in self.credentials):
            raise ValueError("a key-value profile's credentials reference the client's key (no client_column)")
        if self.api is not None or self.loops is not None or self.delete.disable_set:
            raise ValueError("a key-value profile has no [api], [loops] or delete.disable_set")
        if set(self.delete.actions) - {"delete"}:
            raise ValueError('a key-value profile can only delete (delete.actions = ["delete"])')
        if any(f.rows is not None or f.lookup is not None for _, f in self.client.fields()):
            raise ValueError("a key-value profile's client fields are fields of the client entry (no rows, lookup)")

    def client_conditions(self) -> Iterator[ConditionBase]:
        """Conditions over the client table and its lookups."""
        for _, cond in self.client.flags():
            yield cond
        for _, f in self.client.fields():
            if f.lookup is not None and f.lookup.where is not None:
                yield f.lookup.where

    def credential(self, name: str) -> CredentialMap:
        return next(c for c in self.credentials if c.name == name)

    def without(self, names: set[str]) -> Profile:
        """The profile without these credentials (optional tables a database lacks)."""
        if not names:
            return self
        loops = self.loops if self.loops is None or self.loops.credential not in names else None
        delete = self.delete.model_copy(
            update={
                "children": tuple(c for c in self.delete.children if c not in names),
                "detach": tuple(d for d in self.delete.detach if not {d.table, d.references} & names),
            }
        )
        creds = tuple(c for c in self.credentials if c.name not in names)
        return self.model_copy(update={"credentials": creds, "delete": delete, "loops": loops})

    @property
    def keyed_credentials(self) -> tuple[CredentialMap, ...]:
        """Credentials that reference the client's key: what the SQL reaper re-checks and deletes."""
        return tuple(c for c in self.credentials if c.client_column is None and c.via is None)

    @property
    def actions(self) -> tuple[str, ...]:
        """What a reap may do with this profile: its API's actions, else its SQL actions."""
        return self.api.actions if self.api else self.delete.actions
