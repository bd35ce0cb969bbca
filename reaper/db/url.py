"""Database URLs: parsing with this project's drivers, and rendering without the password (S8)."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from reaper.db.impl import DatabaseImpl
from reaper.errors import ConfigError


def parse_url(raw: str, key: str = "database_url") -> URL:
    """A SQLAlchemy URL, with psycopg / PyMySQL as default drivers; a bare path means SQLite. `key` names the
    setting it came from in an error."""
    if "://" not in raw:
        raw = f"sqlite:///{Path(raw).expanduser().resolve()}"
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a non-numeric port
        raise ConfigError(f"{key}: not a database URL (e.g. postgresql://user@host:5432/db)") from None
    return url.set(drivername=DatabaseImpl.default_driver(url.drivername))


def redact(url: URL | str) -> str:
    """The URL with its password hidden, for messages and logs (S8)."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    if "password" in parsed.query:  # libpq also takes ?password=...
        parsed = parsed.update_query_dict({"password": "***"})
    db = parsed.database or ""
    if db.startswith("file:") and parsed.query.get("uri") == "true":
        return f"sqlite:///{db.removeprefix('file:')}"  # the read-only form of a plain SQLite URL
    return parsed.render_as_string(hide_password=True).replace("password=%2A%2A%2A", "password=***")


def describe_error(exc: BaseException, url: URL) -> str:
    """One line describing a database error, never echoing the password."""
    orig = getattr(exc, "orig", None) or exc
    message = str(orig).strip()
    message = message.splitlines()[0] if message else "unknown error"
    secrets = [url.password, *url.normalized_query.get("password", ())]
    for secret in filter(None, secrets):
        message = message.replace(str(secret), "***")
    return re.sub(r"password=\S+", "password=***", message)
