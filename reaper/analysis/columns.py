"""The clients `serve` keeps between ticks, one column a field: a client costs its key in a shared buffer and
about 90 bytes of arrays, where a kept ClientRow object graph cost about 640 bytes (docs/performance.md).

A tick reads a kept client back as a ClientRow rebuilt from the columns (`kept`), never the row the scan gave.
Values many clients share (a family's name, redirect URIs, software, subject; credential-count maps) are kept
once. The tables of shared values only grow: a state lives until the next full scan, which builds a new one.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from reaper.analysis.model import VERDICTS, ClientRow, Verdict

_NO_CREATED, _NO_USE, _DYNAMIC, _CIMD, _DISABLED, _FOREVER_ONLY = 1, 2, 4, 8, 16, 32
_VERDICT_NO = {v: i for i, v in enumerate(VERDICTS)}
_NO_PROBLEMS: list[str] = []  # shared by every rebuilt row without problems: rows are only read once kept
# The row's text fields (name, redirect_uris, software_id, software_version, subject, ip, ip_network), each a
# column of its own once a client has a value other than its default there.
_TEXT_DEFAULTS: tuple[Any, ...] = (None, (), None, None, None, None, None)
_NONE5 = (None,) * 5


class Keys:
    """Client keys by slot, in one UTF-8 buffer, found by their hash in an open-addressing table of slots: about 60
    bytes a 32-character key, where a dict of str to int with the str and int objects costs about 150."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")  # where each slot's key ends in the buffer
        self._hashes = array("q")
        self._table = array("i", [-1]) * 8  # slots by hash, linear probing; -1: empty
        self.dropped: set[int] = set()

    def __len__(self) -> int:
        return len(self._ends) - len(self.dropped)

    def slots(self) -> Iterator[int]:
        """Every kept slot."""
        dropped = self.dropped
        return (s for s in range(len(self._ends)) if s not in dropped)

    def find(self, key: str) -> int | None:
        h = hash(key)
        table, hashes, mask = self._table, self._hashes, len(self._table) - 1
        i = h & mask
        while (slot := table[i]) != -1:
            if hashes[slot] == h and slot not in self.dropped and self.key(slot) == key:
                return slot
            i = (i + 1) & mask
        return None

    def add(self, key: str) -> int:
        """A new slot for a key not kept (`find` gave None)."""
        slot = len(self._ends)
        self._blob += key.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._blob))
        h = hash(key)
        self._hashes.append(h)
        if 2 * len(self._ends) > len(self._table):
            self._table = array("i", [-1]) * (4 * len(self._table))
            for s in range(slot):
                self._place(s, self._hashes[s])
        self._place(slot, h)
        return slot

    def key(self, slot: int) -> str:
        start = self._ends[slot - 1] if slot else 0
        return self._blob[start : self._ends[slot]].decode("utf-8", "surrogatepass")

    def _place(self, slot: int, h: int) -> None:
        table, mask = self._table, len(self._table) - 1
        i = h & mask
        while table[i] != -1:
            i = (i + 1) & mask
        table[i] = slot


@dataclass(slots=True)
class Kept:
    """One kept client as a tick reads it: its row, family, verdict and latest refresh revocation (NaN: none)."""

    row: ClientRow
    family: str
    verdict: Verdict
    revoked: float


class Columns:
    """Kept clients by slot; `keys` finds a client's slot by its key. A dropped client's slot stays empty until
    the state is rebuilt (a deletion makes the next tick scan fully in any case)."""

    def __init__(self) -> None:
        self.keys = Keys()
        self._ids: list[str | None] | None = None  # the client_ids, once one is not its client's key
        self._texts: list[list[Any] | None] = [None] * len(_TEXT_DEFAULTS)
        self._created = array("d")
        self._used = array("d")
        self._revoked = array("d")
        self._credentials = array("q")
        self._family = array("i")
        self._verdict = array("b")
        self._flags = array("B")
        self._live = array("i")
        self._numbers = (
            self._created,
            self._used,
            self._revoked,
            self._credentials,
            self._family,
            self._verdict,
            self._flags,
            self._live,
        )
        self._problems: dict[int, list[str]] = {}
        self._families: list[str] = []
        self._family_no: dict[str, int] = {}
        self._lives: list[dict[str, int]] = [{}]  # 0: no live credential
        self._live_no: dict[tuple[tuple[str, int], ...], int] = {(): 0}
        self._rare_texts: int | None = None  # a text column past redirect_uris that exists (None: none yet)
        self._shared: dict[Any, Any] = {}  # text values many clients hold (a family's name), kept once

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, row: ClientRow, family: str, verdict: Verdict, revoked: float) -> int:
        """Keep a client not kept yet (a full scan gives each client once); its slot."""
        slot = self.keys.add(row.key)
        for column in self._numbers:
            column.append(0)
        for i, texts in enumerate(self._texts):
            if texts is not None:
                texts.append(_TEXT_DEFAULTS[i])
        if self._ids is not None:
            self._ids.append(None)
        self._write(slot, row, family, verdict, revoked)
        return slot

    def put(self, row: ClientRow, family: str, verdict: Verdict, revoked: float, slot: int | None = None) -> int:
        """Keep a client, replacing what was kept under its key (at `slot`, where the caller found it); its slot."""
        if slot is None:
            slot = self.keys.find(row.key)
        if slot is None:
            return self.append(row, family, verdict, revoked)
        self._write(slot, row, family, verdict, revoked)
        return slot

    def _write(self, slot: int, row: ClientRow, family: str, verdict: Verdict, revoked: float) -> None:
        created, used = row.created_at, row.last_used
        self._flags[slot] = (
            (_DYNAMIC if row.dynamic else 0)
            | (_CIMD if row.cimd else 0)
            | (_DISABLED if row.disabled else 0)
            | (_FOREVER_ONLY if row.live_forever_only else 0)
            | (_NO_CREATED if created is None else 0)
            | (_NO_USE if used is None else 0)
        )
        self._created[slot] = math.nan if created is None else created
        self._used[slot] = math.nan if used is None else used
        self._revoked[slot] = revoked
        self._credentials[slot] = row.total_credentials
        self._family[slot] = self._family_index(family)
        self._verdict[slot] = _VERDICT_NO[verdict]
        self._live[slot] = self._live_index(row.live)
        if row.client_id != row.key:
            if self._ids is None:
                self._ids = [None] * len(self._flags)
            self._ids[slot] = row.client_id
        elif self._ids is not None:
            self._ids[slot] = None
        shared, texts = self._shared, self._texts
        values = (
            row.name,
            row.redirect_uris,
            row.software_id,
            row.software_version,
            row.subject,
            row.ip,
            row.ip_network,
        )
        # Most rows have a name and redirect URIs and none of the rest: only the columns in use are walked.
        for i in range(2) if values[2:] == _NONE5 and self._rare_texts is None else range(len(values)):
            value, column = values[i], texts[i]
            if column is None:
                if value == _TEXT_DEFAULTS[i]:
                    continue
                column = texts[i] = [_TEXT_DEFAULTS[i]] * len(self._flags)
                if i >= 2:
                    self._rare_texts = i
            column[slot] = shared.setdefault(value, value)
        if row.problems:
            self._problems[slot] = list(row.problems)
        else:
            self._problems.pop(slot, None)

    def drop(self, key: str) -> int | None:
        """Forget a client; its former slot (None if it was not kept)."""
        slot = self.keys.find(key)
        if slot is not None:
            self.keys.dropped.add(slot)
            self._problems.pop(slot, None)
        return slot

    def judged(self, slot: int, family: str, verdict: Verdict) -> None:
        """Record a kept client's family and verdict as judged again."""
        self._family[slot] = self._family_index(family)
        self._verdict[slot] = _VERDICT_NO[verdict]

    def row(self, slot: int) -> ClientRow:
        """The kept client's row, rebuilt."""
        key = self.keys.key(slot)
        name, uris, software_id, software_version, subject, ip, network = self._texts
        flags = self._flags[slot]
        cid = None if self._ids is None else self._ids[slot]
        return ClientRow(
            key,
            key if cid is None else cid,
            None if flags & _NO_CREATED else self._created[slot],
            None if name is None else name[slot],
            () if uris is None else uris[slot],
            None if software_id is None else software_id[slot],
            None if software_version is None else software_version[slot],
            None if subject is None else subject[slot],
            None if ip is None else ip[slot],
            None if network is None else network[slot],
            bool(flags & _DYNAMIC),
            bool(flags & _CIMD),
            bool(flags & _DISABLED),
            self._lives[self._live[slot]],
            bool(flags & _FOREVER_ONLY),
            self._credentials[slot],
            None if flags & _NO_USE else self._used[slot],
            self._problems.get(slot, _NO_PROBLEMS),
        )

    def kept(self, slot: int) -> Kept:
        """The kept client: row, family, verdict, revocation."""
        return Kept(self.row(slot), self.family(slot), VERDICTS[self._verdict[slot]], self._revoked[slot])

    def family(self, slot: int) -> str:
        return self._families[self._family[slot]]

    def created(self, slot: int) -> float | None:
        return None if self._flags[slot] & _NO_CREATED else self._created[slot]

    def times(self, slot: int) -> tuple[float | None, float | None, float]:
        """Registration, last credential activity, latest refresh revocation (NaN: none)."""
        flags = self._flags[slot]
        return (
            None if flags & _NO_CREATED else self._created[slot],
            None if flags & _NO_USE else self._used[slot],
            self._revoked[slot],
        )

    def credentials(self, slot: int) -> int:
        return self._credentials[slot]

    def _family_index(self, family: str) -> int:
        n = self._family_no.get(family)
        if n is None:
            n = self._family_no[family] = len(self._families)
            self._families.append(family)
        return n

    def _live_index(self, live: dict[str, int]) -> int:
        if not live:
            return 0
        items = tuple(live.items())
        n = self._live_no.get(items)
        if n is None:
            n = self._live_no[items] = len(self._lives)
            self._lives.append(dict(live))
        return n
