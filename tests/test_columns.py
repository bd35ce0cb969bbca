"""The columns `serve` keeps clients in between ticks give back exactly the rows they were given."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.analysis.columns import Columns, Keys
from reaper.analysis.model import VERDICTS, ClientRow

_text = st.one_of(st.none(), st.sampled_from(["App", "App 2", "", "ñ"]), st.text(max_size=8))
_time = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64))
_rows = st.builds(
    ClientRow,
    key=st.sampled_from([f"k{i}" for i in range(12)]),
    client_id=st.sampled_from(["k0", "k1", "other", "ü"]),
    created_at=_time,
    name=_text,
    redirect_uris=st.lists(st.sampled_from(["http://127.0.0.1:1/cb", "https://x/cb"]), max_size=2).map(tuple),
    software_id=_text,
    software_version=_text,
    subject=_text,
    ip=st.one_of(st.none(), st.sampled_from(["10.0.0.1", "2001:db8::1"])),
    ip_network=st.one_of(st.none(), st.sampled_from(["10.0.0.0/24"])),
    dynamic=st.booleans(),
    cimd=st.booleans(),
    disabled=st.booleans(),
    live=st.dictionaries(st.sampled_from(["access", "refresh", "code"]), st.integers(1, 3), max_size=3),
    live_forever_only=st.booleans(),
    total_credentials=st.integers(0, 2**40),
    last_used=_time,
    problems=st.lists(st.sampled_from(["created_at: in the future", "name: not valid UTF-8"]), max_size=2),
)
_puts = st.tuples(
    _rows,
    st.sampled_from(["fam-a", "fam-b", "fam-c"]),
    st.sampled_from(VERDICTS),
    st.one_of(st.just(float("nan")), st.floats(0, 2e9)),
)


def _same(kept: ClientRow, given: ClientRow) -> None:
    assert kept == dataclasses.replace(given, revoked_at=None)
    assert list(kept.live.items()) == list(given.live.items())  # the order decides a live client's reason


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_puts, st.sampled_from([f"k{i}" for i in range(12)])), max_size=40))
def test_columns_give_back_what_they_were_given(ops: list[object]) -> None:
    """Puts, re-puts and drops in any order: every kept client reads back as last put, family, verdict and
    revocation included; a dropped one is gone."""
    cols, expected = Columns(), {}
    for op in ops:
        if isinstance(op, str):
            assert (cols.drop(op) is not None) == (op in expected)
            expected.pop(op, None)
            continue
        assert isinstance(op, tuple)
        row, family, verdict, revoked = op
        cols.put(row, family, verdict, revoked)
        expected[row.key] = op
    assert len(cols) == len(expected)
    for key, (row, family, verdict, revoked) in expected.items():
        kept = cols.kept(cols.keys.find(key))
        _same(kept.row, row)
        assert (kept.family, kept.verdict) == (family, verdict)
        assert kept.revoked == revoked or (math.isnan(kept.revoked) and math.isnan(revoked))
        assert cols.times(cols.keys.find(key))[:2] == (row.created_at, row.last_used)


def test_a_rejudged_client_keeps_its_row_and_shared_values_are_kept_once() -> None:
    cols = Columns()
    name = "Claude Code"
    uris = ("http://127.0.0.1:1/cb",)
    a = cols.put(ClientRow("a", "a", 1.0, "".join(["Claude ", "Code"]), uris), "f", VERDICTS[0], 0)
    b = cols.put(ClientRow("b", "b", 2.0, "".join(["Claude ", "Code"])), "f", VERDICTS[0], 0)
    assert cols.row(a).name == name and cols.row(a).name is cols.row(b).name
    assert cols.row(b).redirect_uris == ()  # a column made after b's slot existed still reads b's default
    cols.judged(a, "g", VERDICTS[2])
    assert (cols.family(a), cols.kept(a).verdict) == ("g", VERDICTS[2])
    assert cols.row(a).redirect_uris == ("http://127.0.0.1:1/cb",)


def test_keys_are_found_by_key_after_growth_drops_and_returns() -> None:
    """Thousands of keys (the table grows several times, neighbours collide), text no ASCII table holds, a key the
    database gave as invalid UTF-8 (a surrogate escape), and a dropped key registered again."""
    keys = Keys()
    names = [f"client-{i}" for i in range(5000)] + ["ключ", "🔑", "bad-\udcff", ""]
    slots = {name: keys.add(name) for name in names}
    assert len(keys) == len(names) and sorted(slots.values()) == list(range(len(names)))
    assert all(keys.find(name) == slot and keys.key(slot) == name for name, slot in slots.items())
    assert keys.find("client-5000") is None and keys.find("bad-") is None
    keys.dropped.add(slots["client-7"])
    assert keys.find("client-7") is None and len(keys) == len(names) - 1
    again = keys.add("client-7")
    assert keys.find("client-7") == again != slots["client-7"]
    assert slots["client-7"] not in set(keys.slots()) and again in set(keys.slots())
