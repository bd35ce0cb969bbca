"""Settings that would have crashed, looped or injected: each is refused with its key (exit 2), or ignored when it
is not ours."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from kit.cli import assert_errors, clean_env, run_cli
from kit.config import make_config
from kit.schemas.authlib import create_schema as create_authlib
from kit.schemas.mcp_memory import create_mcp_schema, insert_client
from reaper.analysis.fingerprint import ip_prefix
from reaper.commands import plan, report
from reaper.config import load_config
from reaper.errors import ConfigError
from reaper.output.text import clean

REPO = Path(__file__).resolve().parents[1]
SERVICE_LINKS = {  # what Kubernetes injects for a Service named dcr-reaper in the pod's namespace
    "DCR_REAPER_PORT": "tcp://10.96.0.12:9465",
    "DCR_REAPER_PORT_9465_TCP": "tcp://10.96.0.12:9465",
    "DCR_REAPER_PORT_9465_TCP_PROTO": "tcp",
    "DCR_REAPER_PORT_9465_TCP_PORT": "9465",
    "DCR_REAPER_PORT_9465_TCP_ADDR": "10.96.0.12",
    "DCR_REAPER_SERVICE_HOST": "10.96.0.12",
    "DCR_REAPER_SERVICE_PORT": "9465",
    "DCR_REAPER_SERVICE_PORT_METRICS": "9465",
}


def test_kubernetes_service_link_variables_are_not_settings():
    config = load_config(None, {}, environ={**SERVICE_LINKS, "DCR_REAPER_SERVICE__PORT": "9500"})
    assert config.service.port == 9500  # ours still apply
    with pytest.raises(ConfigError, match="unknown key 'profille'"):
        load_config(None, {}, environ={"DCR_REAPER_PROFILLE": "authlib"})  # a typo is still an error


def test_a_pod_with_service_links_starts(tmp_path):
    db = tmp_path / "oauth.db"
    create_mcp_schema(sa.create_engine(f"sqlite:///{db}"), "sqlite")
    env = {**SERVICE_LINKS}
    res = run_cli(
        ["check", "--profile", "mcp-memory-service", "--database-url", str(db)], tmp_path, env=clean_env(**env)
    )
    assert res.returncode in (0, 7) and res.stdout.startswith("ok:"), res.stderr  # 7: matches, with warnings


def test_the_manifests_turn_service_links_off():
    for path in sorted((REPO / "deploy" / "kubernetes").glob("deployment-*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Deployment"]
        assert docs, path
        for doc in docs:
            assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False, path


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"policy": {"min_age": float("nan")}}, "policy.min_age"),
        ({"policy": {"min_age": float("inf")}}, "policy.min_age"),
        ({"policy": {"pause": -1}}, "policy.pause"),
        ({"classify": {"young_for": "soon"}}, "classify.young_for"),
        ({"service": {"scan_cron": "every ten minutes"}}, "service.scan_cron"),
        ({"service": {"bind_address": "0.0.0.0; rm -rf /"}}, "service.bind_address"),
        ({"service": {"full_scan_every": 0}}, "service.full_scan_every"),
        ({"service": {"state_max_rss_mb": 0}}, "service.state_max_rss_mb"),
        ({"service": {"state_max_rss_mb": float("inf")}}, "service.state_max_rss_mb"),
        ({"service": {"state_max_rss_mb": "lots"}}, "service.state_max_rss_mb"),
        ({"scan": {"max_rows_per_second": 10}}, "scan.max_rows_per_second"),
        ({"policy": {"batches_in_flight": 0}}, "policy.batches_in_flight"),
        ({"policy": {"batches_in_flight": 9}}, "policy.batches_in_flight"),
        ({"ledger": {"schema": 'a"; DROP TABLE victim; COMMIT; CREATE SCHEMA "b'}}, "ledger.schema"),
        ({"ledger": {"prefix": "x; DROP TABLE victim"}}, "ledger.prefix"),
        ({"tables": {"oauth2_client": 'client"; DROP TABLE victim; --'}}, "tables.oauth2_client"),
    ],
)
def test_every_bad_setting_is_refused_with_its_key(setting, key):
    with pytest.raises(ConfigError) as err:
        from reaper.profiles import bind_profile

        bind_profile(load_config(None, setting, environ={}))
    assert any(key in p for p in err.value.problems), err.value.problems


def _victim(url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    create_authlib(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE victim (id integer)"))
    return engine


HOSTILE_NAMES = [
    'victim"; DROP TABLE victim; --',
    "victim; DROP TABLE victim",
    "x' OR '1'='1",
    "a.b.c",
    "tab\tle",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_no_identifier_from_config_reaches_sql_unquoted(db, tmp_path, name):
    """Every config key and profile key that names a schema, table, column or prefix, fed hostile values: refused
    (exit 2 before anything connects) and the victim table stays."""
    engine = _victim(db.url)
    profile = (REPO / "reaper" / "profiles" / "builtin" / "authlib.toml").read_text(encoding="utf-8")
    custom_table = tmp_path / "table.toml"
    custom_table.write_text(profile.replace('table = "oauth2_token"', f"table = {json.dumps(name)}"), "utf-8")
    custom_column = tmp_path / "column.toml"
    custom_column.write_text(profile.replace('ref = "client_id"', f"ref = {json.dumps(name)}", 1), "utf-8")
    attempts = [
        {"tables": {"oauth2_client": name}},
        {"ledger": {"schema": name}},
        {"ledger": {"prefix": name}},
        {"profile": str(custom_table)},
        {"profile": str(custom_column)},
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError):
            extra = {k: v for k, v in attempt.items() if k != "profile"}
            plan(make_config(db.url, profile=attempt.get("profile", "authlib"), **extra))
    with engine.connect() as conn:
        assert sa.inspect(conn).has_table("victim")
    engine.dispose()


def test_the_ledger_schema_payload_is_refused_at_the_command_line(pg_db, tmp_path):
    engine = _victim(pg_db.url)
    res = run_cli(
        ["reap", "--apply", "--profile", "authlib", "--database-url", pg_db.url, "--no-progress"],
        tmp_path,
        env=clean_env(DCR_REAPER_LEDGER__SCHEMA='a"; DROP TABLE victim; COMMIT; CREATE SCHEMA "b'),
    )
    [line] = assert_errors(res, 2)
    assert line.startswith("DCR_REAPER_LEDGER__SCHEMA: ledger.schema:")
    with engine.connect() as conn:
        assert sa.inspect(conn).has_table("victim") and sa.inspect(conn).has_table("oauth2_client")
    engine.dispose()


def test_ipv4_mapped_addresses_use_the_ipv4_prefix():
    assert ip_prefix("::ffff:203.0.113.7") == "203.0.113.0/24"
    assert ip_prefix("::ffff:198.51.100.9") == "198.51.100.0/24"
    assert ip_prefix("2001:db8:aa:bb::1") == "2001:db8:aa::/56"


@pytest.mark.parametrize(
    ("text", "limit"), [("\x1b" * 30, 60), ("ab\x1b" * 20, 10), ("é\u202e" * 40, 7), ("y" * 61, 60)]
)
def test_the_truncation_marker_counts_what_was_left_out(text, limit):
    shown = clean(text, limit)
    assert len(shown) <= limit + 8
    kept, _, rest = shown.rpartition("…(+")
    left_out = int(rest.rstrip(")"))
    assert left_out > 0
    assert clean(text[: len(text) - left_out], None) == kept  # exactly the characters before the cut


def test_text_in_an_epoch_column_is_a_problem_row_not_a_plan(tmp_path):
    path = tmp_path / "oauth.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    create_mcp_schema(engine, "sqlite")
    with engine.begin() as conn:
        insert_client(conn, "ok", "App", '["http://localhost:1/cb"]', time.time() - 9 * 86400)
    engine.dispose()
    raw = sqlite3.connect(path)
    raw.execute(
        "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, created_at) "
        "VALUES ('iso', 'Other App', '[\"http://localhost:2/other\"]', '2024-01-01T00:00:00')"
    )
    raw.commit()
    raw.close()
    config = make_config(f"sqlite:///{path}", profile="mcp-memory-service")
    snap = report(config)
    assert [cid for cid, _ in snap.problems] == ["iso"] and "epoch column" in snap.problems[0][1]
    assert [c.client_id for c in plan(config).candidates] == ["ok"]


def test_a_busy_port_is_a_configuration_error(tmp_path):
    db = tmp_path / "oauth.db"
    create_mcp_schema(sa.create_engine(f"sqlite:///{db}"), "sqlite")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["serve", "--profile", "mcp-memory-service", "--database-url", str(db), "--bind", "127.0.0.1"]
        res = run_cli([*args, "--port", str(port)], tmp_path, timeout=60)
    [line] = assert_errors(res, 2)
    assert line.startswith("service.bind_address / service.port: cannot listen on 127.0.0.1:") and str(port) in line
