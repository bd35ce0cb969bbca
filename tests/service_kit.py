"""Helpers for the service and metrics tests: `serve` subprocesses, HTTP, promtool, a fault-injecting TCP
proxy, and Authlib-shaped databases filled in bulk. Every wait here is a bounded poll."""

from __future__ import annotations

import http.client
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from reaper_testkit import clean_env

T = TypeVar("T")
PROMTOOL = shutil.which("promtool")
HOUR = 3600
DAY = 86400


# --- bounded waiting --------------------------------------------------------------------------------------


def poll(fn: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Call fn until it returns something truthy; fail after `timeout` seconds with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


# --- HTTP and metrics -------------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path -> (status, body); the connection is always closed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8")
    finally:
        conn.close()


def try_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        return http_get(port, path, timeout=2.0)
    except OSError:
        return None


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (sample name, labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the exposition (skip only when promtool is missing outside CI)."""
    if PROMTOOL is None:
        if os.environ.get("REAPER_REQUIRE_DBS"):
            pytest.fail("promtool is required (REAPER_REQUIRE_DBS is set: this is CI): install 'prometheus'")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode("utf-8"), capture_output=True, timeout=60)
    assert res.returncode == 0, (
        f"promtool check metrics exited {res.returncode}:\n{res.stdout.decode()}{res.stderr.decode()}"
    )


# --- `python -m reaper serve` as a real process ------------------------------------------------------------


class ServeProcess:
    """`python -m reaper serve ... --port 0`; the real port comes from its `started` log line."""

    def __init__(self, args: list[str], cwd: Path, name: str = "serve", env: dict[str, str] | None = None):
        self.cwd = cwd
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in close()
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reaper", "serve", "--bind", "127.0.0.1", "--port", "0", *args],
            cwd=cwd,
            env=env or clean_env(),
            stdout=self._out,
            stderr=self._err,
        )
        self._port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (stdout and stderr), optionally only one event."""
        out = []
        for line in self.output().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (name is None or rec.get("event") == name):
                out.append(rec)
        return out

    def wait_started(self, timeout: float = 20) -> int:
        def started() -> int | None:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode} before starting:\n{self.output()}")
            ev = self.events("started")
            return int(ev[0]["listen"].rsplit(":", 1)[1]) if ev else None

        self._port = poll(started, timeout, what="the 'started' log line")
        return self._port

    @property
    def port(self) -> int:
        assert self._port is not None, "call wait_started() first"
        return self._port

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body

    def wait_metric(self, name: str, pred: Callable[[float], bool], timeout: float, **labels: str) -> str:
        """Poll /metrics until sample `name` satisfies pred; return that exposition."""

        def check() -> str | None:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            got = try_get(self.port, "/metrics")
            if got is None or got[0] != 200:
                return None
            v = value(got[1], name, **labels)
            return got[1] if v is not None and pred(v) else None

        return poll(check, timeout, what=f"{name}{labels or ''} on :{self.port}")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM, then wait at most `timeout`: (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout}s of SIGTERM:\n{self.output()[-3000:]}")
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        self._out.close()
        self._err.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- a TCP proxy the test controls --------------------------------------------------------------------------


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.down_bytes = 0  # server -> client

    def shut(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FaultProxy:
    """127.0.0.1:<random> -> target. refuse()/accept() new connections, cut() every open one, or arm a cut
    that fires once one connection has carried `n` bytes from the server (in the middle of a big result)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.largest_download = 0  # most bytes one finished connection carried from the server
        self._cut_after: int | None = None
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # controls
    def refuse(self) -> None:
        self.refusing = True

    def accept(self) -> None:
        self.refusing = False

    def cut(self) -> int:
        """Shut every open connection (both sides); returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
            self.cuts += 1
        for p in pairs:
            p.shut()
        return len(pairs)

    def arm_cut_after(self, n_bytes: int) -> None:
        self._cut_after = n_bytes

    @property
    def armed(self) -> bool:
        return self._cut_after is not None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # machinery
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: the client sees the connection reset at once
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            t = threading.Thread(target=self._pump, args=(pair,), name="proxy-pump", daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, pair: _Pair) -> None:
        sel = selectors.DefaultSelector()
        sel.register(pair.client, selectors.EVENT_READ, pair.upstream)
        sel.register(pair.upstream, selectors.EVENT_READ, pair.client)
        try:
            while not self._closing.is_set():
                for key, _ in sel.select(timeout=0.1):
                    src, dst = key.fileobj, key.data
                    data = src.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    dst.sendall(data)
                    if src is pair.upstream:
                        pair.down_bytes += len(data)
                        limit = self._cut_after
                        if limit is not None and pair.down_bytes >= limit:
                            self._cut_after = None
                            self.cut()
                            return
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._pairs.discard(pair)
                self.largest_download = max(self.largest_download, pair.down_bytes)
            pair.shut()
            pair.client.close()
            pair.upstream.close()

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Authlib-shaped databases ---------------------------------------------------------------------------


@dataclass
class AuthlibTables:
    metadata: sa.MetaData
    client: sa.Table
    token: sa.Table
    code: sa.Table


def authlib_tables() -> AuthlibTables:
    """The schema an Authlib application gets from the real sqla_oauth2 mixins (with an id primary key)."""
    from authlib_app import AuthorizationCode, Base, Client, Token

    return AuthlibTables(
        Base.metadata,
        Client.__table__,
        Token.__table__,
        AuthorizationCode.__table__,  # type: ignore[arg-type]
    )


def client_row(
    client_id: str, name: str | None, issued_at: int, port: int | None = None, uris: list[str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "redirect_uris": uris if uris is not None else [f"http://localhost:{port or 50000}/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    if name is not None:
        meta["client_name"] = name
    return {
        "client_id": client_id,
        "client_secret": None,
        "client_id_issued_at": issued_at,
        "client_secret_expires_at": 0,
        "client_metadata": json.dumps(meta),
    }


def token_row(
    client_id: str, n: int, issued_at: int, expires_in: int, refresh: bool = False, revoked_at: int = 0
) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "token_type": "Bearer",
        "access_token": f"at-{n}-{random.getrandbits(48):x}",
        "refresh_token": f"rt-{n}-{random.getrandbits(48):x}" if refresh else None,
        "scope": "openid",
        "issued_at": issued_at,
        "access_token_revoked_at": 0,
        "refresh_token_revoked_at": revoked_at,
        "expires_in": expires_in,
        "user_id": 42,
    }


def code_row(client_id: str, n: int, auth_time: int) -> dict[str, Any]:
    return {
        "code": f"code-{n}-{random.getrandbits(48):x}",
        "client_id": client_id,
        "redirect_uri": "http://localhost/callback",
        "response_type": "code",
        "scope": "openid",
        "auth_time": auth_time,
        "user_id": 42,
    }


@dataclass
class ChurnData:
    """What fill_churning() wrote: orphans (client_id -> (tokens, codes)) and the live survivors."""

    orphans: dict[str, tuple[int, int]]
    survivors: list[str]
    now: int


def fill_churning(
    engine: sa.Engine, families: int, orphans_per_family: int, name: str = "Claude Code #{f}", chunk: int = 5000
) -> ChurnData:
    """Authlib schema; per family `orphans_per_family` old clients with one dead token and one expired code
    each (orphans), and one newer member with a live token (the survivor). Loopback ports differ."""
    t = authlib_tables()
    t.metadata.create_all(engine)
    now = int(time.time())
    rng = random.Random(11)
    clients, tokens, codes = [], [], []
    orphans: dict[str, tuple[int, int]] = {}
    survivors = []
    n = 0
    for f in range(families):
        fam_name = name.format(f=f)
        for m in range(orphans_per_family + 1):
            n += 1
            cid = f"dcr-{f:04d}-{m:05d}"
            if m == orphans_per_family:  # the newest member, live
                clients.append(client_row(cid, fam_name, now - 2 * HOUR, rng.randint(49152, 65535)))
                tokens.append(token_row(cid, n, now - 60, HOUR, refresh=True))
                survivors.append(cid)
            else:
                born = now - 2 * DAY - (orphans_per_family - m) * 60
                clients.append(client_row(cid, fam_name, born, rng.randint(49152, 65535)))
                tokens.append(token_row(cid, n, born + 30, HOUR))  # expired an hour later, no refresh token
                codes.append(code_row(cid, n, born + 20))  # expired after 300 s
                orphans[cid] = (1, 1)
    with engine.begin() as conn:
        for rows, table in ((clients, t.client), (tokens, t.token), (codes, t.code)):
            for i in range(0, len(rows), chunk):
                conn.execute(table.insert(), rows[i : i + chunk])
    return ChurnData(orphans, survivors, now)


def counts_by_client(engine: sa.Engine, table: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT client_id, count(*) FROM {table} GROUP BY client_id"))
        return {r[0]: r[1] for r in rows}


def pg_advisory_locks(engine: sa.Engine) -> int:
    """Granted advisory locks held in this database right now."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
            ).scalar()
            or 0
        )


def pg_port_of(url: str) -> tuple[str, int]:
    u = sa.engine.make_url(url)
    return (u.host or "127.0.0.1", u.port or 5432)


def via_proxy(url: str, proxy: FaultProxy) -> str:
    u = sa.engine.make_url(url).set(host="127.0.0.1", port=proxy.port)
    return u.render_as_string(hide_password=False)
