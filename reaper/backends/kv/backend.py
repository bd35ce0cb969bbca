"""The key-value backend: a store that py-key-value writes (FastMCP's OAuthProxy: Redis, or its encrypted file
tree), read and acted on the way a `[store] kind = "kv"` profile describes it.

The store is only read by `check`, `report` and `plan` (S1: no lock, no ledger, no write of any kind). Acting
takes a lock that works for the store, keeps its ledger in a SQL database (`ledger.url`, else a SQLite file:
beside the file tree, or under $XDG_DATA_HOME/dcr-reaper/ for Redis) and deletes through py-key-value.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.engine import Engine

from reaper.backends.base import Actor, Candidate, Finding, RunLock
from reaper.backends.kv.actor import KvActor
from reaper.backends.kv.codec import Codec
from reaper.backends.kv.keys import KeyMaterial, key_material
from reaper.backends.kv.lock import FileLock, RedisLock
from reaper.backends.kv.scan import KvScan, Reader, Refs, collections, sample_problems
from reaper.backends.kv.store import FileTreeKv, RedisKv, Store, open_store
from reaper.backends.ledger_check import ledger_findings
from reaper.config import Config
from reaper.db import DatabaseImpl, abort_connections, make_engine, parse_url, redact
from reaper.errors import ConfigError, DatabaseError
from reaper.ledger import Ledger
from reaper.profiles import BoundProfile


class KvBackend:
    """One key-value store behind the backend seam."""

    def __init__(self, config: Config, profile: BoundProfile):
        if not config.database_url:
            raise ConfigError(
                "database_url is not set: redis://HOST:PORT/DB, or the file tree's directory "
                "(--database-url, DCR_REAPER_DATABASE_URL or the config file)"
            )
        if config.scan_database_url is not None:
            raise ConfigError(
                f"scan_database_url: profile '{profile.name}' reads a key-value store, which is scanned where it "
                "is (a scan replica is for SQL databases); unset scan_database_url"
            )
        self.config = config
        self.profile = profile
        self.keys: KeyMaterial = key_material(config.fastmcp)
        self.store: Store = open_store(config.database_url, self.keys.fingerprint)
        if self.store.kind not in profile.profile.database:
            raise ConfigError(
                f"profile '{profile.name}' reads {', '.join(profile.profile.database)}, not {self.store.kind}"
            )
        self.description = self.store.description
        self._engine: Engine | None = None

    def _reader(self, now: float) -> Reader:
        return Reader(self.store, Codec(self.keys.fernet), self.profile, now)

    def check(self, deep: bool = False) -> list[Finding]:
        """Reachable, the key decrypts it, and its first entries are what the profile describes; with `deep`,
        where the ledger lives."""
        self.store.ping()
        reader = self._reader(time.time())
        problems = sample_problems(reader)
        codec = reader.codec
        if codec.encrypted_without_key:
            raise ConfigError(
                f"{self.description} holds encrypted values: give the server's key material "
                "(fastmcp.jwt_signing_key, fastmcp.upstream_client_secret or fastmcp.storage_key, or *_file)"
            )
        if codec.undecryptable and not codec.decrypted:
            raise ConfigError(f"{self.keys.source} does not decrypt {self.description}: wrong key?")
        findings = [Finding("error", "schema", p) for p in problems]
        if deep:
            findings += self._ledger_findings()
        return findings

    def _ledger_findings(self) -> list[Finding]:
        url = self.config.ledger.url or self.store.default_ledger_url()
        try:
            engine = make_engine(url, readonly=True)  # read-only: `check` never creates the ledger
        except DatabaseError:  # a SQLite ledger that does not exist yet
            return [Finding("info", "ledger", f"no ledger yet at {self.ledger_description}: the first reap creates it")]
        try:
            return ledger_findings(Ledger(engine, self.config.ledger), self.ledger_description)
        finally:
            engine.dispose()

    def now(self) -> float:
        return self.store.now()

    @contextmanager
    def scan(self, now: float | None = None) -> Iterator[KvScan]:
        at = self.now() if now is None else now
        yield KvScan(self._reader(at), self.profile, self.config.classify.clock_skew, self.description)

    def lock(self) -> RunLock:
        name = f"dcr-reaper/{self.store.kind}/{self.description}/{self.config.ledger.prefix}"
        if isinstance(self.store, RedisKv):
            return RedisLock(self.store.lock_target(), name, f"dcr-reaper:lock:{self.config.ledger.prefix}")
        assert isinstance(self.store, FileTreeKv)
        return FileLock(self.store.lock_target(), name)

    def _ledger_engine(self) -> Engine:
        if self._engine is None:
            url = self.config.ledger.url or self.store.default_ledger_url()
            # The ledger is the reaper's own: a SQLite file is made on first use (acting), never by a report.
            DatabaseImpl.for_url(parse_url(url)).create_database(parse_url(url))
            self._engine = make_engine(url, readonly=False)
        return self._engine

    def ledger(self) -> Ledger:
        return Ledger(self._ledger_engine(), self.config.ledger)

    def actor(self) -> Actor:
        return KvActor(
            self.store,
            Codec(self.keys.fernet),
            self.profile,
            self.ledger(),
            self.config.policy,
            self.config.classify.clock_skew,
        )

    def statements(self, batch: Sequence[Candidate]) -> list[str]:
        """What deleting this batch would delete, entry by entry (read-only)."""
        refs, _ = self._reader(time.time()).index(keep_entries=True)
        verb = "DEL" if self.store.kind == "redis" else "unlink"
        client_table = self.profile.client.table
        out = []
        for c in batch:
            where = self.store.fetch(client_table, [c.key], [None])[0]
            out.append(f"{verb} {where.where if where else c.key}")
            out += [f"{verb} {d.where}" for _, d in refs.get(c.key, Refs()).entries if d.key is not None]
        return out

    def ping(self) -> None:
        self.store.ping()

    def close(self) -> None:
        self.store.close()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def interrupt(self) -> None:
        """Cut the ledger's connections; a Redis call is bounded by its socket timeout already."""
        if self._engine is not None:
            abort_connections(self._engine)

    @property
    def ledger_description(self) -> str:
        url = self.config.ledger.url or self.store.default_ledger_url()
        return redact(url)


__all__ = ["KvBackend", "collections"]
