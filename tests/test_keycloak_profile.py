"""The keycloak profile on Keycloak's documented tables, on PostgreSQL and MariaDB (upper-case columns there,
as Keycloak's changelogs make them), and its Admin REST API backend against a local stand-in that follows the
documented contract (tests/kit/schemas/keycloak.py; no Keycloak runs here). The reaper's database user can only
SELECT: any SQL write would fail the test."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from kit.config import make_config
from kit.schemas.keycloak import Keycloak, KeycloakStandIn
from reaper.analysis.model import Verdict
from reaper.backends.keycloak import AdminClient, KeycloakError
from reaper.commands import apply, classified, plan, restore
from reaper.db import check_schema
from reaper.errors import ConfigError
from reaper.ledger import decode_payload
from reaper.profiles import bind_profile

HOUR, DAY = 3600, 86400
PROFILE = "keycloak"


@pytest.fixture
def kc(server_db) -> Keycloak:
    return Keycloak(server_db.engine, upper=server_db.kind == "mariadb")


@pytest.fixture
def select_only_url(server_db) -> Iterator[str]:
    """A URL for a database user that may only SELECT: the reaper must never need more on Keycloak."""
    user = f"kcro_{uuid.uuid4().hex[:8]}"
    url = make_url(server_db.url)
    admin = sa.create_engine(server_db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if server_db.kind == "postgresql":
            for stmt in (
                f"CREATE ROLE {user} LOGIN",
                f"GRANT CONNECT ON DATABASE {url.database} TO {user}",
                f"GRANT USAGE ON SCHEMA public TO {user}",
                f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {user}",
            ):
                conn.execute(sa.text(stmt))
        else:
            conn.execute(sa.text(f"CREATE USER '{user}'@'%'"))
            conn.execute(sa.text(f"GRANT SELECT ON {url.database}.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=None).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if server_db.kind == "postgresql":
                conn.execute(sa.text(f"DROP OWNED BY {user}"))
                conn.execute(sa.text(f"DROP ROLE {user}"))
            else:
                conn.execute(sa.text(f"DROP USER '{user}'@'%'"))
        admin.dispose()


def scan(url: str, realm: str | None = "mcp", **overrides: Any) -> dict[str, Any]:
    options = {"options": {"realm": realm, **overrides.pop("options", {})}} if realm else {}
    with classified(make_config(url, profile=PROFILE, **options, **overrides)) as (stream, _):
        return {i.row.client_id: i for i in stream}


def loop(port: int) -> list[str]:
    return [f"http://localhost:{port}/callback"]


def test_liveness_comes_from_sessions_and_recent_consents(server_db, kc):
    realm = kc.realm("mcp")
    made = {}
    cases = {
        # name: (setup, live)
        "offline-fresh": (lambda c: kc.session(realm, c, offline=True, refreshed_age=5 * DAY), True),
        "offline-stale": (lambda c: kc.session(realm, c, offline=True, refreshed_age=40 * DAY), False),
        "online-fresh": (lambda c: kc.session(realm, c, offline=False, refreshed_age=600), True),
        "online-stale": (lambda c: kc.session(realm, c, offline=False, refreshed_age=2 * HOUR), False),
        "consent-recent": (lambda c: kc.consent(c, updated_age=2 * DAY), True),
        "consent-old": (lambda c: kc.consent(c, updated_age=90 * DAY), False),
    }
    for name, (setup, _) in cases.items():
        pk = kc.client(
            realm, f"cid-{name}", f"app {name}", [f"https://{name}.example.com/cb"], registered_age=100 * DAY
        )
        setup(pk)
        made[name] = f"cid-{name}"
    got = scan(server_db.url)
    assert {n: got[c].verdict is Verdict.LIVE for n, c in made.items()} == {n: v for n, (_, v) in cases.items()}
    assert got["cid-offline-fresh"].reason == "live_session"
    # A stale session or old consent still shows the client was used: idle, not abandoned.
    assert got["cid-consent-old"].verdict is Verdict.IDLE and got["cid-consent-old"].row.total_credentials == 1

    longer = scan(server_db.url, options={"offline_session_idle": "60d", "session_idle": "3h"})
    assert longer["cid-offline-stale"].verdict is Verdict.LIVE and longer["cid-online-stale"].verdict is Verdict.LIVE


def test_age_and_ip_come_from_register_events_else_unknown(server_db, kc):
    realm, other = kc.realm("mcp"), kc.realm("staff")
    kc.client(realm, "with-event", "Claude Code (kc)", loop(50001), registered_age=3 * DAY, ip="203.0.113.77")
    kc.client(realm, "no-event", "Claude Code (kc)", loop(50002))  # event storage was off back then
    kc.client(realm, "account-console", "${client_account-console}", ["/realms/mcp/account/*"], dynamic=False)
    kc.client(other, "with-event", "Other realm's", loop(50003), registered_age=DAY, ip="198.51.100.1")
    # Another realm's event for the same client_id must not date ours.
    kc.event(other, "no-event", "CLIENT_REGISTER", 9 * DAY, "198.51.100.9")

    got = scan(server_db.url, classify={"ip_prefix_v4": 16})
    assert set(got) == {"with-event", "no-event", "account-console"}, "only the configured realm"
    ev = got["with-event"].row
    assert ev.created_at == pytest.approx(kc.now - 3 * DAY, abs=1)
    assert (ev.ip, ev.ip_network) == ("203.0.113.77", "203.0.0.0/16")
    assert (got["with-event"].verdict, got["with-event"].reason) == (Verdict.ABANDONED, "never_used")
    assert (got["no-event"].verdict, got["no-event"].reason) == (Verdict.PROTECTED, "unknown_age")
    assert got["no-event"].row.problems == [] and got["no-event"].row.ip is None
    assert (got["account-console"].verdict, got["account-console"].reason) == (Verdict.PROTECTED, "static")
    assert {i.verdict for i in scan(server_db.url, realm="staff").values()} == {Verdict.ABANDONED}


def test_redirect_uris_are_rows_and_loopback_ports_do_not_split_families(server_db, kc):
    realm = kc.realm("mcp")
    long_uris = [f"https://app.example.com/{'x' * 200}/{i}" for i in range(8)]  # beyond GROUP_CONCAT's 1024 B
    kc.client(realm, "many", "Many URIs", long_uris, registered_age=5 * DAY)
    old = kc.client(realm, "old", "Claude Code (kc)", loop(50010), registered_age=4 * DAY)
    kc.session(realm, old, offline=True, refreshed_age=35 * DAY)
    new = kc.client(realm, "new", "Claude Code (kc)", loop(61234), registered_age=HOUR * 2)
    kc.session(realm, new, offline=True, refreshed_age=60)
    got = scan(server_db.url)
    assert sorted(got["many"].row.redirect_uris) == sorted(long_uris)
    assert got["old"].family == got["new"].family
    assert (got["old"].verdict, got["new"].verdict) == (Verdict.ORPHAN, Verdict.LIVE)


def test_check_passes_and_lists_a_renamed_column(server_db, kc):
    bound = bind_profile(make_config(server_db.url, profile=PROFILE, options={"realm": "mcp"}))
    assert check_schema(server_db.engine, bound) == []
    name = "LAST_SESSION_REFRESH" if server_db.kind == "mariadb" else "last_session_refresh"
    with server_db.engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE offline_user_session RENAME COLUMN {name} TO last_refresh"))
    assert check_schema(server_db.engine, bound) == ["column 'offline_user_session.last_session_refresh' not found"]


def test_reap_apply_and_restore_route_keycloak_to_the_admin_api(server_db, kc, select_only_url, tmp_path):
    """The generic entry points never write Keycloak's tables: with the reaper connected as a SELECT-only user,
    reap.apply and restore.restore go through the Admin REST API."""
    keys = _churn(kc)
    with KeycloakStandIn(kc) as standin:
        config = _config(select_only_url, standin, tmp_path)
        the_plan = plan(config)
        result = apply(config, the_plan)
        assert result.total_acted == 4
        assert [m for m, _ in standin.calls].count("DELETE") == 3
        back = restore(config, run_id=result.run_id)
        assert sorted(back.restored) == sorted(keys[k] for k in ("old0", "old1", "old2", "never"))


def _churn(kc: Keycloak) -> dict[str, str]:
    realm = kc.realm("mcp")
    keys = {}
    for i in range(3):
        keys[f"old{i}"] = kc.client(
            realm,
            f"old{i}",
            "Claude Code (kc)",
            loop(50100 + i),
            registered_age=(6 - i) * DAY,
            ip="203.0.113.5",
        )
        kc.session(realm, keys[f"old{i}"], offline=True, refreshed_age=(36 - i) * DAY)
    # Same /24 as the old ones: the registrant IP is part of the family.
    keys["new"] = kc.client(realm, "new", "Claude Code (kc)", loop(50200), registered_age=2 * HOUR, ip="203.0.113.9")
    kc.session(realm, keys["new"], offline=True, refreshed_age=60)
    keys["never"] = kc.client(realm, "never", "MCP CLI Proxy", loop(50300), registered_age=4 * DAY)
    return keys


def _config(url: str, standin: KeycloakStandIn, tmp_path: Path, **extra: Any) -> Any:
    (tmp_path / "ledger.sqlite").touch()  # a separate ledger database: Keycloak's is never written
    return make_config(
        url,
        profile=PROFILE,
        options={"realm": "mcp"},
        policy={"actions": {"orphan": "delete", "abandoned": "disable"}, **extra.pop("policy", {})},
        keycloak={"url": standin.url, "client_id": standin.client_id, "client_secret": standin.secret},
        ledger={"url": f"sqlite:///{tmp_path / 'ledger.sqlite'}"},
        **extra,
    )


def _ledger(tmp_path: Path) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")


def test_delete_and_disable_go_through_the_admin_api_and_restore(server_db, kc, select_only_url, tmp_path):
    keys = _churn(kc)
    with KeycloakStandIn(kc) as standin:
        config = _config(select_only_url, standin, tmp_path)
        the_plan = plan(config)
        assert {(c.client_id, c.action) for c in the_plan.candidates} == {
            ("old0", "delete"),
            ("old1", "delete"),
            ("old2", "delete"),
            ("never", "disable"),
        }
        result = apply(config, the_plan)
        assert result.total_acted == 4 and not result.skipped

        assert [m for m, _ in standin.calls if m != "GET"].count("DELETE") == 3
        assert ("PUT", f"/admin/realms/mcp/clients/{keys['never']}") in standin.calls
        for i in range(3):  # each DELETE came after the GET that fed its tombstone
            path = f"/admin/realms/mcp/clients/{keys[f'old{i}']}"
            assert standin.calls.index(("GET", path)) < standin.calls.index(("DELETE", path))
        got = scan(server_db.url)
        assert set(got) == {"new", "never"} and got["never"].row.disabled is True
        with _ledger(tmp_path).connect() as conn:
            tombs = conn.execute(sa.text("SELECT client_id, action, state, payload FROM dcr_reaper_tombstones")).all()
        assert {(t.client_id, t.action, t.state) for t in tombs} == {
            ("old0", "delete", "done"),
            ("old1", "delete", "done"),
            ("old2", "delete", "done"),
            ("never", "disable", "done"),
        }
        rep = decode_payload(next(t.payload for t in tombs if t.client_id == "old0"))["representation"]
        assert rep["id"] == keys["old0"] and rep["redirectUris"] == loop(50100)

        back = restore(config, run_id=result.run_id)
        assert sorted(back.restored) == sorted(keys[k] for k in ("old0", "old1", "old2", "never"))
        assert ("POST", "/admin/realms/mcp/clients") in standin.calls
    got = scan(server_db.url)
    # Back with the same id, client_id, redirect URIs and registration token; Keycloak dropped their (dead)
    # sessions when it deleted them, so they now look never used.
    assert {c: i.verdict for c, i in got.items()} == {
        "old0": Verdict.ABANDONED,
        "old1": Verdict.ABANDONED,
        "old2": Verdict.ABANDONED,
        "new": Verdict.LIVE,
        "never": Verdict.ABANDONED,
    }
    assert got["never"].row.disabled is False and got["old0"].row.redirect_uris == tuple(loop(50100))


def test_a_session_after_the_scan_saves_the_client(server_db, kc, tmp_path):
    keys = _churn(kc)
    with KeycloakStandIn(kc) as standin:
        config = _config(server_db.url, standin, tmp_path)
        the_plan = plan(config)
        kc.session(_realm(kc), keys["old1"], offline=True, refreshed_age=5)  # the user came back
        result = apply(config, the_plan)
        assert result.skipped["changed_since_scan"] == 1 and result.total_acted == 3
        assert ("DELETE", f"/admin/realms/mcp/clients/{keys['old1']}") not in standin.calls
    assert scan(server_db.url)["old1"].verdict is Verdict.LIVE


@pytest.mark.slow
def test_a_stop_during_the_pause_between_api_batches_ends_the_run_within_a_second(server_db, kc, tmp_path):
    """The Keycloak path pauses through the runner like every backend: a stop request wakes the pause at once,
    and the run ends between batches, recorded as stopped."""
    _churn(kc)
    with KeycloakStandIn(kc) as standin:
        config = _config(server_db.url, standin, tmp_path, policy={"batch_size": 1, "pause": 30})
        the_plan = plan(config)
        assert len(the_plan.candidates) == 4
        stop = threading.Event()
        out: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: out.update(result=apply(config, the_plan, stop=stop)))
        worker.start()
        deadline = time.monotonic() + 20
        while not any(m in ("DELETE", "PUT") for m, _ in standin.calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the first batch is done: the runner is in its 30 s pause
        asked = time.monotonic()
        stop.set()
        worker.join(5)
        took = time.monotonic() - asked
        assert not worker.is_alive() and took < 1.0, f"the run ended {took:.2f}s after the stop request"
        result = out["result"]
        assert result.stopped and result.total_acted == 1
        with _ledger(tmp_path).connect() as conn:
            assert conn.execute(sa.text("SELECT status FROM dcr_reaper_runs")).scalar_one() == "stopped"


def _realm(kc: Keycloak) -> str:
    with kc.engine.connect() as conn:
        return str(conn.execute(sa.select(kc.t["realm"].c.id).where(kc.t["realm"].c.name == "mcp")).scalar_one())


def test_api_failures_leave_a_void_tombstone_and_stop_the_run(server_db, kc, tmp_path):
    _churn(kc)
    with KeycloakStandIn(kc) as standin:
        config = _config(server_db.url, standin, tmp_path)
        the_plan = plan(config)
        standin.fail_next["DELETE"] = 500
        with pytest.raises(KeycloakError, match="HTTP 500"):
            apply(config, the_plan)
        with _ledger(tmp_path).connect() as conn:
            states = [
                tuple(r) for r in conn.execute(sa.text("SELECT action, state FROM dcr_reaper_tombstones ORDER BY id"))
            ]
            run = conn.execute(sa.text("SELECT status FROM dcr_reaper_runs")).scalar_one()
        # The first DELETE failed: its tombstone is void and the run stopped there (a disable planned before
        # it, in the same batch, went through).
        assert states[-1] == ("delete", "void") and set(states[:-1]) <= {("disable", "done")}
        assert run == "failed"

        bad = AdminClient(standin.url, "mcp", standin.client_id, "wrong-secret")
        with pytest.raises(KeycloakError, match="refused the service account") as err:
            bad.get_client("x")
        assert "wrong-secret" not in str(err.value)


def test_api_settings_are_required(server_db, kc):
    kc.realm("mcp")
    config = make_config(server_db.url, profile=PROFILE)
    with pytest.raises(ConfigError) as err:
        apply(config, sql_plan_stub())
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "options.realm",
        "keycloak.url",
        "keycloak.client_id / keycloak.client_secret",
        "ledger.url",
    ]


def sql_plan_stub() -> Any:
    from reaper.reaping import Plan

    return Plan([], 0, {})
