"""Profiles: declarative maps from one server's tables onto the canonical client model.

Built-in profiles are TOML files in `reaper/profiles/`; a custom profile is a file in the same format.
The format is documented in docs/profiles.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reaper.config import Config, parse_duration
from reaper.errors import ConfigError
from reaper.profile_names import resolve_names

Encoding = Literal["epoch", "epoch_ms", "timestamp", "timestamptz"]
ListFormat = Literal["json", "space", "comma", "rows"]


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


class Condition(_Model):
    """A boolean predicate over one table's row; exactly one key is set. See docs/profiles.md."""

    all: tuple[Condition, ...] | None = None
    any: tuple[Condition, ...] | None = None
    not_: Condition | None = Field(None, alias="not")
    is_null: str | None = None
    not_null: str | None = None
    is_true: str | None = None
    is_false: str | None = Field(None, description="false or NULL")
    equals: dict[str, Any] | None = Field(None, description="{column, value}")
    not_equals: dict[str, Any] | None = Field(None, description="{column, value}; NULL counts as not equal")
    gt: dict[str, Any] | None = Field(None, description="{column, value}")
    like: dict[str, Any] | None = Field(None, description="{column, pattern}")
    contains: dict[str, Any] | None = Field(None, description="{column, text}: a substring, matched literally")
    not_revoked: dict[str, Any] | None = Field(
        None, description="{column, encoding}: NULL, 0 or a future time mean not revoked (yet)"
    )
    expires_at: dict[str, Any] | None = Field(
        None, description="{column, encoding, null='never'|'expired'}: still valid when in the future"
    )
    lifetime: dict[str, Any] | None = Field(
        None,
        description="{start, encoding, seconds_column | seconds | seconds_option, zero, null}: start + s > now",
    )
    equals_client: dict[str, Any] | None = Field(
        None, description="{column, client_column}: this row's column equals a column of its own client row"
    )
    exists: ExistsSpec | None = Field(
        None, description="{table, on, where}: a matching row of another table exists (a join, as EXISTS)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        set_keys = [k for k, v in self.__dict__.items() if v is not None]
        if len(set_keys) != 1:
            raise ValueError(f"a condition has exactly one key, got {set_keys or 'none'}")
        return self

    def kind(self) -> tuple[str, Any]:
        """The one (key, value) pair this condition holds."""
        return next((k, v) for k, v in self.__dict__.items() if v is not None)

    def columns(self) -> set[str]:
        """Every column the condition reads (for schema checks)."""
        key, value = self.kind()
        if key in ("all", "any"):
            return set().union(*(c.columns() for c in value))
        if key == "not_":
            return value.columns()
        if key == "exists":
            return set(value.on.values())
        if isinstance(value, str):
            return {value}
        cols = {value[k] for k in ("column", "start", "seconds_column") if k in value}
        return cols

    def walk(self) -> Iterator[Condition]:
        """This condition and every condition nested in it (exists' `where` included)."""
        yield self
        key, value = self.kind()
        if key in ("all", "any"):
            for c in value:
                yield from c.walk()
        elif key == "not_":
            yield from value.walk()
        elif key == "exists" and value.where is not None:
            yield from value.where.walk()


class ExistsSpec(_Model):
    """`exists`: a row of another table matches this one (`on`) and satisfies `where`."""

    table: str
    on: dict[str, str] = Field(description="{other table's column = this table's column}")
    where: Condition | None = None

    @model_validator(mode="after")
    def _matches_something(self) -> ExistsSpec:
        if not self.on:
            raise ValueError("exists needs at least one 'on' column pair")
        return self


Condition.model_rebuild()
LookupSource.model_rebuild()
FieldMap.model_rebuild()


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


class CredentialMap(_Model):
    """One table of credentials (tokens, codes, consents, sessions) that keep a client alive."""

    name: str
    table: str
    ref: str = Field(description="column holding the client's key (or `client_column`)")
    client_column: str | None = Field(
        None, description="the client column `ref` holds, when not the key (DOT device grants: client_id)"
    )
    kind: Literal["token", "code", "consent", "session"] = "token"
    issued_at: FieldMap | None = Field(None, description="when the row was issued; feeds 'last token'")
    live: Condition | None = Field(
        None, description="when the row is a live credential; absent = always live (consents: never)"
    )
    exclude: Condition | None = Field(None, description="rows that never count (DOT's registration token)")
    tenant: TenantMap | None = None
    movable: bool = Field(False, description="a merge moves these rows to the survivor (consents)")
    unique_by: tuple[str, ...] = Field((), description="columns that identify a movable row besides the client")


Action = Literal["delete", "disable", "merge"]


class DeleteMap(_Model):
    """How a client is removed."""

    children: tuple[str, ...] = Field((), description="credential names to delete first, in order")
    cascade: bool = False
    actions: tuple[Action, ...] = Field(("delete", "merge"), description="SQL actions allowed ([] = none)")
    disable_set: dict[str, Any] | None = Field(None, description="{column: value} that disables a client")


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

    @model_validator(mode="after")
    def _children_exist(self) -> Profile:
        names = [c.name for c in self.credentials]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"credential names must be unique, repeated: {duplicate}")
        missing = [c for c in self.delete.children if c not in names]
        if missing:
            raise ValueError(f"delete.children names unknown credentials {missing}")
        if self.naming_option is not None and self.naming_option not in self.options:
            raise ValueError(f"naming_option '{self.naming_option}' is not one of the profile's options")
        cm = self.client
        client_side = [c for c in (cm.disabled, cm.dynamic, cm.cimd) if c is not None]
        client_side += [
            f.lookup.where
            for f in (cm.created_at, *(getattr(cm, n) for n in _FIELDS))
            if f is not None and f.lookup is not None and f.lookup.where is not None
        ]
        if any(c.kind()[0] == "equals_client" for cond in client_side for c in cond.walk()):
            raise ValueError("equals_client only applies to credential conditions (live, exclude)")
        for cond in _conditions(self):
            for c in cond.walk():
                key, value = c.kind()
                if key == "equals_client" and not {"column", "client_column"} <= set(value):
                    raise ValueError("equals_client needs 'column' and 'client_column'")
        return self


class BoundProfile:
    """A profile resolved for one database: renames, naming convention and option values applied.

    Table and column names in `profile` are the physical ones; `table()` maps a profile's logical table name
    (or an already physical one) to its physical name.
    """

    def __init__(self, profile: Profile, tables: dict[str, str], options: dict[str, Any], ip: IpSettings | None = None):
        self.profile = profile
        self.name = profile.name
        self._tables = tables
        self._physical = physical_tables(profile)
        self.options = options
        self.ip = ip or IpSettings()

    def table(self, logical: str) -> str:
        """Physical table name for a profile's table name."""
        return logical if logical in self._physical else self._tables.get(logical, logical)

    @property
    def client(self) -> ClientMap:
        return self.profile.client

    @property
    def credentials(self) -> tuple[CredentialMap, ...]:
        """Credentials that reference the client's key: what the SQL reaper re-checks and deletes."""
        return tuple(c for c in self.profile.credentials if c.client_column is None)

    @property
    def scan_credentials(self) -> tuple[CredentialMap, ...]:
        """Every credential the scan reads, including those that reference another client column."""
        return self.profile.credentials

    @property
    def actions(self) -> tuple[str, ...]:
        """What a reap may do with this profile: its API's actions, else its SQL actions."""
        return self.profile.api.actions if self.profile.api else self.profile.delete.actions


def physical_tables(profile: Profile) -> set[str]:
    """Every table a (bound) profile names."""
    out = {profile.client.table} | {c.table for c in profile.credentials}
    fields = [profile.client.created_at, *(getattr(profile.client, n) for n in _FIELDS)]
    for f in fields:
        if f is not None and f.rows is not None:
            out.add(f.rows.table)
        if f is not None and f.lookup is not None:
            out.add(f.lookup.table)
    if profile.client.tenant and profile.client.tenant.via:
        out.add(profile.client.tenant.via.table)
    for cond in _conditions(profile):
        for c in cond.walk():
            key, value = c.kind()
            if key == "exists":
                out.add(value.table)
    return out


_FIELDS = ("name", "redirect_uris", "software_id", "software_version", "subject", "ip")


def _conditions(profile: Profile) -> list[Condition]:
    cm = profile.client
    out = [c for c in (cm.disabled, cm.dynamic, cm.cimd) if c is not None]
    for f in (cm.created_at, *(getattr(cm, n) for n in _FIELDS)):
        if f is not None and f.lookup is not None and f.lookup.where is not None:
            out.append(f.lookup.where)
    for cred in profile.credentials:
        out += [c for c in (cred.live, cred.exclude) if c is not None]
    return out


class IpSettings:
    """Registrant IP handling bound from the config: prefix lengths and an optional access log."""

    def __init__(self, v4_bits: int = 24, v6_bits: int = 56, access_log: Any = None):
        self.v4_bits = v4_bits
        self.v6_bits = v6_bits
        self.access_log = access_log  # reaper.config.IpConfig when a log is configured


def builtin_profiles() -> dict[str, Path]:
    """Built-in profile name -> file."""
    root = resources.files("reaper") / "profiles"
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    """Validate profile data; every problem listed with its key."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"profile {source}: unknown key '{key}'")
            else:
                problems.append(f"profile {source}: {key}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(problems) from None


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a custom profile file by path."""
    builtins = builtin_profiles()
    if name_or_path in builtins:
        path = builtins[name_or_path]
    elif name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
    else:
        raise ConfigError(
            f"unknown profile '{name_or_path}'; built-in profiles: {', '.join(sorted(builtins))} "
            "(or give the path of a profile .toml file)"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {path}: malformed TOML: {exc}") from None
    return parse_profile(data, path.name)


def _option_value(name: str, spec: OptionSpec, raw: Any) -> Any:
    if raw is None:
        return None
    if spec.kind == "duration":
        return parse_duration(raw)
    if spec.kind == "integer" and not isinstance(raw, int):
        raise ValueError(f"expected an integer, got {raw!r}")
    if spec.kind == "boolean" and not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    if spec.choices and raw not in spec.choices:
        raise ValueError(f"expected one of {', '.join(spec.choices)}, got {raw!r}")
    return raw


def bind_profile(config: Config) -> BoundProfile:
    """Load the configured profile and apply table renames, naming and options, validating all of them."""
    profile = load_profile(config.profile)
    known_tables = physical_tables(profile)
    problems = [
        f"config: tables.{name}: profile '{profile.name}' has no table '{name}' "
        f"(its tables: {', '.join(sorted(known_tables))})"
        for name in config.tables
        if name not in known_tables
    ]
    options: dict[str, Any] = {}
    for name in config.options:
        if name not in profile.options:
            problems.append(
                f"config: options.{name}: profile '{profile.name}' has no option '{name}'"
                + (f" (its options: {', '.join(sorted(profile.options))})" if profile.options else "")
            )
    for name, spec in profile.options.items():
        try:
            options[name] = _option_value(name, spec, config.options.get(name, spec.default))
        except ValueError as exc:
            problems.append(f"config: options.{name}: {exc}")
    if problems:
        raise ConfigError(problems)
    naming = options.get(profile.naming_option) if profile.naming_option else None
    resolved = parse_profile(
        resolve_names(profile.model_dump(by_alias=True, exclude_none=True), dict(config.tables), naming or "as_is"),
        profile.name,
    )
    ip = IpSettings(
        config.classify.ip_prefix_v4, config.classify.ip_prefix_v6, config.ip if config.ip.access_log else None
    )
    return BoundProfile(resolved, dict(config.tables), options, ip)
