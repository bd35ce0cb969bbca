"""Every built-in profile: listed, printed, valid, documented, and checked against an empty database (where
`check` must list every table it needs, not only the first). Also the format's name resolution."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa

from kit.cli import REPO, run_cli
from kit.config import make_config
from reaper.db import check_schema
from reaper.errors import ConfigError
from reaper.profiles import bind_profile, builtin_profiles, load_profile, parse_profile
from reaper.profiles import profile_reads as profile_columns
from reaper.profiles.names import snake_case

BUILTINS = sorted(builtin_profiles())
DOCS = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")


def test_the_builtins_are_the_servers_people_run():
    assert set(BUILTINS) >= {
        "authlib",
        "mcp-memory-service",
        "django-oauth-toolkit",
        "ory-hydra",
        "spring-authorization-server",
        "doorkeeper",
        "better-auth",
        "better-auth-legacy",
        "keycloak",
    }


@pytest.mark.slow
def test_profiles_lists_every_builtin_and_show_prints_each(tmp_path: Path):
    listing = run_cli(["profiles"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()] == BUILTINS
    for name in BUILTINS:
        shown = run_cli(["profiles", "show", name], tmp_path)
        assert shown.returncode == 0, shown.stderr
        data = tomllib.loads(shown.stdout)
        assert parse_profile(data, name) == load_profile(name), f"{name}: show prints the whole profile"


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_binds_and_is_documented(name: str):
    profile = load_profile(name)
    assert profile.name == name and profile.description and profile.notes
    assert f"| `{name}` |" in DOCS, f"{name} is missing from the table in docs/profiles.md"
    assert f"### {name}" in DOCS or f"/ {name}" in DOCS, f"{name} has no traps section in docs/profiles.md"
    bound = bind_profile(make_config("sqlite:////nonexistent.db", profile=name))
    assert profile_columns(bound.profile), name


def test_tables_in_a_schema_that_does_not_exist_are_not_found(any_db):
    """An unknown schema (a database, on MySQL/MariaDB; an attached file, on SQLite) is a finding, not an error."""
    tables = {t: f"nosuch.{t}" for t in ("oauth2_client", "oauth2_token", "oauth2_code")}
    bound = bind_profile(make_config(any_db.url, tables=tables))
    assert check_schema(any_db.engine, bound) == [
        f"table 'nosuch.{t}' not found (profile 'authlib')" for t in ("oauth2_client", "oauth2_code", "oauth2_token")
    ]


@pytest.mark.parametrize("name", [n for n in BUILTINS if "postgresql" in load_profile(n).database])
def test_check_lists_every_missing_table_on_an_empty_database(pg_db, name: str):
    bound = bind_profile(make_config(pg_db.url, profile=name))
    optional = {c.table for c in bound.profile.credentials if c.optional}  # skipped where missing
    tables = sorted(set(profile_columns(bound.profile)) - optional)
    assert check_schema(pg_db.engine, bound) == [f"table '{t}' not found (profile '{name}')" for t in tables]


def test_keycloak_reads_every_table_it_joins():
    bound = bind_profile(make_config("sqlite:////x.db", profile="keycloak"))
    cols = profile_columns(bound.profile)
    assert set(cols) == {
        "client",
        "redirect_uris",
        "offline_client_session",
        "offline_user_session",
        "user_consent",
        "event_entity",
        "realm",
    }
    assert cols["offline_user_session"] == {"user_session_id", "offline_flag", "last_session_refresh"}
    assert cols["event_entity"] == {"client_id", "realm_id", "event_time", "ip_address", "type"}
    assert cols["realm"] == {"id", "name"}


def test_snake_case_follows_drizzle():
    assert [
        snake_case(n)
        for n in (
            "oauthClient",
            "clientId",
            "redirectURLs",
            "userId",
            "id",
            "clientDiscoveryId",
            "public.oauthConsent",
        )
    ] == [
        "oauth_client",
        "client_id",
        "redirect_ur_ls",
        "user_id",
        "id",
        "client_discovery_id",
        "public.oauth_consent",
    ]


def test_naming_and_renames_are_baked_into_the_bound_profile():
    bound = bind_profile(
        make_config(
            "sqlite:////x.db",
            profile="better-auth",
            options={"naming": "snake_case"},
            tables={"oauthConsent": "consents"},
        )
    )
    assert bound.client.table == "oauth_client" and bound.client.key == "client_id"
    assert [c.table for c in bound.credentials] == [
        "oauth_refresh_token",
        "oauth_access_token",
        "consents",
        "oauth_client_resource",
    ]
    assert bound.profile.delete.disable_set == {"disabled": True}
    assert bound.profile.credential("consent").table == "consents"
    with pytest.raises(ConfigError, match="options.naming: expected one of as_is, snake_case"):
        bind_profile(make_config("sqlite:////x.db", profile="better-auth", options={"naming": "kebab"}))


def test_format_errors_name_the_key():
    base = {"name": "x", "client": {"table": "c", "key": "id", "client_id": "id"}}
    with pytest.raises(ConfigError, match="equals_client only applies to credential conditions"):
        parse_profile(
            {
                **base,
                "client": {
                    **base["client"],
                    "dynamic": {"equals_client": {"column": "a", "client_column": "b"}},
                },
            },
            "x.toml",
        )
    with pytest.raises(ConfigError, match="exactly one of 'column', 'rows' or 'lookup'"):
        parse_profile({**base, "client": {**base["client"], "name": {}}}, "x.toml")
    with pytest.raises(ConfigError, match="exists needs at least one 'on' column pair"):
        parse_profile(
            {
                **base,
                "credentials": [{"name": "t", "table": "t", "ref": "c", "live": {"exists": {"table": "u", "on": {}}}}],
            },
            "x.toml",
        )
    with pytest.raises(ConfigError, match="credential names must be unique"):
        parse_profile({**base, "credentials": [{"name": "t", "table": "t", "ref": "c"}] * 2}, "x.toml")


@pytest.mark.slow
def test_dcr_reaper_check_command_on_a_new_profile(mariadb_db, tmp_path: Path):
    from kit.schemas.hydra import Hydra

    Hydra(mariadb_db.engine)
    args = ["check", "--profile", "ory-hydra", "--database-url", mariadb_db.url]
    ok = run_cli(args, tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: profile 'ory-hydra' matches"), ok.stderr
    with mariadb_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE hydra_oauth2_code CHANGE COLUMN expires_at expires DATETIME NULL"))
        conn.execute(sa.text("ALTER TABLE hydra_client CHANGE COLUMN client_name name TEXT"))
    bad = run_cli(args, tmp_path)
    assert bad.returncode == 3, bad.stderr
    assert bad.stderr.splitlines() == [
        "dcr-reaper: error: column 'hydra_client.client_name' not found",
        "dcr-reaper: error: column 'hydra_oauth2_code.expires_at' not found",
    ]


def test_authlib_check_lists_a_renamed_column(sqlite_db):
    from kit.schemas.authlib import AuthlibDB

    AuthlibDB(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE oauth2_token RENAME COLUMN expires_in TO lifetime"))
    bound = bind_profile(make_config(sqlite_db.url))
    assert check_schema(sqlite_db.engine, bound) == ["column 'oauth2_token.expires_in' not found"]
