"""Reading a key-value store the way a profile describes it: the credential index (which clients a live
credential references, and every entry that references each client) and the client rows.

A key-value store has no joins and no order: the credential collections are read first into an index by client
key, then the client collection, and the rows are sorted newest first in memory (about half a kilobyte a
client).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from reaper.analysis.loops import RevokedIndex
from reaper.analysis.model import ClientRow
from reaper.backends.kv.codec import Codec, Entry, RawEntry
from reaper.backends.kv.evaluate import Evaluator, column, to_epoch
from reaper.backends.kv.store import Store
from reaper.profiles import BoundProfile, CredentialMap


@dataclass(slots=True)
class Refs:
    """What references one client: live credentials by kind, how many credentials, the newest, the entries."""

    live: dict[str, int] = field(default_factory=dict)
    total: int = 0
    last: float | None = None
    entries: list[tuple[str, RawEntry]] = field(default_factory=list)  # (credential name, entry), when kept


def collections(profile: BoundProfile) -> list[str]:
    """Every collection a profile reads: the clients' and each credential's."""
    names = [profile.client.table, *(c.table for c in profile.scan_credentials)]
    return list(dict.fromkeys(names))


class Reader:
    """Decodes a store's entries for one profile, one clock and one key."""

    def __init__(self, store: Store, codec: Codec, profile: BoundProfile, now: float):
        self.store = store
        self.codec = codec
        self.profile = profile
        self.now = now
        self.eval = Evaluator(now, profile.options)

    def decoded(self, collections: str | list[str]) -> Iterator[Entry]:
        """The entries of these collections, decoded, collection after collection (one pass over Redis)."""
        for raw in self.store.entries([collections] if isinstance(collections, str) else collections):
            entry = self.codec.decode(raw)
            if entry.value is not None:
                entry.key = self.store.key_of(raw, entry.value)
                entry.doc["$key"] = entry.key
            yield entry

    def index(self, keep_entries: bool = False) -> tuple[dict[str, Refs], int]:
        """Client key -> Refs, and how many credential entries could not be read (their client is unknown)."""
        refs: dict[str, Refs] = {}
        unreadable = 0
        owners: dict[str, dict[str, str]] = {}  # credential name -> entry key -> client key (for `via`)
        creds = self.profile.scan_credentials
        wanted = {c.via for c in creds if c.via is not None}
        by_table: dict[str, list[CredentialMap]] = {}
        # Credentials that reference the client first: a `via` credential needs their keys.
        for cred in sorted(creds, key=lambda c: c.via is not None):
            by_table.setdefault(cred.table, []).append(cred)
        for entry in self.decoded(list(by_table)):
            for cred in by_table[entry.raw.collection]:
                if entry.value is None:
                    unreadable += cred.via is None  # a mapping that cannot be read keeps nothing alive
                    continue
                ref = column(entry.doc, cred.ref)
                if ref is None:
                    continue
                if cred.via is not None:
                    client = owners.get(cred.via, {}).get(str(ref))
                    if client is not None and keep_entries:
                        refs.setdefault(client, Refs()).entries.append((cred.name, entry.raw))
                    continue
                if cred.exclude is not None and self.eval.holds(cred.exclude, entry.doc):
                    continue
                r = refs.setdefault(str(ref), Refs())
                if keep_entries:
                    r.entries.append((cred.name, entry.raw))
                if cred.name in wanted and entry.key is not None:
                    owners.setdefault(cred.name, {})[entry.key] = str(ref)
                if entry.expired(self.now):
                    continue  # absent as far as py-key-value (and so the server) is concerned
                self._count(cred, entry, r)
        return refs, unreadable

    def _count(self, cred: CredentialMap, entry: Entry, r: Refs) -> None:
        if cred.kind != "login":
            r.total += 1
        live = self.eval.holds(cred.live, entry.doc) if cred.live is not None else cred.kind != "consent"
        if live:
            r.live[cred.kind] = r.live.get(cred.kind, 0) + 1
        if cred.issued_at is not None and cred.issued_at.column:
            at = to_epoch(column(entry.doc, cred.issued_at.column), cred.issued_at.encoding)
            if at is not None and (r.last is None or at > r.last):
                r.last = at


class RowBuilder:
    """A client entry as a ClientRow; bad data becomes a problem, never an exception."""

    def __init__(self, profile: BoundProfile, evaluator: Evaluator, now: float, skew: float):
        self.profile = profile
        self.eval = evaluator
        self.now = now
        self.skew = skew

    def row(self, entry: Entry, refs: dict[str, Refs], unreadable: int) -> ClientRow:
        cm = self.profile.client
        if entry.value is None:
            where = entry.key or entry.raw.where
            return ClientRow(where, where, entry.created_at, problems=[f"{entry.raw.where}: {entry.problem}"])
        doc = entry.doc
        key = column(doc, cm.key)
        client_id = column(doc, cm.client_id)
        problems: list[str] = []
        if key is None or client_id is None:
            problems.append(f"{entry.raw.where}: no {cm.key if key is None else cm.client_id}")
        key_s = str(key if key is not None else entry.raw.where)
        created = None
        if cm.created_at is not None and cm.created_at.column:
            raw_created = column(doc, cm.created_at.column)
            created = to_epoch(raw_created, cm.created_at.encoding)
            if created is None and raw_created is not None:
                problems.append(f"{cm.created_at.column}: unreadable time {str(raw_created)[:40]!r}")
            elif created is None and cm.created_at.null != "unknown":
                problems.append(f"{cm.created_at.column}: no registration time")
            elif created is not None and created > self.now + self.skew:
                problems.append(f"{cm.created_at.column}: registration time is in the future")
        out = ClientRow(key_s, str(client_id if client_id is not None else key_s), created, problems=problems)
        for name, f in cm.fields():
            if name == "created_at" or f.column is None:
                continue
            value = column(doc, f.column)
            if name == "redirect_uris":
                if isinstance(value, list):
                    out.redirect_uris = tuple(str(v) for v in value if v is not None)
                elif isinstance(value, str):
                    out.redirect_uris = tuple(value.split(",") if f.format == "comma" else value.split())
                elif value is not None:
                    problems.append(f"{f.column}: redirect URIs unreadable")
            elif value is not None:
                setattr(out, name, value if isinstance(value, str) else str(value))
        for flag, cond in cm.flags():
            setattr(out, flag, self.eval.holds(cond, doc))
        found = refs.get(key_s)
        if found is not None:
            out.live = dict(found.live)
            out.total_credentials = found.total
            out.last_used = found.last
        if unreadable:
            problems.append(f"{unreadable} credential entries unreadable: whether this client is live is unknown")
        return out


class KvScan:
    """A ScanSource over one key-value store: the index first, then the clients, newest first."""

    def __init__(self, reader: Reader, profile: BoundProfile, skew: float, description: str):
        self.reader = reader
        self.profile = profile
        self.skew = skew
        self.profile_name = profile.name
        self.description = description
        self.has_ips = False
        self.now = reader.now
        self.forever_fix = ""  # every credential the proxy keeps expires
        self._rows: list[ClientRow] | None = None

    def _load(self) -> list[ClientRow]:
        if self._rows is None:
            refs, unreadable = self.reader.index()
            build = RowBuilder(self.profile, self.reader.eval, self.reader.now, self.skew)
            rows = [
                build.row(entry, refs, unreadable)
                for entry in self.reader.decoded(self.profile.client.table)
                if not entry.expired(self.reader.now)
            ]
            rows.sort(key=lambda r: r.key, reverse=True)
            rows.sort(key=lambda r: (r.created_at is None, -(r.created_at or 0.0)))
            self._rows = rows
        return self._rows

    def count(self) -> int:
        return len(self._load())

    def revoked(self, since: float) -> RevokedIndex | None:
        return None  # rotation and revocation delete refresh entries: the store keeps no trace of either

    def rows(self) -> Iterator[ClientRow]:
        yield from self._load()

    def registration_times(self) -> Iterator[float]:
        return (r.created_at for r in self._load() if r.created_at is not None)


def sample_problems(reader: Reader, per_collection: int = 20) -> list[str]:
    """A look at the first entries of each collection: does the store hold what the profile describes?"""
    problems: list[str] = []
    cm = reader.profile.client
    wanted: dict[str, list[str]] = {cm.table: [cm.client_id]}
    for cred in reader.profile.scan_credentials:
        wanted.setdefault(cred.table, []).append(cred.ref)
    for collection, fields in wanted.items():
        for n, entry in enumerate(reader.decoded(collection)):
            if n >= per_collection:
                break
            if entry.value is None:
                continue
            missing = [f for f in fields if not f.startswith("$") and f not in entry.value]
            if missing:
                problems.append(
                    f"collection '{collection}': entry {entry.raw.where} has no field '{missing[0]}' "
                    f"(profile '{reader.profile.name}')"
                )
                break
    return problems


def describe_entry(item: dict[str, Any]) -> str:
    return f"{item['collection']}/{item['key'] or item['where']}"
