"""A FastMCP server protected by FastMCP's own `OAuthProxy`, fronting the Authlib upstream in upstream.py.

The proxy answers Dynamic Client Registration itself (the upstream has none) and keeps its state in a
py-key-value `AsyncKeyValue` store:

  --storage redis      RedisStore(url=redis://127.0.0.1:6379/N), values in plain JSON
                       (add --encrypt to wrap it in FernetEncryptionWrapper, as FastMCP's docs recommend);
  --storage filetree   no client_storage at all: FastMCP's default, an encrypted FileTreeStore under
                       <--home>/oauth-proxy/<key fingerprint>/ (FASTMCP_HOME / fastmcp.settings.home).

One trivial tool: `echo(text)`. Listens on 127.0.0.1:<--port> with the MCP endpoint at /mcp.

--sim-clock runs the whole server on a simulated clock: `time.time()` and py-key-value's `now()` read the real
clock plus an offset that `POST /_proving-ground/clock {"offset": seconds}` sets. A negative offset writes the
store as it would have been written that long ago, with FastMCP's own lifetimes (15-minute transactions, ...),
so a test can look at it "later" with the real clock, as the SQL proving ground's SimClock does.

    python proxy_server.py --port 8123 --upstream http://127.0.0.1:9000 --storage redis --redis-url redis://127.0.0.1:6379/12
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cryptography.fernet import Fernet

JWT_SIGNING_KEY = "dcr-reaper-proving-ground-jwt-signing-key"  # a str: FastMCP stretches it with PBKDF2
UPSTREAM_CLIENT_ID = "fastmcp-oauth-proxy"
UPSTREAM_CLIENT_SECRET = "upstream-secret-for-the-proxy-0123456789abcdef"
REQUIRED_SCOPES = ["read"]
# Only used with --storage redis --encrypt (a proper Fernet key, as FastMCP's docs show for Redis).
REDIS_FERNET_KEY = b"4Qp0c0lqGc3n3Rr0m2yW7d8qvB1n6kq6zYbX0t2m3kE="


def install_sim_clock() -> dict[str, float]:
    """Shift this process's clock by a settable offset; call before fastmcp or py-key-value are imported."""
    import time
    from datetime import datetime

    real_time = time.time
    state = {"offset": 0.0}

    def sim_time() -> float:
        return real_time() + state["offset"]

    time.time = sim_time  # every `time.time()` call (FastMCP, the MCP SDK, JWT checks) reads the offset

    import key_value.aio._utils.time_to_live as ttl

    class SimDatetime(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def,override]
            return cls.fromtimestamp(sim_time(), tz)

    ttl.datetime = SimDatetime  # py-key-value's now() and now_plus(): envelope created_at / expires_at
    return state


def add_clock_route(mcp, state: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @mcp.custom_route("/_proving-ground/clock", methods=["GET", "POST"])
    async def clock(request: Request) -> JSONResponse:
        if request.method == "POST":
            state["offset"] = float((await request.json())["offset"])
        return JSONResponse({"offset": state["offset"]})


def build_storage(args: argparse.Namespace):  # -> AsyncKeyValue | None
    if args.storage == "filetree":
        return None  # OAuthProxy builds its default encrypted FileTreeStore
    from key_value.aio.stores.redis import RedisStore

    store = RedisStore(url=args.redis_url)
    if args.encrypt:
        from key_value.aio.wrappers.encryption import FernetEncryptionWrapper

        return FernetEncryptionWrapper(key_value=store, fernet=Fernet(REDIS_FERNET_KEY))
    return store


def build_server(args: argparse.Namespace):
    if args.home:
        # Must be set before OAuthProxy() runs; it reads fastmcp.settings.home in __init__.
        import fastmcp

        fastmcp.settings.home = Path(args.home)

    from fastmcp import FastMCP
    from fastmcp.server.auth.oauth_proxy import OAuthProxy
    from fastmcp.server.auth.providers.introspection import IntrospectionTokenVerifier

    base_url = f"http://127.0.0.1:{args.port}"
    verifier = IntrospectionTokenVerifier(
        introspection_url=f"{args.upstream}/introspect",
        client_id=UPSTREAM_CLIENT_ID,
        client_secret=UPSTREAM_CLIENT_SECRET,
        required_scopes=REQUIRED_SCOPES,
    )
    consent: bool | str = {"on": True, "off": False, "remember": "remember"}[args.consent]
    auth = OAuthProxy(
        upstream_authorization_endpoint=f"{args.upstream}/authorize",
        upstream_token_endpoint=f"{args.upstream}/token",
        upstream_revocation_endpoint=f"{args.upstream}/revoke",
        upstream_client_id=UPSTREAM_CLIENT_ID,
        upstream_client_secret=UPSTREAM_CLIENT_SECRET,
        token_verifier=verifier,
        base_url=base_url,
        client_storage=build_storage(args),
        jwt_signing_key=JWT_SIGNING_KEY,
        require_authorization_consent=consent,
    )
    mcp = FastMCP("dcr-reaper-fastmcp-proving-ground", auth=auth)

    @mcp.tool
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return mcp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL of upstream.py")
    p.add_argument("--storage", choices=["redis", "filetree"], required=True)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--encrypt", action="store_true", help="redis only: wrap the store in FernetEncryptionWrapper")
    p.add_argument("--home", help="fastmcp settings.home (where the default file tree lives)")
    p.add_argument("--consent", choices=["on", "off", "remember"], default="on")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--sim-clock", action="store_true", help="a settable clock offset (POST /_proving-ground/clock)")
    args = p.parse_args(argv)
    if args.storage == "redis":
        db = int(args.redis_url.rsplit("/", 1)[-1])
        if not 10 <= db <= 15:
            p.error("use a Redis DB number from 10 to 15")

    logging.basicConfig(level=getattr(logging, args.log_level.upper()))
    os.environ.setdefault("FASTMCP_LOG_LEVEL", args.log_level.upper())
    clock = install_sim_clock() if args.sim_clock else None
    mcp = build_server(args)
    if clock is not None:
        add_clock_route(mcp, clock)

    import uvicorn

    app = mcp.http_app(path="/mcp")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
