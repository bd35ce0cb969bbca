"""Times in reports: `iso()`'s fast path shows what datetime shows, and orjson writing `iso_value()` with
ISO_OPTIONS (the JSON report's client records) writes exactly `iso()`'s text, around every rounding edge."""

from __future__ import annotations

import random

import orjson
import pytest

from reaper.output.text import ISO_OPTIONS, OUT_OF_RANGE, format_time, iso, iso_value

EDGES = [
    -30610224000.0,  # 1000-01-01, the first four-digit year
    -30610224000.5,
    253402300799.0,  # 9999-12-31 23:59:59
    253402300799.9999995,
    0.0,
    -0.0000004,
    -0.0000005,
    1e-7,
    1764547199.9999995,  # half a microsecond before a second
    1764547199.9999994,
    1764547199.9999996,
    -62135596800.0,  # year 1
    -1e15,
    1e15,
]


def _times() -> list[float]:
    rng = random.Random(7)
    out = list(EDGES)
    for _ in range(100_000):
        whole = rng.randrange(-30610224000, 253402300800)
        out.append(whole + rng.choice([0.0, 0.5, 0.9999995, 0.9999994, 0.9999996, 0.0000005, rng.random()]))
        out.append(whole - rng.random() * 1e-6)
    return out


@pytest.mark.parametrize("chunk", range(4))
def test_orjson_writes_iso_value_as_iso_writes_the_time(chunk: int):
    times = _times()[chunk::4]
    for t in times:
        assert orjson.dumps(iso_value(t), option=ISO_OPTIONS).decode() == f'"{iso(t)}"', t
    assert iso(None) is None and iso_value(None) is None


def test_iso_shows_what_datetime_shows():
    for t in _times()[::5]:
        assert iso(t) == format_time(t, "%Y-%m-%dT%H:%M:%SZ"), t
    assert iso(1e15) == OUT_OF_RANGE
