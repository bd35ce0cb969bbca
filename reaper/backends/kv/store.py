"""The two stores FastMCP's OAuthProxy keeps its state in, opened from `database_url`:

- `redis://[user:password@]host:port/db` (`rediss://` for TLS): py-key-value's RedisStore layout, one Redis
  string per entry under `<collection>::<key>`, the envelope JSON as its value, its TTL as the key's expiry;
- a directory (or `file:///path`): FastMCP's default encrypted FileTreeStore, one JSON file per entry in a
  directory per collection, names sanitized by py-key-value's FileTreeV1 strategies. The path may be the store's
  own directory, or FastMCP's home (`FASTMCP_HOME`), where the key names the directory (`oauth-proxy/<fp>/`).

Where py-key-value cannot do what the reaper needs, this module does it directly, and only that:
- enumerating keys: `RedisStore.keys()` makes one SCAN call and ignores the cursor (it misses keys), and
  FileTreeStore has no `keys()` at all; so a full SCAN loop with redis-py, and a directory listing;
- reading: the envelope's `created_at` and the stored bytes are not exposed by the library (see codec.py);
- restoring: `put()` re-stamps `created_at` and re-encrypts (a new Fernet token), so a restored client would look
  newly registered and not be byte-identical; the stored bytes go back as they were, with their expiry.
Deletes go through py-key-value's own `delete_many` (its compound keys, its file-name sanitizing and path checks).

py-key-value is asynchronous: each delete runs on a private event loop (`run_async`), inside this package only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from reaper.backends.kv.codec import RawEntry
from reaper.errors import ConfigError, DatabaseError, RestoreConflict

T = TypeVar("T")
SEPARATOR = "::"  # py-key-value's compound key: "<collection>::<key>"
FETCH = 500  # entries per round trip


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private event loop (a thread of its own if this one runs a loop)."""

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: list[Any] = []

    def worker() -> None:
        try:
            box.append((True, asyncio.run(main())))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.append((False, exc))

    thread = threading.Thread(target=worker, name="kv-async", daemon=True)
    thread.start()
    thread.join()
    ok, result = box[0]
    if not ok:
        raise result
    return result  # type: ignore[no-any-return]


class Store(Protocol):
    """What the key-value backend needs from a store."""

    kind: str  # "redis" or "filetree"
    description: str  # never a password

    def ping(self) -> None: ...

    def now(self) -> float:
        """The store's clock, epoch seconds (Redis: TIME; a file tree: this host's)."""
        ...

    def entries(self, collections: Sequence[str]) -> Iterator[RawEntry]:
        """Every entry of these collections, read-only, in no particular order."""
        ...

    def fetch(self, collection: str, keys: Sequence[str], where: Sequence[str | None]) -> list[RawEntry | None]:
        """These entries now (None: gone), with their expiry, for the re-check and the tombstones."""
        ...

    def key_of(self, raw: RawEntry, value: dict[str, Any] | None) -> str | None:
        """The entry's key (the file tree's sanitized names need the value to tell it)."""
        ...

    def delete(self, groups: Sequence[tuple[str, list[str]]]) -> int:
        """Delete (collection, keys) groups, in order, through py-key-value; return how many were there."""
        ...

    def put_back(self, item: dict[str, Any], dry: bool = False) -> str:
        """Put one tombstoned entry back as it was: 'put', 'same' (already there, identical) or 'expired';
        RestoreConflict when another entry is in its place. `dry`: only say which, write nothing."""
        ...

    def lock_target(self) -> Any: ...

    def default_ledger_url(self) -> str: ...

    def close(self) -> None: ...


def _as_bytes(value: object) -> bytes:
    """A Redis reply as bytes (the client is made without decode_responses: bytes as stored)."""
    return value if isinstance(value, bytes) else str(value).encode()


def item_of(raw: RawEntry) -> dict[str, Any]:
    """A tombstone's record of one entry: enough to put exactly these bytes back where they were."""
    return {
        "collection": raw.collection,
        "key": raw.key,
        "where": raw.where,
        "raw": base64.b64encode(raw.raw).decode("ascii"),
        "expire_at_ms": raw.expire_at_ms,
        "mtime_ns": raw.mtime_ns,
    }


# -- Redis ---------------------------------------------------------------------------------------------------


def redact_redis(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    netloc = f"{user}{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisKv:
    """A Redis database holding py-key-value RedisStore entries."""

    kind = "redis"

    def __init__(self, url: str, timeout: float = 10.0):
        import redis

        self.url = url
        self.description = redact_redis(url)
        self._redis = redis
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise ConfigError(f"database_url: not a Redis URL ({exc})") from None
        kwargs = self.client.connection_pool.connection_kwargs
        self.host, self.port, self.db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._redis.RedisError as exc:
            raise DatabaseError(f"{what} on {self.description} failed: {type(exc).__name__}: {exc}") from None

    def ping(self) -> None:
        self._call("PING", self.client.ping)

    def now(self) -> float:
        try:
            seconds, micros = self.client.time()
        except self._redis.exceptions.NoPermissionError:
            return time.time()  # a user that may not run TIME: the store's times are then judged by this host's
        except self._redis.RedisError as exc:
            raise DatabaseError(f"TIME on {self.description} failed: {type(exc).__name__}: {exc}") from None
        return float(seconds) + float(micros) / 1e6

    def entries(self, collections: Sequence[str]) -> Iterator[RawEntry]:
        prefixes = {f"{c}{SEPARATOR}".encode(): c for c in collections}
        # One full SCAN loop (every cursor), sorting keys by collection: the library's keys() stops after one call.
        found: dict[str, list[bytes]] = {c: [] for c in collections}
        for rkey in self._call("SCAN", lambda: list(self.client.scan_iter(match="*", count=1000))):
            head, sep, _ = rkey.partition(SEPARATOR.encode())
            if sep and (collection := prefixes.get(head + sep)) is not None:
                found[collection].append(rkey)
        for collection in collections:
            keys = found[collection]
            for i in range(0, len(keys), FETCH):
                chunk = keys[i : i + FETCH]
                values = self._call("MGET", lambda chunk=chunk: self.client.mget(chunk))  # type: ignore[misc]
                for rkey, raw in zip(chunk, values, strict=True):
                    if raw is None:
                        continue  # expired or deleted since the SCAN
                    text = rkey.decode("utf-8", "replace")
                    yield RawEntry(collection, text.partition(SEPARATOR)[2], text, _as_bytes(raw))

    def fetch(self, collection: str, keys: Sequence[str], where: Sequence[str | None]) -> list[RawEntry | None]:
        out: list[RawEntry | None] = []
        names = [f"{collection}{SEPARATOR}{k}" for k in keys]
        for i in range(0, len(names), FETCH):
            chunk = names[i : i + FETCH]

            def read(chunk: list[str] = chunk) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for name in chunk:
                    pipe.get(name)
                    pipe.pttl(name)
                return list(pipe.execute())

            now_ms = int(time.time() * 1000)
            results = self._call("GET", read)
            for j, name in enumerate(chunk):
                raw, pttl = results[2 * j], results[2 * j + 1]
                if raw is None:
                    out.append(None)
                    continue
                expire = now_ms + int(pttl) if isinstance(pttl, int) and pttl >= 0 else None
                entry = RawEntry(collection, name.partition(SEPARATOR)[2], name, _as_bytes(raw), expire_at_ms=expire)
                out.append(entry)
        return out

    def key_of(self, raw: RawEntry, value: dict[str, Any] | None) -> str | None:
        return raw.key

    def delete(self, groups: Sequence[tuple[str, list[str]]]) -> int:
        from key_value.aio.stores.redis import RedisStore
        from redis.asyncio import Redis as AsyncRedis

        async def go() -> int:
            client = AsyncRedis.from_url(self.url, decode_responses=True)
            store = RedisStore(client=client)
            try:
                done = 0
                for collection, keys in groups:
                    if keys:
                        done += await store.delete_many(keys, collection=collection)
                return done
            finally:
                await client.aclose()

        try:
            return run_async(go)
        except self._redis.RedisError as exc:
            raise DatabaseError(f"delete on {self.description} failed: {type(exc).__name__}: {exc}") from None

    def put_back(self, item: dict[str, Any], dry: bool = False) -> str:
        name, raw = item["where"], base64.b64decode(item["raw"])
        expire = item.get("expire_at_ms")
        now_ms = int(time.time() * 1000)

        def put() -> str:
            current = self.client.get(name)
            if current is not None:
                if _as_bytes(current) == raw:
                    return "same"
                raise RestoreConflict(f"{name} exists with other contents; nothing restored for it")
            if expire is not None and expire <= now_ms:
                return "expired"  # Redis would drop it at once: the store had already let it go
            if dry:
                return "put"
            if expire is not None:
                done = self.client.set(name, raw, nx=True, pxat=int(expire))
            else:
                done = self.client.set(name, raw, nx=True)
            if not done:
                raise RestoreConflict(f"{name} was written meanwhile; nothing restored for it")
            return "put"

        return self._call("restore", put)

    def lock_target(self) -> Any:
        """A client of its own for the lock: the backend's is closed between a service's ticks."""
        return self._redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=10)

    def default_ledger_url(self) -> str:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "dcr-reaper"
        name = f"redis-{self.host}-{self.port}-{self.db}".replace("/", "_")
        return f"sqlite:///{base / (name + '.ledger.sqlite')}"

    def close(self) -> None:
        self.client.close()


# -- the encrypted file tree ---------------------------------------------------------------------------------


def _sanitize_plain(value: str) -> str:
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_" for ch in value)


class FileTreeKv:
    """FastMCP's default store: a FileTreeStore directory (`<home>/oauth-proxy/<fingerprint>/`)."""

    kind = "filetree"

    def __init__(self, root: Path, description: str):
        from key_value.aio.stores.filetree import (
            FileTreeV1CollectionSanitizationStrategy,
            FileTreeV1KeySanitizationStrategy,
        )

        self.root = root
        self.description = description
        # The same strategies, on the same directory, as FastMCP's OAuthProxy gives its FileTreeStore.
        self._collections = FileTreeV1CollectionSanitizationStrategy(root)
        self._keys = FileTreeV1KeySanitizationStrategy(root)

    def ping(self) -> None:
        if not self.root.is_dir():
            raise DatabaseError(f"{self.description}: not a directory (any more)")

    def now(self) -> float:
        return time.time()  # the files' times are this host's

    def directory(self, collection: str) -> Path:
        return self.root / self._collections.sanitize(collection)

    def file_name(self, key: str) -> str:
        return f"{self._keys.sanitize(key)}.json"

    def entries(self, collections: Sequence[str]) -> Iterator[RawEntry]:
        for collection in collections:
            directory = self.directory(collection)
            try:
                listing = sorted(os.scandir(directory), key=lambda d: d.name)
            except FileNotFoundError:
                continue  # the proxy has not written this collection yet
            except OSError as exc:
                raise DatabaseError(f"listing {directory}: {exc.strerror}") from None
            for item in listing:
                if not item.name.endswith(".json") or not item.is_file(follow_symlinks=False):
                    continue  # write_file_atomic's *.tmp files, anything else
                raw = self._read(Path(item.path))
                if raw is None:
                    continue
                data, mtime = raw
                stem = item.name[: -len(".json")]
                key = stem if _sanitize_plain(stem) == stem else None
                where = f"{directory.name}/{item.name}"
                yield RawEntry(collection, key, where, data, mtime_ns=mtime)

    @staticmethod
    def _read(path: Path) -> tuple[bytes, int] | None:
        try:
            with path.open("rb") as fh:
                data = fh.read()
                mtime = os.fstat(fh.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None  # deleted since the listing
        except OSError as exc:
            raise DatabaseError(f"reading {path}: {exc.strerror}") from None
        return data, mtime

    def key_of(self, raw: RawEntry, value: dict[str, Any] | None) -> str | None:
        """The key of a file whose name is sanitized: the one string of its value that sanitizes to that name
        (py-key-value's own strategy decides), so a file whose name and contents disagree is never acted on."""
        if raw.key is not None:
            return raw.key
        if not value:
            return None
        stem = raw.where.rsplit("/", 1)[-1][: -len(".json")]
        for candidate in value.values():
            if isinstance(candidate, str) and candidate and self._keys.sanitize(candidate) == stem:
                return candidate
        return None

    def fetch(self, collection: str, keys: Sequence[str], where: Sequence[str | None]) -> list[RawEntry | None]:
        out: list[RawEntry | None] = []
        directory = self.directory(collection)
        for key, known in zip(keys, where, strict=True):
            rel = known or f"{directory.name}/{self.file_name(key)}"
            got = self._read(self.root / rel)
            out.append(None if got is None else RawEntry(collection, key, rel, got[0], mtime_ns=got[1]))
        return out

    def delete(self, groups: Sequence[tuple[str, list[str]]]) -> int:
        from key_value.aio.stores.filetree import (
            FileTreeStore,
            FileTreeV1CollectionSanitizationStrategy,
            FileTreeV1KeySanitizationStrategy,
        )

        async def go() -> int:
            store = FileTreeStore(
                data_directory=self.root,
                key_sanitization_strategy=FileTreeV1KeySanitizationStrategy(self.root),
                collection_sanitization_strategy=FileTreeV1CollectionSanitizationStrategy(self.root),
                auto_create=False,  # never make a directory the proxy has not made
            )
            done = 0
            for collection, keys in groups:
                if keys:
                    done += await store.delete_many(keys, collection=collection)
            return done

        try:
            return run_async(go)
        except OSError as exc:
            raise DatabaseError(f"delete in {self.description} failed: {exc.strerror or exc}") from None

    def put_back(self, item: dict[str, Any], dry: bool = False) -> str:
        path = self.root / item["where"]
        raw = base64.b64decode(item["raw"])
        if path.exists():
            if path.read_bytes() == raw:
                return "same"
            raise RestoreConflict(f"{item['where']} exists with other contents; nothing restored for it")
        if dry:
            return "put"
        # Written beside it and linked into place: atomic, and it never replaces a file written meanwhile.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            if item.get("mtime_ns") is not None:
                os.utime(tmp, ns=(item["mtime_ns"], item["mtime_ns"]))
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RestoreConflict(f"{item['where']} was written meanwhile; nothing restored for it") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return "put"

    def lock_target(self) -> Any:
        return Path(f"{self.root}.dcr-reaper.lock")

    def default_ledger_url(self) -> str:
        return f"sqlite:///{self.root}.dcr-reaper.sqlite"

    def close(self) -> None:
        pass


def open_store(url: str, fingerprint: str | None) -> Store:
    """The store a `database_url` names; for FastMCP's home directory, the key's fingerprint picks the store."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisKv(url)
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    elif scheme and len(scheme) > 1:
        raise ConfigError(
            f"database_url: '{scheme}://' is not a key-value store this profile reads "
            "(use redis://HOST:PORT/DB or the file tree's directory)"
        )
    else:
        path = Path(url)
    if not path.is_dir():
        raise ConfigError(f"database_url: {path} is not a directory (FastMCP's home or its oauth-proxy store)")
    if (path / "oauth-proxy").is_dir():
        if fingerprint is None:
            raise ConfigError(
                f"{path} is FastMCP's home: give the server's key material ([fastmcp]) so the store's directory "
                "and its encryption key can be derived"
            )
        store_dir = path / "oauth-proxy" / fingerprint
        if not store_dir.is_dir():
            found = sorted(p.name for p in (path / "oauth-proxy").iterdir() if p.is_dir())
            raise ConfigError(
                f"no store for this key under {path / 'oauth-proxy'} (it has {', '.join(found) or 'none'}): "
                "wrong key material? FastMCP names the directory after its storage key"
            )
        return FileTreeKv(store_dir, str(store_dir))
    if fingerprint is not None and path.parent.name == "oauth-proxy" and path.name != fingerprint:
        raise ConfigError(
            f"{path} is the store of another key (FastMCP names the directory after its storage key): "
            "wrong key material?"
        )
    return FileTreeKv(path, str(path))
