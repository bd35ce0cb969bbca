"""Configuration: TOML file, then DCR_REAPER_* environment, then CLI flags; validated up front."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from reaper.errors import ConfigError

ENV_PREFIX = "DCR_REAPER_"
DEFAULT_CONFIG_PATHS = (Path("dcr-reaper.toml"), Path("/etc/dcr-reaper/config.toml"))
FAMILY_COMPONENTS = ("name", "redirect_uris", "software_id", "subject", "ip")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `"90s"`, `"15m"`, `"1h"`, `"7d"` or `"2w"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '15m', '1h' or '7d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration like '15m', '1h' or '7d', got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassifyConfig(_Section):
    """Thresholds that turn scan facts into verdicts."""

    young_for: Duration = Field(3600.0, description="grace after registration: never reaped, may be mid-flow")
    abandoned_after: Duration = Field(86400.0, description="a client with no token ever is abandoned after this")
    churn_window: Duration = Field(86400.0, description="window for 'registrations in the last ...'")
    churn_min_registrations: int = Field(5, ge=2, description="a family with this many in the window churns")
    clock_skew: Duration = Field(300.0, description="timestamps this far in the future are tolerated")
    family_components: tuple[str, ...] = Field(FAMILY_COMPONENTS, description="what a family fingerprint uses")
    allow_client_ids: tuple[str, ...] = Field((), description="client_ids that are always protected")
    allow_names: tuple[str, ...] = Field((), description="glob patterns of client names always protected")

    def model_post_init(self, __context: Any) -> None:
        unknown = [c for c in self.family_components if c not in FAMILY_COMPONENTS]
        if unknown:
            raise ValueError(f"unknown family component(s) {unknown}; choose from {list(FAMILY_COMPONENTS)}")


class ReportConfig(_Section):
    """How reports look."""

    top_families: int = Field(10, ge=1, le=1000)
    max_rows: int = Field(50, ge=0, description="client rows in the human table (0 = all)")
    show_ips: bool = False


class Config(_Section):
    """The whole configuration."""

    database_url: str | None = None
    profile: str = "authlib"
    tables: dict[str, str] = Field(default_factory=dict, description="rename a profile's tables")
    options: dict[str, Any] = Field(default_factory=dict, description="profile options, e.g. refresh_lifetime")
    classify: ClassifyConfig = ClassifyConfig()
    report: ReportConfig = ReportConfig()


def _format_errors(exc: ValidationError, source: str) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{source}: unknown key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: {key}: {msg}")
    return problems


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """DCR_REAPER_DATABASE_URL, DCR_REAPER_PROFILE, DCR_REAPER_CLASSIFY__YOUNG_FOR=2h ..."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file or raise ConfigError naming the file and line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file not readable: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None


def find_config_file(explicit: str | None, environ: dict[str, str]) -> Path | None:
    """The file named by --config or DCR_REAPER_CONFIG (must exist), else the first default that exists."""
    named = explicit or environ.get(ENV_PREFIX + "CONFIG")
    if named:
        return Path(named)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the Config from file, environment and flag overrides; every problem listed with its key."""
    environ = dict(os.environ if environ is None else environ)
    config_file = find_config_file(path, environ)
    data: dict[str, Any] = read_toml(config_file) if config_file else {}
    source = str(config_file) if config_file else "config"
    data = _merge(data, _env_overrides(environ))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
