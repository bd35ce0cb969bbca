"""The demo: an mcp-memory-service SQLite database that reproduces the original churn report."""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
from pathlib import Path

DEFAULT_PATH = Path("dcr-reaper-demo.sqlite")
# Written into the demo database's header (PRAGMA application_id, "dcrd"): a file carrying it is a demo database
# this command made, and may be replaced without asking.
APPLICATION_ID = 0x64637264
CHURN_NAME = "Claude Code (scalarly-memory)"
CHURN_REGISTRATIONS = 32

# mcp-memory-service's own schema and indexes (web/oauth/storage/sqlite.py, 12.x), without its NOT NULLs so the
# tests can store what an older or damaged database holds. Note: it indexes client_id on the token tables, not on
# oauth_authorization_codes, and `check` says so.
SCHEMA = """
CREATE TABLE IF NOT EXISTS oauth_clients (
    client_id TEXT PRIMARY KEY, client_secret TEXT, client_name TEXT, redirect_uris TEXT,
    response_types TEXT, grant_types TEXT, scope TEXT, token_endpoint_auth_method TEXT,
    created_at REAL, metadata TEXT);
CREATE TABLE IF NOT EXISTS oauth_authorization_codes (
    code TEXT PRIMARY KEY, client_id TEXT, redirect_uri TEXT, scope TEXT, expires_at REAL,
    consumed INTEGER DEFAULT 0, created_at REAL, code_challenge TEXT, code_challenge_method TEXT,
    FOREIGN KEY (client_id) REFERENCES oauth_clients(client_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS oauth_access_tokens (
    token TEXT PRIMARY KEY, client_id TEXT, scope TEXT, expires_at REAL, created_at REAL,
    FOREIGN KEY (client_id) REFERENCES oauth_clients(client_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS oauth_refresh_tokens (
    token TEXT PRIMARY KEY, client_id TEXT, scope TEXT, expires_at REAL, revoked INTEGER DEFAULT 0,
    parent_token TEXT, created_at REAL,
    FOREIGN KEY (client_id) REFERENCES oauth_clients(client_id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS idx_auth_codes_expires ON oauth_authorization_codes(expires_at);
CREATE INDEX IF NOT EXISTS idx_auth_codes_consumed ON oauth_authorization_codes(consumed);
CREATE INDEX IF NOT EXISTS idx_access_tokens_expires ON oauth_access_tokens(expires_at);
CREATE INDEX IF NOT EXISTS idx_access_tokens_client ON oauth_access_tokens(client_id);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_expires ON oauth_refresh_tokens(expires_at);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_client ON oauth_refresh_tokens(client_id);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_parent ON oauth_refresh_tokens(parent_token);
"""

HOUR = 3600.0
ACCESS_LIFETIME = HOUR / 2
REFRESH_LIFETIME = 30 * 86400.0


class _Server:
    """Writes rows the way the server would while clients register, log in and refresh."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def register(self, name: str, redirect_uris: list[str], at: float) -> str:
        client_id = secrets.token_urlsafe(16)
        self.db.execute(
            "INSERT INTO oauth_clients VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                client_id,
                None,
                name,
                json.dumps(redirect_uris),
                json.dumps(["code"]),
                json.dumps(["authorization_code", "refresh_token"]),
                "read write offline_access",
                "none",
                at,
                None,
            ),
        )
        return client_id

    def login(self, client_id: str, redirect_uri: str, at: float) -> str:
        """Authorization code with PKCE, exchanged at once: an access token and a refresh token."""
        code = secrets.token_urlsafe(24)
        self.db.execute(
            "INSERT INTO oauth_authorization_codes VALUES (?,?,?,?,?,?,?,?,?)",
            (
                code,
                client_id,
                redirect_uri,
                "read write offline_access",
                at + 600,
                1,
                at,
                secrets.token_urlsafe(32),
                "S256",
            ),
        )
        return self._issue(client_id, at, parent=None)

    def refresh(self, client_id: str, old: str, at: float) -> str:
        """Rotation: the presented refresh token is revoked, a new one chained to it."""
        self.db.execute("UPDATE oauth_refresh_tokens SET revoked = 1 WHERE token = ?", (old,))
        return self._issue(client_id, at, parent=old)

    def replay(self, client_id: str) -> None:
        """A revoked refresh token presented again: the whole chain is revoked."""
        self.db.execute("UPDATE oauth_refresh_tokens SET revoked = 1 WHERE client_id = ?", (client_id,))

    def _issue(self, client_id: str, at: float, parent: str | None) -> str:
        self.db.execute(
            "INSERT INTO oauth_access_tokens VALUES (?,?,?,?,?)",
            ("eyJ" + secrets.token_urlsafe(48), client_id, "read write", at + ACCESS_LIFETIME, at),
        )
        refresh = secrets.token_urlsafe(32)
        self.db.execute(
            "INSERT INTO oauth_refresh_tokens VALUES (?,?,?,?,?,?,?)",
            (refresh, client_id, "read write offline_access", at + REFRESH_LIFETIME, 0, parent, at),
        )
        return refresh


def is_demo_database(path: Path) -> bool:
    """Whether the file is a demo database (its header carries APPLICATION_ID), read without opening it."""
    try:
        with path.open("rb") as fh:
            header = fh.read(72)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and int.from_bytes(header[68:72], "big") == APPLICATION_ID


def build_demo(path: Path, now: float | None = None, seed: int = 7, overwrite: bool = False) -> Path:
    """Create the demo database at `path` and return its absolute path. An existing file is replaced only if it
    is an earlier demo database, or with `overwrite`; otherwise FileExistsError, and nothing is touched."""
    now = time.time() if now is None else now
    rng = random.Random(seed)
    path = path.expanduser().resolve()
    if path.is_dir():
        raise IsADirectoryError(f"--db {path} is a directory")
    if path.exists() and not overwrite and not is_demo_database(path):
        raise FileExistsError(
            f"--db {path} exists and is not a demo database: nothing was changed (pass --overwrite to replace it)"
        )
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        server = _Server(db)

        # A desktop editor: one stable registration, refreshed properly, live.
        vscode = server.register(
            "Visual Studio Code", ["https://vscode.dev/redirect", "http://127.0.0.1:33418/"], now - 10 * 86400
        )
        token = server.login(vscode, "http://127.0.0.1:33418/", now - 10 * 86400)
        for days in (7, 3, 1):
            token = server.refresh(vscode, token, now - days * 86400)
        server.refresh(vscode, token, now - 2 * HOUR)

        # The loop: a new registration every session for 48 hours, random loopback ports.
        # Session N+1 refreshes once and never saves the rotated token; session N+2 replays the old one,
        # the server revokes the chain, and the client registers again.
        start = now - 48 * HOUR
        step = (48 * HOUR - 20 * 60) / (CHURN_REGISTRATIONS - 1)
        for i in range(CHURN_REGISTRATIONS):
            at = start + i * step
            port = rng.randint(49152, 65535)
            redirect = f"http://localhost:{port}/callback"
            client = server.register(CHURN_NAME, [redirect], at)
            first = server.login(client, redirect, at + 20)
            if i < CHURN_REGISTRATIONS - 1:
                server.refresh(client, first, at + ACCESS_LIFETIME + 60)
                server.replay(client)

        # Registered, then never came back for a token.
        server.register(
            "MCP CLI Proxy", [f"http://localhost:{rng.randint(49152, 65535)}/oauth/callback"], now - 3 * 86400
        )
        # Registered a minute ago: the user is in the browser right now.
        server.register("Cursor", [f"http://127.0.0.1:{rng.randint(49152, 65535)}/callback"], now - 60)
        db.commit()
    finally:
        db.close()
    return path
