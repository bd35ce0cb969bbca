"""Finding, validating and binding profiles: built-in TOML data or a custom file, resolved for one config."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reaper.config import Config, IpConfig, parse_duration, validation_problems
from reaper.errors import ConfigError
from reaper.profiles.model import ClientMap, CredentialMap, OptionSpec, Profile
from reaper.profiles.names import resolve_names
from reaper.profiles.reads import profile_reads


@dataclass(frozen=True)
class IpSettings:
    """Registrant IP handling bound from the config: prefix lengths and an optional access log."""

    v4_bits: int = 24
    v6_bits: int = 56
    access_log: IpConfig | None = None


@dataclass(frozen=True)
class BoundProfile:
    """A profile resolved for one database: physical names, the operator's option values and IP settings."""

    profile: Profile
    options: dict[str, Any] = field(default_factory=dict)
    ip: IpSettings = IpSettings()

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def client(self) -> ClientMap:
        return self.profile.client

    @property
    def credentials(self) -> tuple[CredentialMap, ...]:
        """Credentials that reference the client's key: what the SQL reaper re-checks and deletes."""
        return self.profile.keyed_credentials

    @property
    def scan_credentials(self) -> tuple[CredentialMap, ...]:
        """Every credential the scan reads, including those that reference another client column (records
        prove nothing: they are not read)."""
        return tuple(c for c in self.profile.credentials if c.kind != "record")

    @property
    def actions(self) -> tuple[str, ...]:
        return self.profile.actions


_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def unsafe_names(profile: Profile) -> list[tuple[str, str]]:
    """Table and column names that are not plain identifiers (every name is quoted in SQL all the same; this
    refuses what no real schema needs, so a hostile setting never reaches a statement)."""
    bad: list[tuple[str, str]] = []
    for table, columns in profile_reads(profile).items():
        if not _TABLE.fullmatch(table):
            bad.append(("table", table))
        bad += [("column", c) for c in sorted(columns) if not _COLUMN.fullmatch(c)]
    extra = [*profile.client.row_id, *(profile.delete.disable_set or {})]
    extra += [u for c in profile.credentials for u in c.unique_by]
    bad += [("column", c) for c in extra if not _COLUMN.fullmatch(c)]
    return bad


def builtin_profiles() -> dict[str, Path]:
    """Built-in profile name -> file."""
    root = resources.files("reaper.profiles") / "builtin"
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    """Validate profile data; every problem listed with its key."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, lambda _loc: f"profile {source}")) from None


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


def _option_value(spec: OptionSpec, raw: Any) -> Any:
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
    known_tables = set(profile_reads(profile))
    problems = [
        f"config: tables.{name}: profile '{profile.name}' has no table '{name}' "
        f"(its tables: {', '.join(sorted(known_tables))})"
        for name in config.tables
        if name not in known_tables
    ]
    problems += [
        f"config: tables.{name}: {value!r} is not a plain identifier (letters, digits, _ and $; schema.table)"
        for name, value in config.tables.items()
        if not _TABLE.fullmatch(value)
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
            options[name] = _option_value(spec, config.options.get(name, spec.default))
        except ValueError as exc:
            problems.append(f"config: options.{name}: {exc}")
    if problems:
        raise ConfigError(problems)
    naming = options.get(profile.naming_option) if profile.naming_option else None
    resolved = resolve_names(profile, dict(config.tables), naming or "as_is")
    bad = unsafe_names(resolved) if resolved.store.kind == "sql" else []  # key-value names are keys, not SQL
    if bad:
        raise ConfigError(
            [
                f"profile '{profile.name}': {what} {name!r} is not a plain identifier (letters, digits, _ and $; "
                "a table may be schema.table)"
                for what, name in bad
            ]
        )
    ip = IpSettings(
        config.classify.ip_prefix_v4, config.classify.ip_prefix_v6, config.ip if config.ip.access_log else None
    )
    return BoundProfile(resolved, options, ip)
