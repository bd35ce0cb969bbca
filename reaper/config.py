"""Configuration: TOML file, then DCR_REAPER_* environment, then CLI flags; validated up front."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

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
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
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
    clock_skew: Duration = Field(
        300.0, description="timestamps this far in the future are tolerated; a larger clock skew stops any action"
    )
    stale_after: Duration | None = Field(
        None,
        description="off by default: a member live only through credentials that never expire, with no credential "
        "activity for this long and a newer sibling, counts as superseded (orphan, reason stale)",
    )
    family_components: tuple[str, ...] = Field(FAMILY_COMPONENTS, description="what a family fingerprint uses")
    allow_client_ids: tuple[str, ...] = Field((), description="client_ids that are always protected")
    allow_names: tuple[str, ...] = Field((), description="glob patterns of client names always protected")
    ip_prefix_v4: int = Field(24, ge=8, le=32, description="IPv4 registrant addresses aggregate to this prefix")
    ip_prefix_v6: int = Field(56, ge=16, le=128, description="IPv6 registrant addresses aggregate to this prefix")

    def model_post_init(self, __context: Any) -> None:
        unknown = [c for c in self.family_components if c not in FAMILY_COMPONENTS]
        if unknown:
            raise ValueError(f"unknown family component(s) {unknown}; choose from {list(FAMILY_COMPONENTS)}")


class ScanConfig(_Section):
    """How the scan query runs on the database."""

    work_mem_mb: int = Field(64, ge=1, le=4096, description="PostgreSQL work_mem for the scan transaction")
    batch_size: int = Field(5000, ge=100, le=100000, description="rows fetched per round trip")
    statement_timeout: Duration = Field(
        300.0,
        gt=0,
        description="the database cancels a scan statement running longer (PostgreSQL: the query's first rows and "
        "each later fetch; MySQL/MariaDB: the streamed query as a whole); the reaper waits this plus "
        "database.read_timeout for an answer, then drops the connection",
    )
    max_rows_per_second: int | None = Field(
        None,
        ge=1000,
        description="read at most this many client rows a second (off by default): a longer scan that leaves the "
        "auth server's database more of its CPU (docs/performance.md)",
    )


class ReportConfig(_Section):
    """How reports look."""

    top_families: int = Field(10, ge=1, le=1000)
    max_rows: int = Field(50, ge=0, description="client rows in the human table (0 = all)")
    show_ips: bool = False


Action = Literal["delete", "disable", "merge"]
ReapVerdict = Literal["orphan", "abandoned", "idle"]


class PolicyConfig(_Section):
    """What a reap may act on, how, and how much at most."""

    verdicts: tuple[ReapVerdict, ...] = Field(("orphan", "abandoned"), description="verdicts to act on")
    actions: dict[ReapVerdict, Action] = Field(
        default_factory=lambda: {"orphan": "delete", "abandoned": "delete", "idle": "disable"},  # type: ignore[arg-type]
        description="action per verdict",
    )
    min_age: Duration = Field(86400.0, description="never act on a client younger than this")
    max_per_run: int = Field(
        1000, ge=1, description="a run acts on the oldest this many reapable clients; the rest is the backlog (S4)"
    )
    max_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the circuit breaker: a run stops when it would act on more than this share of the clients "
        "active within policy.active_window (a profile reading live clients as dead)",
    )
    active_window: Duration = Field(3600.0, description="a client with a credential issued this recently is active")
    breaker_min: int = Field(5, ge=1, description="the breaker stays quiet below this many active clients planned")
    batch_size: int = Field(2000, ge=1, le=10000, description="clients per short transaction (docs/performance.md)")
    pause: Duration = Field(0.01, description="sleep between batches, to let the auth server breathe")
    batches_in_flight: int = Field(
        2,
        ge=1,
        le=8,
        description="batches acted on at once, each its own transaction, where the database allows it "
        "(PostgreSQL; one elsewhere): docs/performance.md",
    )
    lock_timeout: Duration = Field(2.0, description="give up on a row lock after this (S7)")
    statement_timeout: Duration = Field(30.0, description="abort a statement running longer (S7)")
    late_token_sweep: Duration = Field(2.0, description="re-check reaped clients for late tokens after this")


class LoopsConfig(_Section):
    """Re-auth loop and registration flood detection (docs/loops.md)."""

    enabled: bool = Field(True, description="look for re-auth loops and registration floods on every scan")
    window: Duration = Field(900.0, description="a refresh revoked, then a new family registration within this")
    lookback: Duration = Field(604800.0, description="only registrations this recent are examined")
    min_cycles: int = Field(2, ge=1, description="revoke-then-re-register cycles before a family is a loop")
    flood_registrations: int = Field(20, ge=2, description="this many never-used registrations ...")
    flood_window: Duration = Field(60.0, description="... within this many seconds make a flood")
    max_evidence: int = Field(50, ge=1, le=10000, description="evidence rows kept per family or flood")


class DatabaseConfig(_Section):
    """Every connection to a SQL database: how long to wait for it, and how a silent network is noticed (S10)."""

    connect_timeout: Duration = Field(10.0, gt=0, description="connecting and logging in")
    read_timeout: Duration = Field(
        30.0,
        gt=0,
        description="the longest wait for one answer (a statement, a fetch, a commit) outside a scan's own; then "
        "the connection is dropped",
    )
    keepalive_idle: Duration = Field(15.0, ge=1, description="TCP keepalives, at both ends: first probe after this")
    keepalive_interval: Duration = Field(5.0, ge=1, description="... then one probe this often")
    keepalive_count: int = Field(3, ge=1, le=127, description="... and the connection is dropped after this many")
    user_timeout: Duration = Field(
        30.0, ge=1, description="TCP_USER_TIMEOUT, at both ends: data unacknowledged this long drops the connection"
    )
    stranded_after: Duration = Field(
        30.0,
        ge=3,
        description="the database ends a reaper session silent this long that holds the run lock, or a reap "
        "batch's transaction: a vanished holder's lock is free after it; the holder checks in every third of it",
    )
    sqlite_lock_dir: str | None = Field(
        None,
        description="SQLite: the directory of the run lock file (default: beside the database file); every "
        "reaper of one database must use the same",
    )


class LedgerConfig(_Section):
    """Where the reaper keeps runs, tombstones and aliases."""

    url: str | None = Field(None, description="a separate database; default: the auth database itself")
    schema_: str | None = Field(
        None, alias="schema", description="database schema for the ledger tables (a plain identifier)"
    )
    prefix: str = Field("dcr_reaper_", description="prefix of the ledger's table names (a plain identifier)")

    @field_validator("schema_", "prefix")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,30}", value):
            raise ValueError(f"{value!r} is not a plain identifier (letters, digits and _, at most 31)")
        return value

    key: SecretStr | None = Field(
        None,
        description="Fernet key(s) that seal tombstone payloads (env DCR_REAPER_LEDGER__KEY); several, comma-"
        "separated: the first seals, all open (key rotation). Restore needs it",
    )
    key_file: str | None = Field(None, description="a file holding the key(s), one a line")

    def model_post_init(self, __context: Any) -> None:
        if self.key is not None and self.key_file is not None:
            raise ValueError("give key or key_file, not both")


class ServiceConfig(_Section):
    """`dcr-reaper serve`: schedule, HTTP endpoints, shutdown."""

    bind_address: str = Field("0.0.0.0", description="an IPv4 or IPv6 address, or a host name")
    port: int = Field(9465, ge=0, le=65535)
    scan_interval: Duration = Field(300.0, description="scan this often (ignored when scan_cron is set)")
    scan_cron: str | None = Field(None, description="crontab expression, e.g. '*/10 * * * *'")
    reap: bool = Field(False, description="reap after each scan (off by default)")
    full_scan_every: int = Field(
        12,
        ge=1,
        description="every Nth tick scans fully; the others read only what changed, where the profile can tell "
        "(1 = every tick scans fully)",
    )
    state_max_rss_mb: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="keep the state incremental ticks need only while this process's resident memory stays under "
        "this many MB (default: 80 % of the container's or systemd unit's memory limit; none without one)",
    )
    grace: Duration = Field(30.0, description="on SIGTERM, wait this long for the current batch")
    ready_max_age: Duration | None = Field(
        None, description="last success older than this -> not ready (default: 3 scan intervals)"
    )
    top_families: int = Field(20, ge=0, le=200, description="families named in metrics; the rest are 'other'")
    database_timeout: Duration = Field(
        5.0, gt=0, description="the readiness check's bound on connecting and on its one round trip"
    )

    @field_validator("scan_cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronTrigger.from_crontab(value, timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"not a crontab expression ({exc})") from None
        return value

    @field_validator("bind_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", value):
                raise ValueError(f"not an IP address or host name: {value!r}") from None
        return value


class IpConfig(_Section):
    """Where registrant IPs come from besides the profile: a reverse proxy's access log."""

    access_log: tuple[str, ...] = Field((), description="access log files or globs (.gz read too)")
    format: Literal["auto", "nginx", "json", "caddy"] = Field("auto", description="log line format")
    registration_path: str = Field("/register", description="the DCR endpoint's path (query ignored)")
    window: Duration = Field(2.0, description="a registration matches requests within this many seconds")

    @field_validator("access_log", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class KeycloakConfig(_Section):
    """The Keycloak Admin REST API, for profiles that act through it (never through SQL)."""

    url: str | None = Field(None, description="Keycloak's base URL, e.g. https://sso.example.com")
    client_id: str | None = Field(None, description="a service-account client allowed to manage clients")
    client_secret: SecretStr | None = Field(None, description="its secret (env DCR_REAPER_KEYCLOAK__CLIENT_SECRET)")
    token_realm: str | None = Field(None, description="realm of that client (default: the profile's realm)")
    timeout: Duration = Field(10.0, description="per HTTP request")
    ca_file: str | None = Field(None, description="CA bundle for a private TLS certificate")


class FastMcpConfig(_Section):
    """FastMCP OAuthProxy's key material, to read its encrypted store (the `fastmcp-oauth-proxy` profile).

    Give what the server was given: its `jwt_signing_key` (a string), or, when it has none, its upstream client
    secret; or the Fernet key of the store itself. Each from the file named, or the environment
    (DCR_REAPER_FASTMCP__JWT_SIGNING_KEY ...). Never logged, never printed.
    """

    jwt_signing_key: SecretStr | None = Field(None, description="OAuthProxy(jwt_signing_key=...), a string")
    jwt_signing_key_file: str | None = Field(None, description="a file holding it (trailing newline ignored)")
    upstream_client_secret: SecretStr | None = Field(None, description="when the server has no jwt_signing_key")
    upstream_client_secret_file: str | None = Field(None, description="a file holding it")
    storage_key: SecretStr | None = Field(
        None, description="the store's Fernet key as is (a Redis store wrapped in FernetEncryptionWrapper)"
    )
    storage_key_file: str | None = Field(None, description="a file holding it")

    def model_post_init(self, __context: Any) -> None:
        given = [
            name
            for name in ("jwt_signing_key", "upstream_client_secret", "storage_key")
            if getattr(self, name) is not None or getattr(self, f"{name}_file") is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one key source, not {' and '.join(given)}")
        for name in ("jwt_signing_key", "upstream_client_secret", "storage_key"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"give {name} or {name}_file, not both")


class Config(_Section):
    """The whole configuration."""

    database_url: str | None = Field(
        None,
        description="the auth server's store (its primary): scanned unless scan_database_url is set; every write, "
        "the reap's re-check, the run lock and the ledger (when ledger.url is unset) go here",
    )
    scan_database_url: str | None = Field(
        None,
        description="SQL profiles: a streaming replica of database_url that `report`, `plan` and the scans of "
        "`reap` and `serve` read instead (the reap re-checks and acts on database_url, so replication lag cannot "
        "reap a live client); may name database_url's own server",
    )
    profile: str = "authlib"
    tables: dict[str, str] = Field(default_factory=dict, description="rename a profile's tables")
    options: dict[str, Any] = Field(default_factory=dict, description="profile options, e.g. refresh_lifetime")
    classify: ClassifyConfig = ClassifyConfig()
    scan: ScanConfig = ScanConfig()
    database: DatabaseConfig = DatabaseConfig()
    report: ReportConfig = ReportConfig()
    policy: PolicyConfig = PolicyConfig()
    loops: LoopsConfig = LoopsConfig()
    ledger: LedgerConfig = LedgerConfig()
    service: ServiceConfig = ServiceConfig()
    ip: IpConfig = IpConfig()
    keycloak: KeycloakConfig = KeycloakConfig()
    fastmcp: FastMcpConfig = FastMcpConfig()

    @field_validator("scan_database_url")
    @classmethod
    def _scan_beside_primary(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty: unset it to scan database_url itself")
        if value is not None and not info.data.get("database_url"):
            raise ValueError(
                "needs database_url as well: the primary the reap re-checks and acts on, and where the run lock "
                "and the ledger live"
            )
        return value


def _set_at(layer: dict[str, Any], loc: tuple[Any, ...]) -> tuple[str, ...] | None:
    """The path of the value `layer` sets at or above `loc`, if it sets one."""
    node: Any = layer
    for i, part in enumerate(loc):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
        if not isinstance(node, dict):
            return tuple(str(p) for p in loc[: i + 1])
    return tuple(str(p) for p in loc) if loc else None


def validation_problems(exc: ValidationError, origin: Callable[[tuple[Any, ...]], str]) -> list[str]:
    """One line per pydantic error: where the value came from, its key, what is wrong (the one formatter)."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{origin(err['loc'])}: unknown key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{origin(err['loc'])}: {key}: {msg}")
    return problems


def _format_errors(
    exc: ValidationError, source: str, env: dict[str, Any] | None = None, flags: dict[str, Any] | None = None
) -> list[str]:
    def origin(loc: tuple[Any, ...]) -> str:
        # Name where the bad value came from: a flag, an environment variable, else the file.
        if flags and _set_at(flags, loc):
            return "command line"
        if env and (path := _set_at(env, loc)):
            return ENV_PREFIX + "__".join(path).upper()
        return source

    return validation_problems(exc, origin)


# Kubernetes injects these for a Service named dcr-reaper (service links): <NAME>_PORT=tcp://..., _PORT_<n>_TCP...,
# _SERVICE_HOST, _SERVICE_PORT... They are not settings: ignored, so a pod with service links still starts.
_SERVICE_LINK = re.compile(
    rf"^{ENV_PREFIX}(PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?|SERVICE_(HOST|PORT(_\w+)?))$"
)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """DCR_REAPER_DATABASE_URL, DCR_REAPER_PROFILE, DCR_REAPER_CLASSIFY__YOUNG_FOR=2h ..."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG" or _SERVICE_LINK.match(name):
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
    env = _env_overrides(environ)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = _merge(_merge(data, env), flags)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, env, flags)) from None


def with_overrides(config: Config, changes: dict[str, Any]) -> Config:
    """The config with flag values merged in, validated again (flags name their key on error)."""
    if not any(changes.values()):
        return config
    try:
        return Config.model_validate(_merge(config.model_dump(by_alias=True), changes))
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, lambda _loc: "command line")) from None
