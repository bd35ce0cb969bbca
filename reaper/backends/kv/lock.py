"""One actor at a time (S6) on a key-value store.

Redis: a lock key taken with `SET NX PX` holding a random token, renewed by a thread while held, checked
(`alive()`) and released only if it still holds our token (a Lua compare-and-set), so a reaper that lost it
never deletes another's. A holder killed with -9 stops renewing: the key expires after `TTL` seconds.
The file tree: `flock` on a file beside the store's directory, released by the kernel when the holder dies.
"""

from __future__ import annotations

import fcntl
import threading
import uuid
from pathlib import Path
from typing import IO, Any

from reaper.ledger import holder_identity

TTL_MS = 30_000
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisLock:
    """A lock key in the store's own Redis database (FastMCP never reads keys without `::`)."""

    def __init__(self, client: Any, name: str, key: str, ttl_ms: int = TTL_MS):
        self.client = client
        self.name = name
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = f"{holder_identity()} {uuid.uuid4()}"
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    def try_acquire(self) -> bool:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._held, self._lost = True, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="kv-lock-renewal", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    self._lost = True
                    return
            except Exception:  # noqa: BLE001 - a failed renewal is checked by alive(); the next one may work
                continue

    def alive(self) -> bool:
        if not self._held or self._lost:
            return False
        try:
            current = self.client.get(self.key)
        except Exception:  # noqa: BLE001 - cannot tell: treat as lost
            return False
        return current is not None and bytes(current).decode("utf-8", "replace") == self.token

    def _stop_renewal(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def release(self) -> None:
        self._stop_renewal()
        try:
            if self._held:
                self._held = False
                self.client.eval(_RELEASE, 1, self.key, self.token)
        finally:
            self.client.close()

    def discard(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raises
            self._held = False

    def holder(self) -> str:
        try:
            current = self.client.get(self.key)
        except Exception:  # noqa: BLE001
            return "unknown"
        if current is None:
            return "unknown (released meanwhile?)"
        return bytes(current).decode("utf-8", "replace").rsplit(" ", 1)[0]


class FileLock:
    """An exclusive flock on a file beside the file tree (never inside the proxy's own directory)."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(holder_identity())
        fh.flush()
        self._file = fh
        return True

    def alive(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def discard(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001
            self._file = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"
