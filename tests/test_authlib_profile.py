"""The authlib profile against a schema made by the real Authlib SQLAlchemy mixins, filled through the models.

Every scenario runs on SQLite, PostgreSQL and MariaDB; where Authlib itself has an opinion
(TokenMixin.is_revoked, is_expired, AuthorizationCodeMixin.is_expired) the reaper's liveness is compared with it.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from sqlalchemy.orm import Session

from kit.schemas.authlib import Models, make_models, usable
from reaper.analysis.fingerprint import normalize_name
from reaper.analysis.model import Classified, Snapshot, Verdict
from reaper.commands import classified
from reaper.config import Config, load_config
from reaper.db import check_schema
from reaper.profiles import bind_profile

HOUR = 3600
DAY = 86400


class App:
    """Writes rows the way an Authlib server does: through its models, in one session."""

    def __init__(self, engine: Any, models: Models):
        models.base.metadata.create_all(engine)
        self.m = models
        self.session = Session(engine, expire_on_commit=False)
        self.now = int(time.time())
        self._n = 0

    def register(
        self,
        name: str | None,
        redirect_uris: list[str],
        age: float | None,
        client_id: str | None = None,
        **metadata: Any,
    ) -> Any:
        """A client as the DCR endpoint stores it; age None keeps client_id_issued_at's default (manual)."""
        self._n += 1
        client = self.m.Client(client_id=client_id or f"dcr-{self._n:04d}-{random.getrandbits(40):010x}")
        if age is not None:
            client.client_id_issued_at = int(self.now - age)
        meta = {
            "redirect_uris": redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
            **metadata,
        }
        if name is not None:
            meta["client_name"] = name
        client.set_client_metadata(meta)
        self.session.add(client)
        return client

    def token(
        self,
        client: Any,
        age: float,
        expires_in: int,
        refresh: bool = False,
        access_revoked: float = 0,
        refresh_revoked: float = 0,
        refresh_value: str | None = None,
    ) -> Any:
        self._n += 1
        tok = self.m.Token(
            client_id=client.client_id,
            token_type="Bearer",
            access_token=f"at-{self._n}-{random.getrandbits(64):x}",
            refresh_token=refresh_value
            if refresh_value is not None
            else (f"rt-{self._n}-{random.getrandbits(64):x}" if refresh else None),
            scope="openid",
            issued_at=int(self.now - age),
            expires_in=expires_in,
            access_token_revoked_at=int(access_revoked),
            refresh_token_revoked_at=int(refresh_revoked),
            user_id=42,
        )
        self.session.add(tok)
        return tok

    def code(self, client: Any, age: float) -> Any:
        self._n += 1
        code = self.m.Code(
            code=f"code-{self._n}-{random.getrandbits(64):x}",
            client_id=client.client_id,
            redirect_uri=client.redirect_uris[0],
            response_type="code",
            scope="openid",
            auth_time=int(self.now - age),
            user_id=42,
        )
        self.session.add(code)
        return code

    def commit(self) -> None:
        self.session.commit()

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def db(any_db):
    """These scenarios run on MariaDB too (the kit's `db` covers SQLite and PostgreSQL)."""
    return any_db


@pytest.fixture
def app(db):
    a = App(db.engine, make_models())
    yield a
    a.close()


def loopback(port: int, path: str = "/callback") -> list[str]:
    return [f"http://localhost:{port}{path}"]


def config(url: str, **overrides: Any) -> Config:
    return load_config(None, {"database_url": url, "profile": "authlib", **overrides}, environ={})


def run(url: str, **overrides: Any) -> tuple[dict[str, Classified], Snapshot]:
    """The reaper's pipeline on the database: client_id -> Classified, and the finished Snapshot."""
    with classified(config(url, **overrides)) as (stream, snapshot):
        items = list(stream)
    by_id = {i.row.client_id: i for i in items}
    assert len(by_id) == len(items), "every client is scanned exactly once"
    return by_id, snapshot


def test_churning_family_newest_live_rest_orphans(db, app):
    rng = random.Random(7)
    ports = rng.sample(range(49152, 65536), 8)
    name = "Claude Code (memory-service)"
    churn = []
    for i, port in enumerate(ports):
        # Oldest first, one re-registration every 40 minutes; the newest one is 2 hours old.
        age = 2 * HOUR + (len(ports) - 1 - i) * 40 * 60
        client = app.register(name, loopback(port), age)
        churn.append(client)
        # Each login got an access token that expired after an hour, and a refresh token the loop revoked.
        app.token(client, age=age - 30, expires_in=HOUR, refresh=True, refresh_revoked=app.now - age + 600)
    newest = churn[-1]
    live_tok = app.token(newest, age=120, expires_in=HOUR, refresh=True)
    vscode = app.register("Visual Studio Code", ["https://vscode.dev/redirect", "http://127.0.0.1:33418/"], 30 * DAY)
    app.token(vscode, age=600, expires_in=HOUR)
    app.commit()
    assert usable(live_tok)

    by_id, snap = run(db.url)

    items = [by_id[c.client_id] for c in churn]
    assert {i.row.name for i in items} == {name}, "client_name is read from inside client_metadata"
    assert all(i.row.redirect_uris == (f"http://localhost:{p}/callback",) for i, p in zip(items, ports, strict=True))
    assert len({i.family for i in items}) == 1, "loopback ports must not split a family"
    assert by_id[vscode.client_id].family != items[0].family
    assert (items[-1].verdict, items[-1].reason) == (Verdict.LIVE, "live_token")
    assert [(i.verdict, i.reason) for i in items[:-1]] == [(Verdict.ORPHAN, "superseded")] * 7
    assert items[-1].row.live == {"token": 1} and items[-1].row.total_credentials == 2
    assert items[0].row.last_used == pytest.approx(app.now - (2 * HOUR + 7 * 40 * 60 - 30))
    assert by_id[vscode.client_id].verdict is Verdict.LIVE

    fam = snap.families[items[0].family]
    assert (fam.members, fam.live, fam.orphans, fam.abandoned) == (8, 1, 7, 0)
    assert fam.name == name and fam.normalized_name == normalize_name(name) == "claude code (memory-service)"
    assert fam.survivor == newest.client_id == fam.newest_live_client_id
    assert fam.first_registered == churn[0].client_id_issued_at
    assert fam.last_registered == newest.client_id_issued_at
    assert fam.recent == 8 and fam.median_interval == pytest.approx(40 * 60)
    assert fam in snap.churning()
    assert snap.clients == 9
    assert snap.by_verdict == {Verdict.LIVE: 2, Verdict.ORPHAN: 7}
    assert snap.profile == "authlib" and snap.problems == []


def test_family_grouping_uses_metadata_name_redirects_and_software_id(db, app):
    a = app.register("Claude Code (notes)", loopback(50001), 5 * HOUR)
    b = app.register("  claude   CODE (notes) ", loopback(61234), 4 * HOUR)  # same name once normalized
    c = app.register("Claude Code (notes)", loopback(50002, "/oauth/callback"), 3 * HOUR)  # other path
    d = app.register("Claude Code (notes)", loopback(50003), 2 * HOUR, software_id="cc-cli", software_version="2.1")
    for client in (a, b, c, d):
        app.token(client, age=HOUR + 60, expires_in=HOUR)
    app.commit()

    by_id, snap = run(db.url)

    fa, fb, fc, fd = (by_id[x.client_id] for x in (a, b, c, d))
    assert fa.family == fb.family
    assert len({fa.family, fc.family, fd.family}) == 3
    assert (fd.row.software_id, fd.row.software_version) == ("cc-cli", "2.1")
    assert fa.row.software_id is None
    # b is the newest of its family and has no live token: idle; a has a newer sibling: orphan.
    assert (fb.verdict, fa.verdict) == (Verdict.IDLE, Verdict.ORPHAN)
    assert fc.verdict is Verdict.IDLE and fd.verdict is Verdict.IDLE
    fam = snap.families[fa.family]
    assert (fam.members, fam.live, fam.orphans) == (2, 0, 1)
    assert fam.name == "  claude   CODE (notes) ", "a family shows its newest member's name as stored"
    assert fam.normalized_name == "claude code (notes)"
    assert fam.survivor == b.client_id


def test_access_token_liveness_matches_authlib(db, app):
    cases = {
        # name: (token kwargs, expected live)
        "never-expires": (dict(age=400 * DAY, expires_in=0), True),
        "fresh": (dict(age=600, expires_in=HOUR), True),
        "expired": (dict(age=2 * HOUR, expires_in=HOUR), False),
        "access-revoked": (dict(age=600, expires_in=HOUR, access_revoked=app.now - 60), False),
        "never-expires-revoked": (
            dict(age=400 * DAY, expires_in=0, access_revoked=app.now - 10 * DAY),
            False,
        ),
        "refresh-revoked": (
            dict(age=600, expires_in=HOUR, refresh=True, refresh_revoked=app.now - 60),
            False,
        ),
        # Revoked by a server whose clock runs ahead of the reaper's: Authlib treats any non-zero as revoked.
        "revoked-ahead": (dict(age=600, expires_in=HOUR, access_revoked=app.now + 120), False),
        "refresh-revoked-ahead": (
            dict(age=600, expires_in=0, refresh=True, refresh_revoked=app.now + 120),
            False,
        ),
    }
    made = {}
    for name, (kwargs, _) in cases.items():
        client = app.register(f"app {name}", [f"https://{name}.example.com/cb"], 30 * DAY)
        made[name] = (client, app.token(client, **kwargs))
    app.commit()

    by_id, snap = run(db.url)

    for name, (_, expected) in cases.items():
        client, tok = made[name]
        item = by_id[client.client_id]
        assert usable(tok) is expected, f"{name}: the case means what Authlib says"
        got = (item.verdict, item.reason)
        want = (Verdict.LIVE, "live_token") if expected else (Verdict.IDLE, "no_newer_sibling")
        assert got == want, name
        assert item.row.total_credentials == 1
    assert snap.by_verdict == {Verdict.LIVE: 2, Verdict.IDLE: 6}


@pytest.mark.parametrize("lifetime", [None, "1d"])
def test_refresh_token_liveness_follows_refresh_lifetime(db, app, lifetime):
    cases = {
        # name: (token kwargs, live forever (default 0), live with refresh_lifetime = 1d)
        "old-refresh": (dict(age=3 * DAY, expires_in=HOUR, refresh=True), True, False),
        "recent-refresh": (dict(age=2 * HOUR, expires_in=HOUR, refresh=True), True, True),
        "refresh-revoked": (
            dict(age=2 * HOUR, expires_in=HOUR, refresh=True, refresh_revoked=app.now - HOUR),
            False,
            False,
        ),
        "no-refresh": (dict(age=2 * HOUR, expires_in=HOUR), False, False),
        "empty-refresh": (dict(age=2 * HOUR, expires_in=HOUR, refresh_value=""), False, False),
    }
    made = {}
    for name, (kwargs, _, _) in cases.items():
        client = app.register(f"refresh {name}", [f"https://{name}.example.com/cb"], 10 * DAY)
        made[name] = client
        tok = app.token(client, **kwargs)
        assert tok.is_expired(), "the access token is expired: only the refresh token can keep the client"
    app.commit()

    options = {"options": {"refresh_lifetime": lifetime}} if lifetime else {}
    by_id, snap = run(db.url, **options)

    for name, (_, forever, one_day) in cases.items():
        expected = one_day if lifetime else forever
        item = by_id[made[name].client_id]
        assert (item.verdict is Verdict.LIVE) is expected, f"{name} with refresh_lifetime={lifetime}"
        if not expected:
            assert item.verdict is Verdict.IDLE
    assert snap.by_verdict[Verdict.LIVE] == (1 if lifetime else 2)


def test_pending_authorization_code_keeps_client_live(db, app):
    pending = app.register("mid-login", loopback(50100), 3 * HOUR)
    code = app.code(pending, age=60)
    stale = app.register("stale-code", loopback(50200), 3 * HOUR)
    old_code = app.code(stale, age=600)
    app.commit()
    assert not code.is_expired() and old_code.is_expired()

    by_id, _ = run(db.url)

    p, s = by_id[pending.client_id], by_id[stale.client_id]
    assert (p.verdict, p.reason) == (Verdict.LIVE, "live_code")
    assert p.row.live == {"code": 1}
    assert p.row.last_used == pytest.approx(app.now - 60)
    assert s.verdict is Verdict.IDLE and s.row.live == {} and s.row.total_credentials == 1


def test_static_cimd_young_and_abandoned_clients(db, app):
    static = app.register("Internal dashboard", ["https://dash.example.com/cb"], age=None)  # Authlib default 0
    cimd = app.register(
        "CIMD client",
        ["https://app.example.com/cb"],
        10 * DAY,
        client_id="https://app.example.com/oauth/client.json",
    )
    abandoned = app.register("MCP CLI Proxy", loopback(50300, "/oauth/callback"), 3 * DAY)
    young = app.register("Cursor", loopback(50400), 5)
    waiting = app.register("Zed", loopback(50500), 2 * HOUR)
    app.commit()
    assert static.client_id_issued_at == 0, "manual rows keep Authlib's default"

    by_id, snap = run(db.url)

    got = {
        c.client_id: (by_id[c.client_id].verdict, by_id[c.client_id].reason)
        for c in (static, cimd, abandoned, young, waiting)
    }
    assert got == {
        static.client_id: (Verdict.PROTECTED, "static"),
        cimd.client_id: (Verdict.PROTECTED, "cimd"),
        abandoned.client_id: (Verdict.ABANDONED, "never_used"),
        young.client_id: (Verdict.YOUNG, "grace_period"),
        waiting.client_id: (Verdict.YOUNG, "awaiting_first_token"),
    }
    assert by_id[static.client_id].row.dynamic is False
    assert by_id[cimd.client_id].row.cimd is True
    assert snap.by_verdict == {Verdict.PROTECTED: 2, Verdict.ABANDONED: 1, Verdict.YOUNG: 2}
    assert snap.families[by_id[abandoned.client_id].family].abandoned == 1


def test_thresholds_come_from_config(db, app):
    client = app.register("Cursor", loopback(50600), 3 * HOUR)
    app.commit()
    by_id, _ = run(db.url, classify={"abandoned_after": "2h", "young_for": "1h"})
    assert (by_id[client.client_id].verdict, by_id[client.client_id].reason) == (
        Verdict.ABANDONED,
        "never_used",
    )
    by_id, _ = run(db.url, classify={"young_for": "4h"})
    assert (by_id[client.client_id].verdict, by_id[client.client_id].reason) == (
        Verdict.YOUNG,
        "grace_period",
    )


def test_flask_style_table_names_need_renames(db):
    app = App(db.engine, make_models("client", "token", "code"))
    try:
        old = app.register("Claude Code (wiki)", loopback(51000), 6 * HOUR)
        app.token(old, age=6 * HOUR, expires_in=HOUR)
        new = app.register("Claude Code (wiki)", loopback(52000), 2 * HOUR)
        app.code(new, age=30)
        app.commit()
    finally:
        app.close()

    # Without the renames the profile does not match the schema. (check_schema is what open_source runs; it is
    # called directly because open_source leaves its engine undisposed when it raises SchemaError.)
    problems = check_schema(db.engine, bind_profile(config(db.url)))
    assert problems == [
        f"table '{t}' not found (profile 'authlib')" for t in ("oauth2_client", "oauth2_code", "oauth2_token")
    ]

    by_id, snap = run(db.url, tables={"oauth2_client": "client", "oauth2_token": "token", "oauth2_code": "code"})
    assert (by_id[new.client_id].verdict, by_id[new.client_id].reason) == (Verdict.LIVE, "live_code")
    assert (by_id[old.client_id].verdict, by_id[old.client_id].reason) == (Verdict.ORPHAN, "superseded")
    fam = snap.families[by_id[old.client_id].family]
    assert (fam.members, fam.live, fam.orphans) == (2, 1, 1)
