"""MCP clients that log in through FastMCP's own client OAuth helper (`fastmcp.client.auth.OAuth`).

Only the browser is automated. `OAuth.redirect_handler` runs unchanged (its pre-flight GET of the
authorize URL, which raises `ClientNotFoundError` on a 400, is what makes the helper re-register), and
`OAuth.callback_handler` runs unchanged too (its real uvicorn callback server on localhost). Where the
helper would call `webbrowser.open(url)`, a "browser" thread takes over instead: it follows the redirects
with `requests` (proxy /authorize -> proxy /consent, approve the consent form -> upstream /authorize, which
auto-approves -> proxy /auth/callback -> http://localhost:<port>/callback) and finally delivers the
callback to the helper's callback server, exactly as a browser tab would.

Client kinds:
  churning_session()      forgets everything each time (fresh MemoryStore) -> registers again every session;
  wellbehaved_session()   keeps its token storage (a FileTreeStore directory) across sessions;
  flood()                 N registrations in a few seconds that never finish a login (the "browser" never
                          comes back; the helper gives up after `callback_timeout`), or, with mode="raw",
                          bare POST /register calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import html.parser
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import fastmcp.client.auth.oauth as _fastmcp_oauth_module
import requests
from fastmcp import Client
from fastmcp.client.auth import OAuth
from key_value.aio.protocols import AsyncKeyValue
from key_value.aio.stores.filetree import (
    FileTreeStore,
    FileTreeV1CollectionSanitizationStrategy,
    FileTreeV1KeySanitizationStrategy,
)
from key_value.aio.stores.memory import MemoryStore

# --------------------------------------------------------------------------------------------------------
# The "browser"
# --------------------------------------------------------------------------------------------------------

BrowserFn = Callable[[str], None]
_BROWSER: contextvars.ContextVar[BrowserFn | None] = contextvars.ContextVar("_BROWSER", default=None)


class _WebbrowserShim:
    """Stands in for the `webbrowser` module inside fastmcp.client.auth.oauth only; the helper's
    `webbrowser.open(url)` lands on the browser bound to the current task (a ContextVar)."""

    @staticmethod
    def open(url: str, *_a: Any, **_kw: Any) -> bool:
        fn = _BROWSER.get()
        if fn is None:
            raise RuntimeError("no automated browser bound to this OAuth flow")
        fn(url)
        return True


_fastmcp_oauth_module.webbrowser = _WebbrowserShim()  # type: ignore[assignment]


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.in_form = True
        elif tag == "input" and self.in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.in_form = False


def _wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"callback server {host}:{port} never came up")


@dataclass
class BrowserLog:
    steps: list[str] = field(default_factory=list)
    error: str | None = None


def approving_browser(redirect_uri: str, log: BrowserLog, *, timeout: float = 15.0) -> BrowserFn:
    """A browser that approves the consent page and lets the upstream auto-approve."""
    cb = urlparse(redirect_uri)

    def drive(url: str) -> None:
        sess = requests.Session()  # a fresh browser profile per login
        try:
            _wait_for_port(cb.hostname or "localhost", cb.port or 80, timeout)
            method, data = "GET", None
            for _ in range(12):
                if url.startswith(redirect_uri.split("?")[0]):
                    r = sess.get(url, timeout=timeout)  # deliver the callback to the helper
                    log.steps.append(f"callback {r.status_code}")
                    return
                r = sess.request(method, url, data=data, allow_redirects=False, timeout=timeout)
                log.steps.append(f"{method} {urlparse(url).netloc}{urlparse(url).path} -> {r.status_code}")
                method, data = "GET", None
                if r.is_redirect:
                    url = urljoin(url, r.headers["location"])
                    continue
                if r.status_code == 200 and "consentForm" in r.text:
                    form = _FormParser()
                    form.feed(r.text)
                    method, data = "POST", {**form.fields, "action": "approve"}
                    continue  # form action="" posts back to the same URL
                raise RuntimeError(f"unexpected {r.status_code} from {url}: {r.text[:300]}")
            raise RuntimeError("too many redirects")
        except Exception as exc:  # tell the helper, the way a browser would: an error on the callback
            log.error = f"{type(exc).__name__}: {exc}"
            try:
                requests.get(
                    redirect_uri,
                    params={"error": "browser_automation_failed", "error_description": log.error[:200]},
                    timeout=5,
                )
            except Exception:
                pass

    def open_(url: str) -> None:
        threading.Thread(target=drive, args=(url,), name="automated-browser", daemon=True).start()

    return open_


def abandoning_browser(log: BrowserLog) -> BrowserFn:
    """The user closes the tab: nothing ever reaches the callback server."""

    def open_(url: str) -> None:
        log.steps.append(f"abandoned {urlparse(url).path}")

    return open_


# --------------------------------------------------------------------------------------------------------
# The helper, with the browser bound
# --------------------------------------------------------------------------------------------------------


class AutomatedOAuth(OAuth):
    """fastmcp.client.auth.OAuth; only `webbrowser.open` is replaced (see module docstring)."""

    def __init__(self, *args: Any, browser: str = "approve", **kwargs: Any) -> None:
        self.browser_kind = browser
        self.browser_logs: list[BrowserLog] = []
        self.redirect_calls = 0
        super().__init__(*args, **kwargs)

    async def redirect_handler(self, authorization_url: str) -> None:
        self.redirect_calls += 1
        log = BrowserLog()
        self.browser_logs.append(log)
        redirect_uri = f"http://localhost:{self.redirect_port}/callback"
        fn = approving_browser(redirect_uri, log) if self.browser_kind == "approve" else abandoning_browser(log)
        token = _BROWSER.set(fn)
        try:
            await super().redirect_handler(authorization_url)  # pre-flight GET, then webbrowser.open
        finally:
            _BROWSER.reset(token)


def filetree_token_storage(directory: Path) -> AsyncKeyValue:
    """A persistent client-side token store (what a well-behaved client keeps between runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileTreeStore(
        data_directory=directory,
        key_sanitization_strategy=FileTreeV1KeySanitizationStrategy(directory),
        collection_sanitization_strategy=FileTreeV1CollectionSanitizationStrategy(directory),
    )


@dataclass
class SessionResult:
    kind: str
    name: str
    ok: bool
    client_id: str | None
    seconds: float
    tool_result: str | None = None
    error: str | None = None
    logins: int = 0
    browser: list[list[str]] = field(default_factory=list)


async def _stored_client_id(oauth: OAuth) -> str | None:
    info = await oauth.token_storage_adapter.get_client_info()
    return info.client_id if info else None


async def run_session(
    mcp_url: str,
    *,
    kind: str,
    name: str,
    token_storage: AsyncKeyValue,
    browser: str = "approve",
    callback_timeout: float = 20.0,
    call_tool: bool = True,
) -> SessionResult:
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the in-memory token storage warning, for churners on purpose
        oauth = AutomatedOAuth(
            mcp_url=mcp_url,
            client_name=name,
            token_storage=token_storage,
            callback_timeout=callback_timeout,
            browser=browser,
        )
    result = SessionResult(kind=kind, name=name, ok=False, client_id=None, seconds=0.0)
    try:
        async with Client(mcp_url, auth=oauth, timeout=30) as client:
            if call_tool:
                res = await client.call_tool("echo", {"text": f"hello from {name}"})
                result.tool_result = str(res.data)
        result.ok = True
    except BaseException as exc:  # noqa: BLE001 - report, don't die (the flood fails by design)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.client_id = await _stored_client_id(oauth)
    result.logins = oauth.redirect_calls
    result.browser = [log.steps + ([f"ERROR {log.error}"] if log.error else []) for log in oauth.browser_logs]
    result.seconds = round(time.monotonic() - t0, 3)
    return result


async def churning_session(
    mcp_url: str, i: int, name: str | None = None, token_storage: AsyncKeyValue | None = None
) -> SessionResult:
    """Forgets its registration every time: a brand-new in-memory token store per session (pass one in to keep
    a handle on what this session stored)."""
    return await run_session(
        mcp_url, kind="churn", name=name or f"churn-{i}", token_storage=token_storage or MemoryStore()
    )


async def wellbehaved_session(mcp_url: str, storage_dir: Path, name: str = "wellbehaved") -> SessionResult:
    """Keeps its token storage in `storage_dir` across sessions (and across processes)."""
    return await run_session(mcp_url, kind="wellbehaved", name=name, token_storage=filetree_token_storage(storage_dir))


async def expire_stored_access_token(storage_dir: Path, mcp_url: str) -> None:
    """Make the stored access token look expired (an hour later), so the next session refreshes."""
    await expire_access_token_in(filetree_token_storage(storage_dir), mcp_url)


async def expire_access_token_in(store: AsyncKeyValue, mcp_url: str) -> None:
    """The same, in any token storage (a churner's MemoryStore kept by the caller)."""
    await store.put(
        key=f"{mcp_url.rstrip('/')}/token_expiry",
        value={"expires_at": time.time() - 60},
        collection="mcp-oauth-token-expiry",
        ttl=60 * 60 * 24 * 365,
    )


async def flood(
    mcp_url: str, n: int = 25, *, mode: str = "helper", callback_timeout: float = 1.5, name: str | None = None
) -> list[SessionResult]:
    """`n` registrations within a few seconds, none of which ever completes a login.

    mode="helper": the FastMCP helper registers, pre-flights /authorize (creating a proxy transaction),
    "opens the browser", and nobody ever comes back; it gives up after `callback_timeout` seconds.
    mode="raw": bare RFC 7591 POST /register calls, like a script or a misbehaving client.
    """
    if mode == "raw":
        base = mcp_url.rsplit("/mcp", 1)[0]
        out: list[SessionResult] = []
        for i in range(n):
            t0 = time.monotonic()
            r = requests.post(
                f"{base}/register",
                json={
                    "client_name": name or f"flood-{i}",
                    "redirect_uris": [f"http://localhost:{40000 + i}/callback"],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "response_types": ["code"],
                    "token_endpoint_auth_method": "none",
                },
                timeout=10,
            )
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            out.append(
                SessionResult(
                    kind="flood",
                    name=f"flood-{i}",
                    ok=r.status_code == 201,
                    client_id=body.get("client_id"),
                    seconds=round(time.monotonic() - t0, 3),
                    error=None if r.status_code == 201 else f"HTTP {r.status_code}",
                )
            )
        return out

    async def one(i: int) -> SessionResult:
        await asyncio.sleep(0.05 * i)  # spread over ~1.25 s, like a retry storm
        return await run_session(
            mcp_url,
            kind="flood",
            name=name or f"flood-{i}",
            token_storage=MemoryStore(),
            browser="abandon",
            callback_timeout=callback_timeout,
            call_tool=False,
        )

    return list(await asyncio.gather(*(one(i) for i in range(n))))
