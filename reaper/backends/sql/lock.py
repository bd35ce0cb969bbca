"""One actor at a time (S6): a database-native lock held for a whole run.

PostgreSQL: a session advisory lock; MySQL/MariaDB: GET_LOCK; SQLite: an exclusive lock on a file beside the
database (SQLite's own write lock would block the auth server for the whole run). Each is released by the
server or the kernel when the holder dies, so a kill -9 never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path
from typing import IO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from reaper.db import DatabaseImpl
from reaper.errors import LockHeld
from reaper.ledger import holder_identity


def lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_name(engine: Engine, prefix: str) -> str:
    """One lock per database and ledger prefix."""
    return f"dcr-reaper/{engine.url.host or ''}/{engine.url.database or ''}/{prefix}"


class RunLock:
    """Acquire with try_acquire(); while held, check alive() between batches; release() at the end.

    A database session lock on its own connection, or (SQLite) an flock on a file beside the database.
    """

    def __init__(self, engine: Engine, name: str):
        self.url = engine.url
        self.impl = DatabaseImpl.for_engine(engine)
        self.name = name
        self.key = lock_key(name)
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._file: IO[str] | None = None

    @property
    def _path(self) -> Path:
        return Path(f"{self.url.database}.dcr-reaper.lock")

    def try_acquire(self) -> bool:
        if self.impl.file_lock:
            return self._file_lock()
        # PostgreSQL keeps 63 bytes of application_name: keep the pid, shorten the host.
        host, _, pid = holder_identity().rpartition(" pid ")
        app = f"dcr-reaper {host[: 63 - len(pid) - 16]} pid {pid}"
        self._engine = sa.create_engine(self.url, poolclass=NullPool, connect_args=self.impl.lock_connect_args(app))
        self._conn = self._engine.connect()
        got = self.impl.try_lock(self._conn, self.key)
        self._conn.commit()
        if not got:
            self._close()
        return got

    def _file_lock(self) -> bool:
        fh = open(self._path, "a+")  # noqa: SIM115 - held open for the run
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

    def holder(self) -> str:
        """A description of whoever holds the lock now, as far as the database can tell."""
        if self.impl.file_lock:
            try:
                return self._path.read_text().strip() or "unknown"
            except OSError:
                return "unknown"
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                found = self.impl.lock_holder(conn, self.key)
        finally:
            engine.dispose()
        return found or "unknown (released meanwhile?)"

    def alive(self) -> bool:
        """Still holding: the lock connection answers (a dropped connection drops the lock)."""
        if self._file is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(sa.text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:  # noqa: BLE001 - any failure on the lock connection means the lock is gone
            return False

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            return
        if self._conn is not None:
            try:
                self.impl.unlock(self._conn, self.key)
                self._conn.commit()
            except Exception:  # noqa: BLE001 - a dead connection has released the lock already
                pass
        self._close()

    def discard(self) -> None:
        """Release a lock whose connection may be broken; never raises."""
        try:
            self.release()
        except Exception:  # noqa: BLE001
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> RunLock:
        if not self.try_acquire():
            raise LockHeld(f"another dcr-reaper holds the lock '{self.name}': {self.holder()}; doing nothing")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
