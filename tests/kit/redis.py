"""The FastMCP proving ground for pytest: Redis (started here when none answers), the real FastMCP OAuthProxy
server (`tests/kit/fastmcp/proxy_server.py`, a subprocess on a simulated clock), its Authlib upstream, and the
store's exact contents (for the read-only and byte-for-byte checks).

Redis: 127.0.0.1:6379 when it answers, else a `redis-server` of our own on a free port. Only databases 10-15 are
used, and only those are flushed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

KIT = Path(__file__).resolve().parent / "fastmcp"
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
DEFAULT_REDIS = ("127.0.0.1", 6379)


def kit_module(name: str) -> ModuleType:
    """A module of the kit, under a name of its own (the kit's files have generic names like `clients`)."""
    full = f"fastmcp_kit_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, KIT / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A redis-server of our own: no persistence, on a free port, stopped at the end."""

    def __init__(self, *extra: str):
        if not os.path.exists(REDIS_BIN):
            pytest.skip("no redis-server to start (Debian package redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def redis_hostport() -> Iterator[tuple[str, int]]:
    """Where Redis answers: the usual one, or one started for this session."""
    if _answers(*DEFAULT_REDIS):
        yield DEFAULT_REDIS
        return
    if not os.path.exists(REDIS_BIN):
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
    server = RedisServer()
    try:
        yield ("127.0.0.1", server.port)
    finally:
        server.stop()


def redis_db(hostport: tuple[str, int], db: int) -> str:
    """A flushed Redis database (10-15 only) and its URL."""
    import redis

    assert 10 <= db <= 15, "the tests use Redis databases 10-15 only"
    client = redis.Redis(host=hostport[0], port=hostport[1], db=db)
    client.flushdb()
    client.close()
    return f"redis://{hostport[0]}:{hostport[1]}/{db}"


# -- the store's exact contents ------------------------------------------------------------------------------


def redis_state(url: str) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the database: its value's bytes and its expiry (absolute, to the second)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        out = {}
        for key in client.scan_iter(count=1000):
            value, expire = client.get(key), client.expiretime(key)
            assert value is not None
            out[key] = (value, expire)
        return out
    finally:
        client.close()


def tree_state(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file and directory under root: bytes and modification time (None for a directory)."""
    out: dict[str, tuple[bytes, int] | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = None if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
    return out


# -- the proxy --------------------------------------------------------------------------------------------------


def proxy_constants() -> Any:
    return kit_module("proxy_server")


@dataclass
class Proxy:
    """proxy_server.py in a subprocess on a simulated clock; `at(offset)` moves its clock."""

    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"

    def at(self, offset: float) -> None:
        """The proxy's clock becomes the real clock plus `offset` seconds (negative: in the past)."""
        r = requests.post(f"{self.base}/_proving-ground/clock", json={"offset": offset}, timeout=10)
        assert r.ok, r.text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_proxy(upstream_url: str, port: int, workdir: Path, *, redis_url: str | None, home: Path | None) -> Proxy:
    cmd = [sys.executable, str(KIT / "proxy_server.py"), "--port", str(port), "--upstream", upstream_url]
    cmd += ["--sim-clock", "--consent", "on"]
    if redis_url is not None:
        cmd += ["--storage", "redis", "--redis-url", redis_url]
    else:
        assert home is not None
        cmd += ["--storage", "filetree", "--home", str(home)]
    log_path = workdir / f"proxy-{port}.log"
    env = {**os.environ, "FASTMCP_ENABLE_RICH_LOGGING": "false", "FASTMCP_LOG_LEVEL": "WARNING"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proxy = Proxy(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{proxy.base}/.well-known/oauth-authorization-server", timeout=1).ok:
                return proxy
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proxy.stop()
            raise TimeoutError(f"proxy not ready: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
