"""Profiles: declarative maps from one server's tables onto the canonical client model.

Built-in profiles are TOML files in `reaper/profiles/`; a custom profile is a file in the same format.
The format is documented in docs/profiles.md.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reaper.config import Config, parse_duration
from reaper.errors import ConfigError

Encoding = Literal["epoch", "epoch_ms", "timestamp", "timestamptz"]
ListFormat = Literal["json", "space", "comma", "rows"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RowsSource(_Model):
    """Values kept as rows of another table (Keycloak's redirect_uris)."""

    table: str
    ref: str = Field(description="column referencing the client's key")
    column: str


class FieldMap(_Model):
    """Where one canonical attribute lives: a column, optionally a JSON path inside it, decoded how."""

    column: str | None = None
    json_path: str | None = Field(None, alias="json", description="dotted path inside a JSON text column")
    format: ListFormat | None = Field(None, description="for lists: JSON array, space/comma separated, rows")
    encoding: Encoding | None = Field(None, description="for times")
    rows: RowsSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FieldMap:
        if (self.column is None) == (self.rows is None):
            raise ValueError("a field needs exactly one of 'column' or 'rows'")
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
        if isinstance(value, str):
            return {value}
        cols = {value[k] for k in ("column", "start", "seconds_column") if k in value}
        return cols


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
    tenant: dict[str, str] | None = Field(None, description="{column, option}: filter rows to one tenant")


class CredentialMap(_Model):
    """One table of credentials (tokens, codes, consents, sessions) that keep a client alive."""

    name: str
    table: str
    ref: str = Field(description="column holding the client's key")
    kind: Literal["token", "code", "consent", "session"] = "token"
    issued_at: FieldMap | None = Field(None, description="when the row was issued; feeds 'last token'")
    live: Condition | None = Field(
        None, description="when the row is a live credential; absent = always live (consents: never)"
    )
    exclude: Condition | None = Field(None, description="rows that never count (DOT's registration token)")
    tenant: dict[str, str] | None = None
    movable: bool = Field(False, description="a merge moves these rows to the survivor (consents)")
    unique_by: tuple[str, ...] = Field((), description="columns that identify a movable row besides the client")


class DeleteMap(_Model):
    """How a client is removed."""

    children: tuple[str, ...] = Field((), description="credential names to delete first, in order")
    cascade: bool = False
    actions: tuple[Literal["delete", "disable", "merge"], ...] = ("delete", "merge")
    disable_set: dict[str, Any] | None = Field(None, description="{column: value} that disables a client")


class OptionSpec(_Model):
    """A knob the operator can set under [options]."""

    kind: Literal["duration", "string", "integer", "boolean"] = "string"
    default: Any = None
    doc: str = ""


class Profile(_Model):
    """A whole profile."""

    name: str
    description: str = ""
    notes: tuple[str, ...] = ()
    database: tuple[str, ...] = ("postgresql", "mysql", "sqlite")
    options: dict[str, OptionSpec] = Field(default_factory=dict)
    client: ClientMap
    credentials: tuple[CredentialMap, ...] = ()
    delete: DeleteMap = DeleteMap()

    @model_validator(mode="after")
    def _children_exist(self) -> Profile:
        names = {c.name for c in self.credentials}
        missing = [c for c in self.delete.children if c not in names]
        if missing:
            raise ValueError(f"delete.children names unknown credentials {missing}")
        return self


class BoundProfile:
    """A profile with the operator's table renames and option values applied."""

    def __init__(self, profile: Profile, tables: dict[str, str], options: dict[str, Any]):
        self.profile = profile
        self.name = profile.name
        self._tables = tables
        self.options = options

    def table(self, logical: str) -> str:
        """Physical table name for a profile's table name."""
        return self._tables.get(logical, logical)

    @property
    def client(self) -> ClientMap:
        return self.profile.client

    @property
    def credentials(self) -> tuple[CredentialMap, ...]:
        return self.profile.credentials


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
    return raw


def bind_profile(config: Config) -> BoundProfile:
    """Load the configured profile and apply table renames and options, validating both."""
    profile = load_profile(config.profile)
    known_tables = {profile.client.table} | {c.table for c in profile.credentials}
    for field in _row_fields(profile.client):
        known_tables.add(field.table)
    problems = [
        f"config: tables.{name}: profile '{profile.name}' has no table '{name}' "
        f"(its tables: {', '.join(sorted(known_tables))})"
        for name in config.tables
        if name not in known_tables
    ]
    options: dict[str, Any] = {}
    for name, raw in config.options.items():
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
    return BoundProfile(profile, dict(config.tables), options)


def _row_fields(client: ClientMap) -> list[RowsSource]:
    fields = [client.name, client.redirect_uris, client.software_id, client.subject, client.ip]
    return [f.rows for f in fields if f is not None and f.rows is not None]
