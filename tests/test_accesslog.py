"""Registrant IPs from a reverse proxy's access log: the matching rule, the three log formats, and the scan
fedby `[ip] access_log` (families split by network, IPs aggregated to the configured prefix)."""

from __future__ import annotations

import gzip
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kit.schemas.mcp_memory import create_mcp_schema, insert_client
from reaper.analysis.accesslog import Match, Request, annotate, match_registrations, parse_line, read_logs
from reaper.analysis.model import ClientRow, Verdict
from reaper.commands import classified
from reaper.config import load_config
from reaper.errors import ConfigError

T0 = 1_760_000_000.0


def reqs(*items: tuple[float, str]) -> list[Request]:
    return sorted((Request(T0 + at, ip) for at, ip in items), key=lambda r: r.at)


def test_exact_match_within_the_window():
    got = match_registrations([("a", T0 + 0.4), ("b", T0 + 60)], reqs((0, "203.0.113.7"), (61.5, "198.51.100.2")), 2)
    assert got == {"a": Match("matched", "203.0.113.7"), "b": Match("matched", "198.51.100.2")}


def test_missing_when_no_request_in_the_window():
    got = match_registrations([("a", T0), ("b", None)], reqs((2.5, "203.0.113.7"), (-2.01, "203.0.113.8")), 2)
    assert got == {"a": Match("missing"), "b": Match("missing")}


def test_two_registrations_in_one_window_get_no_guess():
    # One request near two registrations: which one it made is a guess, so neither gets it ...
    got = match_registrations([("a", T0), ("b", T0 + 1.5)], reqs((0.8, "203.0.113.7")), 2)
    assert got == {"a": Match("ambiguous"), "b": Match("ambiguous")}
    # ... and so are two requests near one registration, even a third registration far away is fine.
    got = match_registrations(
        [("a", T0), ("c", T0 + 100)], reqs((-1, "203.0.113.7"), (1, "192.0.2.1"), (100, "192.0.2.9")), 2
    )
    assert got == {"a": Match("ambiguous"), "c": Match("matched", "192.0.2.9")}


def test_ipv6_addresses_match_and_a_window_is_explicit():
    got = match_registrations([("a", T0)], reqs((1.9, "2001:db8:0:1::42")), 2)
    assert got == {"a": Match("matched", "2001:db8:0:1::42")}
    assert match_registrations([("a", T0)], reqs((1.9, "2001:db8::1")), 1) == {"a": Match("missing")}


def _clf(at: float, ip: str, method: str = "POST", path: str = "/register", status: int = 201) -> str:
    stamp = datetime.fromtimestamp(at, UTC).astimezone().strftime("%d/%b/%Y:%H:%M:%S %z")
    return f'{ip} - - [{stamp}] "{method} {path} HTTP/1.1" {status} 512 "-" "claude-code/2.1"'


def test_nginx_combined_json_and_caddy_lines():
    assert parse_line(_clf(T0, "203.0.113.7", path="/register?x=1")) == (
        "POST",
        "/register",
        201,
        T0,
        "203.0.113.7",
    )
    nginx_json = json.dumps(
        {
            "time_iso8601": "2025-10-09T08:53:20+00:00",
            "remote_addr": "2001:db8::7",
            "request": "POST /oauth/register HTTP/2.0",
            "status": "201",
        }
    )
    assert parse_line(nginx_json) == (
        "POST",
        "/oauth/register",
        201,
        datetime(2025, 10, 9, 8, 53, 20, tzinfo=UTC).timestamp(),
        "2001:db8::7",
    )
    caddy = json.dumps(
        {
            "level": "info",
            "ts": T0 + 0.25,
            "logger": "http.log.access",
            "msg": "handled request",
            "request": {
                "remote_ip": "10.0.0.2",
                "client_ip": "203.0.113.9",
                "method": "POST",
                "uri": "/register/",
            },
            "status": 201,
        }
    )
    assert parse_line(caddy) == ("POST", "/register", 201, T0 + 0.25, "203.0.113.9")
    assert parse_line("garbage") is None and parse_line("{not json") is None
    # A time without a zone would be a guess: the line is not used.
    assert (
        parse_line(
            json.dumps(
                {
                    "time_iso8601": "2025-10-09T08:53:20",
                    "remote_addr": "203.0.113.1",
                    "request": "POST /register HTTP/1.1",
                    "status": 201,
                }
            )
        )
        is None
    )


def test_read_logs_keeps_successful_registration_posts_only(tmp_path: Path):
    plain = tmp_path / "access.log"
    plain.write_text(
        "\n".join(
            [
                _clf(T0, "203.0.113.7"),
                _clf(T0 + 1, "203.0.113.8", method="GET"),
                _clf(T0 + 2, "203.0.113.9", status=400),
                _clf(T0 + 3, "203.0.113.10", path="/token"),
                "not a log line",
            ]
        )
        + "\n"
    )
    with gzip.open(tmp_path / "access.log.1.gz", "wt") as fh:
        fh.write(_clf(T0 - 100, "198.51.100.1") + "\n")
    got = read_logs([str(tmp_path / "access.log*")], "/register")
    assert got == [Request(T0 - 100, "198.51.100.1"), Request(T0, "203.0.113.7")]


def test_annotate_takes_rows_in_any_order_and_keeps_profile_ips():
    rows = [
        ClientRow("k1", "c1", T0),
        ClientRow("k3", "c3", T0 + 30),
        ClientRow("kn", "cn", None),
        ClientRow("k0", "c0", T0 - 50, ip="192.0.2.200"),
        ClientRow("k2", "c2", T0 + 1),
    ]
    times = sorted(r.created_at for r in rows if r.created_at is not None)
    requests = reqs((30.2, "203.0.113.3"), (0.5, "203.0.113.1"), (-50, "192.0.2.1"))
    out = list(annotate(iter(rows), requests, times, 2))
    assert [r.key for r in out] == ["k1", "k3", "kn", "k0", "k2"]  # streamed, in the order they came
    # k3: one request, near no other registration. k1 and k2: one request between two registrations 1 s apart
    # (ambiguous). k0 keeps the IP its row holds; kn has no time.
    assert {r.key: r.ip for r in out} == {"k1": None, "k3": "203.0.113.3", "kn": None, "k0": "192.0.2.200", "k2": None}


def test_the_scan_takes_ips_from_the_log_and_families_split_by_network(sqlite_db, tmp_path: Path):
    create_mcp_schema(sqlite_db.engine, "sqlite")
    now = time.time()
    lines = []
    with sqlite_db.engine.begin() as conn:
        for i, (age, ip) in enumerate(
            [
                (5 * 86400, "203.0.113.7"),
                (4 * 86400, "203.0.113.99"),
                (3 * 86400, "198.51.100.4"),
                (2 * 86400, "2001:db8:aa:bb::1"),
            ]
        ):
            created = now - age
            insert_client(conn, f"c{i}", "Claude Code (memory)", '["http://localhost:5000/callback"]', created)
            lines.append(_clf(created + 0.3, ip))
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    config = load_config(
        None,
        {
            "database_url": sqlite_db.url,
            "profile": "mcp-memory-service",
            "ip": {"access_log": str(log), "window": "2s"},
            "classify": {"ip_prefix_v4": 16, "ip_prefix_v6": 48},
        },
        environ={},
    )
    with classified(config) as (stream, _):
        got = {i.row.client_id: i for i in stream}
    assert {c: (i.row.ip, i.row.ip_network) for c, i in got.items()} == {
        "c0": ("203.0.113.7", "203.0.0.0/16"),
        "c1": ("203.0.113.99", "203.0.0.0/16"),
        "c2": ("198.51.100.4", "198.51.0.0/16"),
        "c3": ("2001:db8:aa:bb::1", "2001:db8:aa::/48"),
    }
    # Same software and redirect, different networks: three families; the two from 203.0/16 are one.
    assert got["c0"].family == got["c1"].family
    assert len({got[c].family for c in got}) == 3
    assert {i.verdict for i in got.values()} == {Verdict.ABANDONED}


def test_an_unreadable_log_path_is_an_error_not_a_guess(sqlite_db, tmp_path: Path):
    create_mcp_schema(sqlite_db.engine, "sqlite")
    config = load_config(
        None,
        {
            "database_url": sqlite_db.url,
            "profile": "mcp-memory-service",
            "ip": {"access_log": str(tmp_path / "missing.log")},
        },
        environ={},
    )
    with pytest.raises(ConfigError, match="missing.log"):
        with classified(config) as (stream, _):
            list(stream)


def test_ip_settings_are_validated():
    with pytest.raises(ConfigError, match="ip.window"):
        load_config(None, {"ip": {"window": "soon"}}, environ={})
    with pytest.raises(ConfigError, match="ip.format"):
        load_config(None, {"ip": {"format": "apache"}}, environ={})
