"""Acting on a key-value store: per batch, a re-check of every client at the store right before its delete
(S2), its tombstone committed before anything is deleted (S5), the client and every entry that references it
deleted through py-key-value, and restore that writes the stored bytes back.

A key-value store has no transactions across keys and no compare-and-delete that can see inside an encrypted
value: the re-check reads every credential collection once per batch, the tombstones are written `pending`
and marked `done` after the deletes, and a credential written in the moment between re-check and delete is
caught by the runner's late-credential sweep (`live_now`), which puts the client back.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from reaper.backends.base import BatchOutcome, Candidate
from reaper.backends.kv.codec import Codec, RawEntry
from reaper.backends.kv.evaluate import Evaluator
from reaper.backends.kv.scan import Reader, Refs, RowBuilder
from reaper.backends.kv.store import Store, item_of
from reaper.config import PolicyConfig
from reaper.errors import RestoreConflict
from reaper.ledger import Ledger, Tombstone
from reaper.profiles import BoundProfile

PAYLOAD = "py-key-value"


class KvActor:
    """Reaps through one store; the ledger is a SQL database of its own."""

    batches_at_once = 1  # one event loop and one store client

    def __init__(
        self, store: Store, codec: Codec, profile: BoundProfile, ledger: Ledger, policy: PolicyConfig, skew: float
    ):
        self.store = store
        self.codec = codec
        self.profile = profile
        self.ledger = ledger
        self.pol = policy
        self.skew = skew

    def close(self) -> None:
        """The store belongs to the backend."""

    def _reader(self) -> Reader:
        return Reader(self.store, self.codec, self.profile, time.time())

    def _clients(self, keys: Sequence[str]) -> list[RawEntry | None]:
        return self.store.fetch(self.profile.client.table, keys, [None] * len(keys))

    def _still_dead(self, c: Candidate, raw: RawEntry | None, refs: dict[str, Refs], reader: Reader) -> str | None:
        """Why this client must be left alone now (None: it may go)."""
        if raw is None:
            return "gone"
        entry = self.codec.decode(raw)
        if entry.value is None:
            return "changed_since_scan"
        entry.key = c.key
        entry.doc["$key"] = c.key
        row = RowBuilder(self.profile, Evaluator(reader.now, self.profile.options), reader.now, self.skew).row(
            entry, refs, 0
        )
        if row.client_id != c.client_id or row.problems or row.cimd or not row.dynamic:
            return "changed_since_scan"
        if row.live or row.created_at is None or row.created_at > reader.now - self.pol.min_age:
            return "changed_since_scan"
        return None

    def act(self, batch: Sequence[Candidate], run_id: str) -> BatchOutcome:
        outcome = BatchOutcome()
        todo = [c for c in batch if c.action == "delete"]
        outcome.skipped["unsupported_action"] += len(batch) - len(todo)
        if not todo:
            return outcome
        # The re-check (S2): the credential collections and each client, read now.
        reader = self._reader()
        refs, unreadable = reader.index(keep_entries=True)
        clients = self._clients([c.key for c in todo])
        acting: list[tuple[Candidate, RawEntry, list[tuple[str, RawEntry]]]] = []
        for c, raw in zip(todo, clients, strict=True):
            why = "changed_since_scan" if unreadable else self._still_dead(c, raw, refs, reader)
            if why is not None or raw is None:
                outcome.skipped[why or "gone"] += 1
                continue
            # An entry whose key cannot be told (a file whose name and contents disagree) is never touched.
            acting.append((c, raw, [(n, d) for n, d in refs.get(c.key, Refs()).entries if d.key is not None]))
        if not acting:
            return outcome
        # Tombstones first, committed (S5): the client's entry and every entry that references it, as stored.
        by_collection: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        for _, _, deps in acting:
            for _, dep in deps:
                by_collection[dep.collection].append((dep.key or "", dep.where))
        fresh: dict[str, RawEntry] = {}
        for collection, pairs in by_collection.items():
            got = self.store.fetch(collection, [k for k, _ in pairs], [w for _, w in pairs])
            fresh.update({r.where: r for r in got if r is not None})
        rows = []
        for c, raw, deps in acting:
            items = [item_of(raw)] + [item_of(fresh[d.where]) for _, d in deps if d.where in fresh]
            payload: dict[str, Any] = {"store": PAYLOAD, "kind": self.store.kind, "entries": items}
            rows.append(
                self.ledger.tombstone_row(
                    run_id, c.key, c.client_id, c.action, c.verdict, c.reason, c.family, payload, "pending"
                )
            )
        with self.ledger.begin() as lconn:
            self.ledger.add_tombstones(lconn, rows)
        # The deletes: the clients first (a crash after it leaves a tombstone whose client is gone: `done`),
        # then what referenced them.
        groups: list[tuple[str, list[str]]] = [(self.profile.client.table, [c.key for c, _, _ in acting])]
        deps_by: dict[str, list[str]] = defaultdict(list)
        for _, _, deps in acting:
            for _, d in deps:
                if d.where in fresh and d.key is not None:
                    deps_by[d.collection].append(d.key)
        deps_by = {collection: list(dict.fromkeys(keys)) for collection, keys in deps_by.items()}
        groups += [(collection, keys) for collection, keys in deps_by.items()]
        try:
            self.store.delete(groups)
        finally:
            gone = {c.key for c, r in zip(todo, self._clients([c.key for c in todo]), strict=True) if r is None}
            done = [c for c, _, _ in acting if c.key in gone]
            if done:
                self.ledger.set_state(run_id, [c.key for c in done], "done")
            left = [c.key for c, _, _ in acting if c.key not in gone]
            if left:
                self.ledger.set_state(run_id, left, "void")
        outcome.done = done
        outcome.skipped["gone"] += len(acting) - len(done)
        return outcome

    def recover(self) -> int:
        """Tombstones a crash left `pending`: done when the client is gone, void when it is still there."""
        pending = self.ledger.pending()
        if not pending:
            return 0
        present = self._clients([key for _, key, _ in pending])
        states = {
            tid: ("void" if raw is not None else "done") for (tid, _, _), raw in zip(pending, present, strict=True)
        }
        self.ledger.settle(states)
        return len(pending)

    def live_now(self, keys: Sequence[str]) -> list[str]:
        refs, _ = self._reader().index()
        return [k for k in keys if k in refs and refs[k].live]

    def restore(self, tombs: Sequence[Tombstone]) -> int:
        """Write every tombstoned entry back as stored (the client first, as the proxy reads it first)."""
        for tomb in tombs:
            if tomb.payload.get("store") != PAYLOAD or tomb.payload.get("kind") != self.store.kind:
                raise RestoreConflict(f"tombstone {tomb.id} was not written from a {self.store.kind} store")
        for tomb in tombs:  # every conflict found before anything is written
            for item in tomb.payload["entries"]:
                self.store.put_back(item, dry=True)
        count = 0
        for tomb in tombs:
            for item in tomb.payload["entries"]:
                if self.store.put_back(item) == "put":
                    count += 1
            with self.ledger.begin() as lconn:
                self.ledger.mark_restored(lconn, [tomb])
        return count
