"""Decoding stored values the way the servers' own libraries read them, never giving up a whole scan.

JSON may hold `NaN` and `Infinity` (Python's `json` writes them; Authlib stores client metadata with it); text may
hold bytes that are not UTF-8 (SQLite stores what it is given); times may be out of any calendar; a field may be
megabytes long. Each becomes a value, a bounded value, or one problem on its row.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import orjson

# The latest time any output format can print (datetime's year 9999): later or earlier is out of range.
MAX_EPOCH = 253402300799.0
MIN_EPOCH = -62135596800.0
_SURROGATES = re.compile("[\udc80-\udcff]")
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def invalid_text(value: str) -> bool:
    """True for text that came from bytes that were not UTF-8."""
    return not value.isascii() and _SURROGATES.search(value) is not None


def to_epoch(value: Any, encoding: str | None) -> float | None:
    """Seconds since the epoch from a stored time, whatever its encoding; ValueError when out of range."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return float(value.timestamp())
        except (OverflowError, ValueError, OSError):
            raise ValueError("time out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return to_epoch(parsed, encoding)
    number = float(value)
    number = number / 1000 if encoding == "epoch_ms" else number
    if not MIN_EPOCH <= number <= MAX_EPOCH:  # NaN fails too
        raise ValueError("time out of range")
    return number


def parse_json(text: str | bytes) -> Any:
    """JSON as the servers' own libraries read it: `NaN`, `Infinity` and `-Infinity` allowed."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # the slow path, only for what orjson refuses


def parse_json_prefix(text: str) -> Any:
    """The members of a JSON object or array cut off at a length cap: every complete member, and the readable
    prefix of the one that was cut (a string keeps its beginning, an array its complete items)."""
    value, _ = _partial(text, _skip(text, 0))
    return value


def _skip(text: str, i: int) -> int:
    m = _WS.match(text, i)
    return m.end() if m else i


def _partial(text: str, i: int) -> tuple[Any, int]:
    if i >= len(text):
        return None, i
    try:
        return _DECODER.raw_decode(text, i)
    except ValueError:
        pass
    first = text[i]
    if first == '"':
        return _partial_string(text[i + 1 :]), len(text)
    if first == "[":
        items: list[Any] = []
        i += 1
        while True:
            i = _skip(text, i)
            if i >= len(text) or text[i] == "]":
                return items, i
            if text[i] == ",":
                i += 1
                continue
            item, j = _partial(text, i)
            if j >= len(text):  # cut inside this item: a cut string (a URI) would mislead, so it is dropped
                if isinstance(item, list | dict):
                    items.append(item)
                return items, j
            items.append(item)
            i = j
    if first == "{":
        obj: dict[str, Any] = {}
        i += 1
        while True:
            i = _skip(text, i)
            if i >= len(text) or text[i] != '"':
                if i < len(text) and text[i] == ",":
                    i += 1
                    continue
                return obj, len(text)
            try:
                key, i = scanstring(text, i + 1)
            except ValueError:
                return obj, len(text)
            i = _skip(text, i)
            if i >= len(text) or text[i] != ":":
                return obj, len(text)
            value, i = _partial(text, _skip(text, i + 1))
            if value is not None or i < len(text):
                obj[key] = value
            if i >= len(text):
                return obj, i
    return None, len(text)


def _partial_string(rest: str) -> str:
    """The readable beginning of a JSON string body cut short (an escape cut in half is dropped)."""
    for trim in range(0, 7):
        body = rest[: len(rest) - trim] if trim else rest
        if body.endswith("\\") and not body.endswith("\\\\"):
            continue
        try:
            value, _ = scanstring(body + '"', 0)
        except ValueError:
            continue
        return str(value)
    return ""
