"""Text for people: printable bounded strings, times and durations (shared by every output format)."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime


def clean(text: str | None, limit: int | None = 60) -> str:
    """Printable, bounded text: control and format characters escaped, long text cut with a count."""
    if text is None:
        return ""
    out = []
    for ch in text[: (limit * 4 if limit else None)]:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    shown = "".join(out)
    if limit and (len(shown) > limit or len(text) > limit * 4):
        return shown[: limit - 1] + f"…(+{len(text) - limit + 1})"
    return shown


OUT_OF_RANGE = "out of range"
_SURROGATES = re.compile("[\ud800-\udfff]")


def utf8_safe(text: str | None) -> str | None:
    """Text any UTF-8 writer accepts: bytes that were not UTF-8 (lone surrogates after a lenient read) shown as
    escapes (`\\xfc`); everything else exactly as stored."""
    if text is None or text.isascii() or not _SURROGATES.search(text):
        return text
    return _SURROGATES.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", text)


def format_time(ts: float, fmt: str) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime(fmt)
    except (OverflowError, ValueError, OSError):  # before year 1 or after 9999: stored, but no calendar date
        return OUT_OF_RANGE


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC, seconds precision ("out of range" for a time no calendar can show)."""
    return None if ts is None else format_time(ts, "%Y-%m-%dT%H:%M:%SZ")


def short_time(ts: float | None) -> str:
    return "-" if ts is None else format_time(ts, "%Y-%m-%d %H:%M")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def database_label(description: str) -> str:
    """The database as host and name, without the driver or the user (`postgresql+psycopg://app:***@db:5432/auth`
    -> `db:5432/auth`): what reports for people name (the evidence report is handed to vendors); the JSON keeps
    the redacted URL."""
    if "://" not in description:
        return description  # a path (a file tree)
    authority, _, path = description.split("://", 1)[1].partition("/")
    host = authority.rsplit("@", 1)[-1]
    path = path.split("?", 1)[0]
    return (f"{host}/{path}" if host else path) or description
