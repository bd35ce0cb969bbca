"""Text for people: printable bounded strings, times and durations (shared by every output format)."""

from __future__ import annotations

import math
import re
import time
import unicodedata
from datetime import UTC, datetime

import orjson

_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _shown(ch: str) -> str:
    if unicodedata.category(ch) in _HIDDEN:
        return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
    return ch


def clean(text: str | None, limit: int | None = 60) -> str:
    """Printable, bounded text: control and format characters escaped, long text cut with the count of
    characters left out (never an escape cut in half)."""
    if text is None:
        return ""
    if text.isascii() and text.isprintable() and (limit is None or len(text) <= limit):
        return text  # the common case: nothing to escape, nothing to cut
    out: list[str] = []
    width = 0
    fits = 0  # pieces that fit in limit - 1, leaving room for the marker
    for ch in text:
        piece = _shown(ch)
        width += len(piece)
        if limit is not None and width > limit:
            return "".join(out[:fits]) + f"…(+{len(text) - fits})"
        out.append(piece)
        if limit is not None and width <= limit - 1:
            fits = len(out)
    return "".join(out)


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


# Years 1000 to 9999, where time.strftime's %Y has four digits: the fast path of iso().
FOUR_DIGIT_YEARS = (-30610224000.0, 253402300799.0)


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC, seconds precision ("out of range" for a time no calendar can show)."""
    if ts is None:
        return None
    if FOUR_DIGIT_YEARS[0] <= ts <= FOUR_DIGIT_YEARS[1]:
        # What datetime.fromtimestamp() shows, without building a datetime: the time rounded to the
        # microsecond (half to even), then cut to the second.
        whole = math.floor(ts)
        if round((ts - whole) * 1e6) == 1_000_000:
            whole += 1
        day, second = divmod(whole, 86400)
        date = _DATES.get(day)
        if date is None:
            if len(_DATES) >= 4096:
                _DATES.clear()
            date = _DATES[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86400))
        minute, second = divmod(second, 60)
        return "%sT%02d:%02d:%02dZ" % (date, minute // 60, minute % 60, second)  # noqa: UP031 - the fastest
    return format_time(ts, "%Y-%m-%dT%H:%M:%SZ")


_DATES: dict[int, str] = {}  # days since the epoch -> their date (bounded)

ISO_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_OMIT_MICROSECONDS
"""orjson's options that write a datetime as `iso()` writes its time."""


def iso_value(ts: float | None) -> datetime | str | None:
    """A time for orjson to write (with ISO_OPTIONS) exactly as `iso()` would, in C: a datetime where the calendar
    shows the year in four digits, `iso()`'s own text elsewhere."""
    if ts is None:
        return None
    if FOUR_DIGIT_YEARS[0] <= ts <= FOUR_DIGIT_YEARS[1]:
        try:
            return datetime.fromtimestamp(ts, UTC)
        except (OverflowError, ValueError, OSError):
            pass
    return iso(ts)


def short_time(ts: float | None) -> str:
    return "-" if ts is None else format_time(ts, "%Y-%m-%d %H:%M")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A CSV cell no spreadsheet evaluates: printable (control characters escaped) and, when it would start a
    formula, behind an apostrophe (OWASP's advice on CSV injection)."""
    text = clean("" if value is None else str(value), None)
    return "'" + text if text.startswith(_FORMULA) else text


# An `_` between two letters or digits can neither open nor close emphasis in CommonMark: left bare, so client IDs
# like `dcr_7f3a_x` read (and paste) as they are.
_MARKDOWN = re.compile(r"[\\`*\[\]<>&|!]|(?<![^\W_])_|_(?![^\W_])")


def md_code(value: str | None) -> str:
    """An identifier for a Markdown table cell: a code span, so it reads and pastes exactly as stored. The fence
    is longer than any run of backticks inside; `|` is escaped, as a table cell requires even in code."""
    text = clean(value, None).replace("|", "\\|")
    if not text:
        return ""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_cell(value: str | None) -> str:
    """Text for a Markdown table cell that renders as text: printable, and every character that could start
    HTML, a link, an image, emphasis, code or a new cell escaped (CommonMark backslash escapes)."""
    return _MARKDOWN.sub(lambda m: "\\" + m.group(0), clean(value, None))


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
