"""Helpers for the reap tests: an Authlib-shaped schema made by the real mixins, fillers, snapshots, the CLI.

Rows are written the way an Authlib server stores them (client_metadata JSON, epoch ints, revocation times),
through SQLAlchemy Core for speed; `authlib_usable` asks Authlib's own TokenMixin.is_revoked()/is_expired()
whether a token row we call dead (or live) really is.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from authlib.integrations.sqla_oauth2 import (
    OAuth2AuthorizationCodeMixin,
    OAuth2ClientMixin,
    OAuth2TokenMixin,
)
from reaper_testkit import clean_env
from sqlalchemy import Column, Integer
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool

from reaper.config import Config, load_config

HOUR = 3600
DAY = 86400
TABLES = ("oauth2_client", "oauth2_token", "oauth2_code")
PK = {"oauth2_client": "id", "oauth2_token": "id", "oauth2_code": "id"}
LEDGER_PREFIX = "dcr_reaper_"

# Caps out of the way unless a test is about them; no grace pauses unless a test wants them.
OPEN_POLICY: dict[str, Any] = {"max_per_run": 100_000, "max_fraction": 1.0, "pause": 0, "late_token_sweep": 0}


# --- schema ---------------------------------------------------------------------------------------------


def make_models() -> tuple[sa.MetaData, dict[str, Any]]:
    """The application's models on Authlib's mixins (an integer id primary key each, as Authlib's docs do)."""

    class Base(DeclarativeBase):
        pass

    class Client(Base, OAuth2ClientMixin):
        __tablename__ = "oauth2_client"
        id = Column(Integer, primary_key=True)

    class Token(Base, OAuth2TokenMixin):
        __tablename__ = "oauth2_token"
        id = Column(Integer, primary_key=True)

    class Code(Base, OAuth2AuthorizationCodeMixin):
        __tablename__ = "oauth2_code"
        id = Column(Integer, primary_key=True)

    return Base.metadata, {"oauth2_client": Client, "oauth2_token": Token, "oauth2_code": Code}


def authlib_usable(token_cls: Any, row: dict[str, Any]) -> bool:
    """What Authlib's resource protector checks for a token row: neither revoked nor expired."""
    tok = token_cls(**row)
    return not tok.is_revoked() and not tok.is_expired()


@dataclass
class Family:
    name: str
    survivor: str | None
    orphans: list[str] = field(default_factory=list)


class AuthlibDB:
    """Writes an Authlib schema's rows in bulk; `flush()` inserts everything queued in one transaction."""

    def __init__(self, engine: sa.Engine, create: bool = True):
        self.engine = engine
        self.metadata, self.models = make_models()
        if create:
            self.metadata.create_all(engine)
        self.client_t = self.metadata.tables["oauth2_client"]
        self.token_t = self.metadata.tables["oauth2_token"]
        self.code_t = self.metadata.tables["oauth2_code"]
        self.now = int(time.time())
        self._n = 0
        self._rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.token_rows: dict[str, dict[str, Any]] = {}  # access_token -> row, everything ever queued

    def _next(self) -> int:
        self._n += 1
        return self._n

    def client(
        self, client_id: str, name: str | None, redirect_uris: list[str], issued_at: int, **metadata: Any
    ) -> str:
        meta = {
            "redirect_uris": redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
            **metadata,
        }
        if name is not None:
            meta["client_name"] = name
        self._rows["oauth2_client"].append(
            {
                "client_id": client_id,
                "client_secret": f"s3cr3t-{self._next()}-ünïcode-{random.getrandbits(48):x}",
                "client_id_issued_at": issued_at,
                "client_secret_expires_at": 0,
                "client_metadata": json.dumps(meta, ensure_ascii=False),
            }
        )
        return client_id

    def token(
        self,
        client_id: str,
        issued_at: int,
        expires_in: int,
        refresh: bool = False,
        access_revoked: int = 0,
        refresh_revoked: int = 0,
    ) -> str:
        n = self._next()
        access = f"at-{n}-{random.getrandbits(64):016x}"
        self._rows["oauth2_token"].append(
            row := {
                "client_id": client_id,
                "token_type": "Bearer",
                "access_token": access,
                "refresh_token": f"rt-{n}-{random.getrandbits(64):016x}" if refresh else None,
                "scope": "openid profile",
                "issued_at": issued_at,
                "access_token_revoked_at": access_revoked,
                "refresh_token_revoked_at": refresh_revoked,
                "expires_in": expires_in,
            }
        )
        self.token_rows[access] = row
        return access

    def code(self, client_id: str, auth_time: int, nonce: str | None = None) -> str:
        n = self._next()
        code = f"code-{n}-{random.getrandbits(64):016x}"
        self._rows["oauth2_code"].append(
            {
                "code": code,
                "client_id": client_id,
                "redirect_uri": "http://localhost:1234/callback",
                "response_type": "code",
                "scope": "openid",
                "nonce": nonce,
                "auth_time": auth_time,
                "code_challenge": f"chal-{n}",
                "code_challenge_method": "S256",
            }
        )
        return code

    def dead_history(self, client_id: str, at: int, variant: int) -> None:
        """Credentials a superseded registration leaves behind, none of them usable any more."""
        kind = variant % 3
        if kind == 0:  # access token expired long ago, no refresh token
            self.token(client_id, at + 30, HOUR)
        elif kind == 1:  # both revoked (Authlib revokes the pair)
            self.token(client_id, at + 30, HOUR, refresh=True, access_revoked=at + 600, refresh_revoked=at + 600)
        else:  # refresh token revoked by rotation, access expired
            self.token(client_id, at + 30, HOUR, refresh=True, refresh_revoked=at + 900)
        self.code(client_id, at + 20, nonce=None if variant % 2 else f"n-{variant}")

    def live_token(self, client_id: str) -> str:
        return self.token(client_id, self.now - 60, HOUR, refresh=True)

    def family(
        self,
        name: str,
        orphans: int,
        rng: random.Random,
        first_age: float = 30 * DAY,
        last_orphan_age: float = 2 * DAY,
        survivor: bool = True,
        prefix: str = "dcr",
    ) -> Family:
        """`orphans` dead registrations of one app (random loopback ports), then a newer live one."""
        fam = Family(name, None)
        ages = [first_age - i * (first_age - last_orphan_age) / max(orphans - 1, 1) for i in range(orphans)]
        for i, age in enumerate(ages):
            cid = f"{prefix}-{self._next():05d}-{rng.getrandbits(40):010x}"
            at = int(self.now - age)
            self.client(cid, name, [f"http://localhost:{rng.randint(49152, 65535)}/callback"], at)
            self.dead_history(cid, at, i)
            fam.orphans.append(cid)
        if survivor:
            cid = f"{prefix}-{self._next():05d}-{rng.getrandbits(40):010x}"
            port = rng.randint(49152, 65535)
            self.client(cid, name, [f"http://localhost:{port}/callback"], self.now - 2 * HOUR)
            self.dead_history(cid, self.now - 2 * HOUR, 0)
            self.live_token(cid)
            fam.survivor = cid
        return fam

    def flush(self) -> None:
        with self.engine.begin() as conn:
            for name in TABLES:
                rows = self._rows[name]
                if rows:
                    conn.execute(self.metadata.tables[name].insert(), rows)
                self._rows[name] = []


def fill_families(adb: AuthlibDB, families: int, orphans_each: int, seed: int) -> list[Family]:
    rng = random.Random(seed)
    fams = [adb.family(f"Claude Code (proj-{f:03d})", orphans_each, rng) for f in range(families)]
    adb.flush()
    return fams


# --- config, snapshots, ledger --------------------------------------------------------------------------


def make_config(
    url: str,
    profile: str = "authlib",
    policy: dict[str, Any] | None = None,
    classify: dict[str, Any] | None = None,
    **extra: Any,
) -> Config:
    overrides: dict[str, Any] = {"database_url": url, "profile": profile, "policy": {**OPEN_POLICY, **(policy or {})}}
    if classify:
        overrides["classify"] = classify
    overrides.update(extra)
    return load_config(None, overrides, environ={})


def table_rows(engine: sa.Engine, table: str, order_by: str = "id") -> list[tuple[Any, ...]]:
    """`SELECT *`, every column as the driver returns it, in primary-key order."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order_by}"))]


def snapshot(
    engine: sa.Engine, tables: Iterable[str] = TABLES, pk: dict[str, str] | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    pk = pk or PK
    return {t: table_rows(engine, t, pk.get(t, "id")) for t in tables}


def client_ids(engine: sa.Engine, table: str = "oauth2_client") -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.text(f"SELECT client_id FROM {table}"))}


def child_counts(engine: sa.Engine, tables: Iterable[str] = ("oauth2_token", "oauth2_code")) -> dict[str, int]:
    """client_id -> number of child rows referencing it (across the given tables)."""
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for t in tables:
            for cid, n in conn.execute(sa.text(f"SELECT client_id, COUNT(*) FROM {t} GROUP BY client_id")):
                out[cid] = out.get(cid, 0) + n
    return out


def has_table(engine: sa.Engine, name: str) -> bool:
    return sa.inspect(engine).has_table(name)


def tombstones(engine: sa.Engine, prefix: str = LEDGER_PREFIX) -> list[Any]:
    """Every tombstone row (no payload), oldest first; [] when the ledger was never created."""
    if not has_table(engine, f"{prefix}tombstones"):
        return []
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    f"SELECT id, run_id, client_key, client_id, action, state, restored_at FROM {prefix}tombstones "
                    "ORDER BY id"
                )
            )
        )


def tombstone_count(engine: sa.Engine, prefix: str = LEDGER_PREFIX, state: str | None = None) -> int:
    try:
        with engine.connect() as conn:
            q = f"SELECT COUNT(*) FROM {prefix}tombstones" + (" WHERE state = :s" if state else "")
            return int(conn.execute(sa.text(q), {"s": state}).scalar_one())
    except sa.exc.DBAPIError:
        return 0  # not created yet


def runs(engine: sa.Engine, prefix: str = LEDGER_PREFIX) -> list[Any]:
    if not has_table(engine, f"{prefix}runs"):
        return []
    with engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT id, status, acted, holder FROM {prefix}runs ORDER BY started_at")))


def fresh_engine(url: str) -> sa.Engine:
    """An engine that shares nothing with the fixture's (a poll from another 'process')."""
    return sa.create_engine(url, poolclass=NullPool)


def writer_engine(url: str) -> sa.Engine:
    """The auth server's own engine. On SQLite it takes the write lock at BEGIN (as a careful app must, or a
    read-then-write transaction deadlocks against any other writer) and waits for it."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_size=2)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _no_driver_tx(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# --- the CLI as a separate process ----------------------------------------------------------------------


def write_config(
    path: Path, policy: dict[str, Any], ledger_url: str | None = None, classify: dict[str, Any] | None = None
) -> Path:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[policy]"] + [f"{k} = {value(v)}" for k, v in {**OPEN_POLICY, **policy}.items()]
    if classify:
        lines += ["[classify]"] + [f"{k} = {value(v)}" for k, v in classify.items()]
    if ledger_url:
        lines += ["[ledger]", f"url = {value(ledger_url)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reap_args(url: str, config_path: Path, *extra: str, profile: str = "authlib") -> list[str]:
    return [
        sys.executable,
        "-m",
        "reaper",
        "reap",
        "--apply",
        "--no-progress",
        "--profile",
        profile,
        "--database-url",
        url,
        "--config",
        str(config_path),
        *extra,
    ]


def start_reap(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(args, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_reap(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    interval: float = 0.01,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
