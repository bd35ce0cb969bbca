"""Proving-ground run: upstream IdP + FastMCP OAuthProxy, then real MCP clients, then a dump of the store.

For each backend (redis, filetree):
  1. start upstream.py (in this process, a thread) and proxy_server.py (a subprocess);
  2. 6 churning sessions (fresh token storage each -> a new registration each),
     3 well-behaved sessions (one persistent token store; the 3rd starts with an "expired" access token
     and so refreshes, which rotates the proxy's refresh token),
     a flood of 25 registrations that never finish a login;
  3. dump every key of every collection, decoded, to stdout (JSON lines) and <workdir>/dump-<backend>.jsonl;
  4. (--probe-reap, default on) after the dump: log a fresh client in, delete its registration the way a
     reaper would, and record what the proxy and FastMCP's client helper then do.

    python run.py --backend both --redis-db 12
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import clients  # noqa: E402
import dump_store  # noqa: E402
from proxy_server import JWT_SIGNING_KEY, REDIS_FERNET_KEY  # noqa: E402
from upstream import RunningUpstream  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Proxy:
    def __init__(
        self,
        *,
        backend: str,
        upstream_url: str,
        port: int,
        workdir: Path,
        redis_url: str,
        encrypt: bool,
        consent: str = "on",
    ):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.mcp_url = f"{self.base}/mcp"
        cmd = [
            sys.executable,
            str(HERE / "proxy_server.py"),
            "--port",
            str(port),
            "--upstream",
            upstream_url,
            "--consent",
            consent,
        ]
        if backend == "redis":
            cmd += ["--storage", "redis", "--redis-url", redis_url] + (["--encrypt"] if encrypt else [])
        else:
            cmd += ["--storage", "filetree", "--home", str(workdir / "fastmcp-home")]
        self.log_path = workdir / f"proxy-{backend}.log"
        self.logf = open(self.log_path, "w")
        env = {**os.environ, "FASTMCP_ENABLE_RICH_LOGGING": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.base}/.well-known/oauth-authorization-server", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"proxy not ready after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


async def scenario(
    mcp_url: str, workdir: Path, backend: str, n_churn: int, n_wb: int, n_flood: int, flood_mode: str
) -> list[Any]:
    results: list[Any] = []
    for i in range(n_churn):
        r = await clients.churning_session(mcp_url, i)
        results.append(r)
        log(f"churn-{i}: ok={r.ok} client_id={r.client_id} logins={r.logins} {r.seconds}s {r.error or ''}")
    wb_dir = workdir / f"client-wellbehaved-{backend}"
    for i in range(n_wb):
        if i == n_wb - 1 and i > 0:
            await clients.expire_stored_access_token(wb_dir, mcp_url)  # come back "an hour later"
        r = await clients.wellbehaved_session(mcp_url, wb_dir)
        r.name = f"wellbehaved#{i}"
        results.append(r)
        log(f"wellbehaved#{i}: ok={r.ok} client_id={r.client_id} logins={r.logins} {r.seconds}s {r.error or ''}")
    t0 = time.monotonic()
    fl = await clients.flood(mcp_url, n_flood, mode=flood_mode)
    results.extend(fl)
    ids = {r.client_id for r in fl if r.client_id}
    log(
        f"flood({flood_mode}): {len(fl)} attempts, {len(ids)} distinct client_ids, "
        f"{sum(1 for r in fl if r.ok)} completed, {time.monotonic() - t0:.1f}s"
    )
    return results


async def probe_reap(mcp_url: str, base: str, workdir: Path, backend: str, delete_client) -> dict[str, Any]:
    """What happens after a reaper deletes a registration that a client still uses."""
    out: dict[str, Any] = {}
    # (0) a bare RFC 7591 registration: what the client is told vs. what the proxy stores
    rr = requests.post(
        f"{base}/register",
        json={
            "client_name": "probe-raw",
            "redirect_uris": ["http://localhost:1/cb"],
            "token_endpoint_auth_method": "none",
        },
        timeout=10,
    )
    out["0_register_raw"] = {"status": rr.status_code, "response": rr.json()}
    d = workdir / f"client-probe-{backend}"
    shutil.rmtree(d, ignore_errors=True)
    r1 = await clients.wellbehaved_session(mcp_url, d, name="reaped-probe")
    out["1_login"] = {"ok": r1.ok, "client_id": r1.client_id, "logins": r1.logins}
    old_id = r1.client_id
    # raw material for direct probes, read from the client's own token storage
    store = clients.filetree_token_storage(d)
    tokens = await store.get(key=f"{mcp_url}/tokens", collection="mcp-oauth-token")
    out["2_deleted"] = delete_client(old_id)
    # (a) the access token is still valid: does the resource server care that the client is gone?
    r2 = await clients.wellbehaved_session(mcp_url, d, name="reaped-probe")
    out["3_reconnect_with_valid_token"] = {
        "ok": r2.ok,
        "client_id": r2.client_id,
        "logins": r2.logins,
        "error": r2.error,
    }
    # (b) the raw endpoints, as any client would meet them
    rt = requests.post(
        f"{base}/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": old_id},
        timeout=10,
    )
    out["4_token_refresh_raw"] = {"status": rt.status_code, "body": rt.json()}
    ra = requests.get(
        f"{base}/authorize",
        params={
            "response_type": "code",
            "client_id": old_id,
            "redirect_uri": "http://localhost:1/callback",
            "code_challenge": "x" * 43,
            "code_challenge_method": "S256",
            "state": "s",
        },
        headers={"Accept": "application/json"},
        allow_redirects=False,
        timeout=10,
    )
    out["5_authorize_raw"] = {
        "status": ra.status_code,
        "body": ra.json() if ra.headers.get("content-type", "").startswith("application/json") else ra.text[:200],
    }
    # (c) the helper, an hour later: its access token has expired, so it refreshes first
    await clients.expire_stored_access_token(d, mcp_url)
    r3 = await clients.wellbehaved_session(mcp_url, d, name="reaped-probe")
    out["6_reconnect_after_expiry"] = {
        "ok": r3.ok,
        "client_id": r3.client_id,
        "re_registered": r3.client_id not in (None, old_id),
        "logins": r3.logins,
        "browser": r3.browser,
        "error": r3.error,
    }
    return out


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    port = free_port()
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    if backend == "redis":
        import redis

        assert 10 <= args.redis_db <= 15, "Redis DBs 10-15 only"
        redis.Redis.from_url(redis_url).flushdb()
    else:
        shutil.rmtree(workdir / "fastmcp-home", ignore_errors=True)
    up = RunningUpstream(redirect_uris=[f"http://127.0.0.1:{port}/auth/callback"], access_ttl=args.access_ttl)
    proxy = Proxy(
        backend=backend,
        upstream_url=up.url,
        port=port,
        workdir=workdir,
        redis_url=redis_url,
        encrypt=args.encrypt,
        consent=args.consent,
    )
    summary: dict[str, Any] = {"backend": backend}
    try:
        proxy.wait_ready()
        log(f"[{backend}] upstream {up.url}, proxy {proxy.base} ready after {time.monotonic() - t0:.1f}s")
        results = asyncio.run(
            scenario(proxy.mcp_url, workdir, backend, args.churn, args.wellbehaved, args.flood, args.flood_mode)
        )
        (workdir / f"sessions-{backend}.json").write_text(
            json.dumps([dataclasses.asdict(r) for r in results], indent=1)
        )

        # ---- dump ----
        if backend == "redis":
            fernet = dump_store.Fernet(REDIS_FERNET_KEY) if args.encrypt else None
            records = list(dump_store.iter_redis(redis_url, fernet))
            delete_client = lambda cid: dump_store.delete_redis_client(redis_url, cid)  # noqa: E731
        else:
            jk = dump_store.jwt_key_from_string(JWT_SIGNING_KEY)
            root = dump_store.filetree_root(workdir / "fastmcp-home", jk)
            records = list(dump_store.iter_filetree(root, dump_store.Fernet(dump_store.storage_key(jk))))
            delete_client = lambda cid: dump_store.delete_filetree_client(root, cid)  # noqa: E731
            summary["filetree_root"] = str(root)
        print(f"===== {backend}: {len(records)} entries =====", flush=True)
        dump_store.dump(records)
        with open(workdir / f"dump-{backend}.jsonl", "w") as f:
            dump_store.dump(records, f)
        table = dump_store.summarize(records)
        print(table, flush=True)
        summary["table"] = table
        summary["upstream_stats"] = requests.get(f"{up.url}/_stats", timeout=5).json()

        if args.probe_reap:
            summary["probe_reap"] = asyncio.run(probe_reap(proxy.mcp_url, proxy.base, workdir, backend, delete_client))
            print(f"===== {backend}: reap probe =====\n" + json.dumps(summary["probe_reap"], indent=1), flush=True)
    finally:
        proxy.stop()
        up.close()
    summary["seconds"] = round(time.monotonic() - t0, 1)
    log(f"[{backend}] done in {summary['seconds']}s")
    return summary


def main(argv: list[str] | None = None) -> int:
    # The flood fails by design; its errors are kept in sessions-<backend>.json, not as tracebacks here.
    for name in ("mcp.client.auth", "mcp.client.auth.oauth2", "fastmcp.client.auth.oauth"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["redis", "filetree", "both"], default="both")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--encrypt", action="store_true", help="redis: FernetEncryptionWrapper around RedisStore")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    p.add_argument("--churn", type=int, default=6)
    p.add_argument("--wellbehaved", type=int, default=3)
    p.add_argument("--flood", type=int, default=25)
    p.add_argument("--flood-mode", choices=["helper", "raw"], default="helper")
    p.add_argument("--access-ttl", type=int, default=3600)
    p.add_argument(
        "--consent", choices=["on", "off", "remember"], default="on", help="OAuthProxy require_authorization_consent"
    )
    p.add_argument("--no-probe-reap", dest="probe_reap", action="store_false")
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="fastmcp-proving-ground-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {args.workdir}")
    t0 = time.monotonic()
    summaries = [
        run_backend(b, args, args.workdir)
        for b in (["redis", "filetree"] if args.backend == "both" else [args.backend])
    ]
    (args.workdir / "summary.json").write_text(json.dumps(summaries, indent=1))
    log(f"all done in {time.monotonic() - t0:.1f}s; summary in {args.workdir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
