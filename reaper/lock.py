"""One actor at a time (S6): a database-native lock held for a whole run.

PostgreSQL: a session advisory lock; MySQL/MariaDB: GET_LOCK; SQLite: an exclusive lock on a file beside the
database (SQLite's own write lock would block the auth server for the whole run). Each is released by the
server or the kernel when the holder dies, so a kill -9 never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from reaper.errors import ReaperError
from reaper.ledger import holder_identity


class LockHeld(ReaperError):
    """Another reaper holds the lock; this one does nothing (exit 4)."""

    exit_code = 4


def _key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class RunLock:
    """Acquire with try_acquire(); while held, check alive() between batches; release() at the end."""

    def __init__(self, engine: Engine, name: str):
        self.url = engine.url
        self.dialect = engine.dialect.name
        self.name = name
        self.key = _key(name)
        self._engine: Engine | None = None
        self._conn: Any = None
        self._file: Any = None

    def try_acquire(self) -> bool:
        if self.dialect == "sqlite":
            return self._file_lock()
        # PostgreSQL keeps 63 bytes of application_name: keep the pid, shorten the host.
        host, _, pid = holder_identity().rpartition(" pid ")
        app = f"dcr-reaper {host[: 63 - len(pid) - 16]} pid {pid}"
        args = {"application_name": app} if self.dialect == "postgresql" else {}
        self._engine = sa.create_engine(self.url, poolclass=NullPool, connect_args=args)
        self._conn = self._engine.connect()
        if self.dialect == "postgresql":
            got = self._conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        else:
            got = self._conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": self._mysql_name}).scalar() == 1
        self._conn.commit()
        if not got:
            self._close()
        return bool(got)

    @property
    def _mysql_name(self) -> str:
        return f"dcr-reaper:{self.key & 0xFFFFFFFFFFFF:x}"

    def _file_lock(self) -> bool:
        path = Path(f"{self.url.database}.dcr-reaper.lock")
        fh = open(path, "a+")  # noqa: SIM115 - held open for the run
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
        if self.dialect == "sqlite":
            try:
                return Path(f"{self.url.database}.dcr-reaper.lock").read_text().strip() or "unknown"
            except OSError:
                return "unknown"
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                if self.dialect == "postgresql":
                    hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
                    row = conn.execute(
                        sa.text(
                            "SELECT a.application_name, a.client_addr, a.pid, a.backend_start FROM pg_locks l "
                            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                            "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"
                        ),
                        {"hi": hi, "lo": lo},
                    ).first()
                    if row:
                        since = f"{row[3]:%Y-%m-%d %H:%M:%S}"
                        where = row[1] or "local socket"
                        return f"{row[0] or 'unknown'} (backend pid {row[2]}, from {where}, since {since})"
                else:
                    cid = conn.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": self._mysql_name}).scalar()
                    if cid:
                        row = conn.execute(
                            sa.text("SELECT user, host FROM information_schema.processlist WHERE id = :i"),
                            {"i": cid},
                        ).first()
                        return f"connection {cid}" + (f" ({row[0]}@{row[1]})" if row else "")
        finally:
            engine.dispose()
        return "unknown (released meanwhile?)"

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
                if self.dialect == "postgresql":
                    self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                else:
                    self._conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": self._mysql_name})
                self._conn.commit()
            except Exception:  # noqa: BLE001 - a dead connection has released the lock already
                pass
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


def lock_name(engine: Engine, prefix: str) -> str:
    """One lock per auth database and ledger prefix."""
    return f"dcr-reaper/{engine.url.host or ''}/{engine.url.database or ''}/{prefix}"
