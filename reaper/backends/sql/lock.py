"""One actor at a time (S6): a database-native lock held for a whole run.

PostgreSQL: a session advisory lock; MySQL/MariaDB: GET_LOCK; SQLite: an exclusive lock on a file beside the
database (SQLite's own write lock would block the auth server for the whole run).

The lock is the database's, not the URL's: its key is built from the database as the server names it
(`DatabaseImpl.lock_scope`), the SQLite file from its real path, so every route to one database (an IP address, a
host name, a socket, a symlink) contends for one lock.

A lock session is released by the server when its holder dies, and within a bounded time when its holder
vanishes without closing it (a partition, a middlebox that keeps the TCP connection up): the holder checks in
every third of `database.stranded_after` from a heartbeat thread, and the server ends a lock session that has
been idle longer (PostgreSQL 14+ `idle_session_timeout`, MySQL/MariaDB `wait_timeout`; TCP keepalives at the
server's end otherwise). A holder whose check-in fails counts the lock lost at once, before the server can free
it. A session of ours that was given up on while it still held the lock is ended by our next attempt.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from reaper.db import DatabaseImpl, Timeouts, make_engine
from reaper.errors import LockHeld, LockUnavailable
from reaper.ledger import holder_identity

# Sessions of this process that were given up on while they may still hold a lock: lock key -> session id.
# The next attempt on that key ends such a session if it is the holder (it is ours, and nobody uses it).
_abandoned: dict[int, str] = {}
_abandoned_mutex = threading.Lock()
RELEASE_WAIT = 1.0  # seconds release() waits on the lock connection before cutting it


def lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_name(prefix: str) -> str:
    """The lock's name for one ledger prefix; the database it locks is resolved when it is taken."""
    return f"dcr-reaper/{prefix}"


class RunLock:
    """Acquire with try_acquire(); while held, check alive() between batches; release() at the end.

    A database session lock on its own connection, or (SQLite) an flock on a file beside the database.
    """

    def __init__(self, engine: Engine, name: str, bounds: Timeouts | None = None, lock_dir: str | None = None):
        self.url = engine.url
        self.impl = DatabaseImpl.for_engine(engine)
        self.label = name
        self.name = name  # completed with the database's identity once resolved
        self.bounds = bounds or Timeouts()
        self.lock_dir = lock_dir
        self.key: int | None = None
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._session: str | None = None
        self._fd: int | None = None
        self._mutex = threading.Lock()  # the lock connection: heartbeat, alive() and release() take turns
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def check_in(self) -> float:
        """Seconds between the holder's check-ins, and the most one check-in may take."""
        return self.bounds.stranded_after / 3

    # -- taking it -------------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        if self.impl.file_lock:
            return self._file_lock()
        # PostgreSQL keeps 63 bytes of application_name: keep the pid, shorten the host.
        host, _, pid = holder_identity().rpartition(" pid ")
        app = f"dcr-reaper {host[: 63 - len(pid) - 16]} pid {pid}"
        # A check-in that takes longer than its interval counts as a lost lock: the round-trip bound.
        bounds = dataclasses.replace(self.bounds, round_trip=self.check_in)
        self._engine = make_engine(
            self.url, readonly=False, bounds=bounds, purpose="lock", application_name=app, poolclass=NullPool
        )
        try:
            self._conn = self._engine.connect()
            self._resolve(self._conn)
            assert self.key is not None
            got = self.impl.try_lock(self._conn, self.key) or self._end_abandoned(self._conn, self.key)
            if got:
                self._session = self.impl.session_id(self._conn)
            self._conn.commit()
        except BaseException:
            self._close()
            raise
        if not got:
            self._close()
            return False
        self._lost.clear()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return True

    def _resolve(self, conn: Connection) -> None:
        """The key and the name, from the database's own identity."""
        scope = self.impl.lock_scope(conn)
        self.key = lock_key(f"{self.label}@{scope}")
        self.name = f"{self.label} on {self.impl.describe_database(conn)}"

    def _end_abandoned(self, conn: Connection, key: int) -> bool:
        """The lock is held: if by a session of ours that was given up on, end that session and take the lock."""
        with _abandoned_mutex:
            stale = _abandoned.get(key)
        if stale is None or self.impl.lock_holder_session(conn, key) != stale:
            return False
        ended = self.impl.end_session(conn, stale)
        conn.commit()
        with _abandoned_mutex:
            if _abandoned.get(key) == stale:
                del _abandoned[key]
        if not ended:
            return False
        deadline = time.monotonic() + max(2.0, self.check_in)
        while time.monotonic() < deadline:  # the server ends a session asynchronously
            if self.impl.try_lock(conn, key):
                return True
            conn.commit()
            time.sleep(0.05)
        return False

    def _file_lock(self) -> bool:
        path = self.impl.lock_file(self.url, self.lock_dir)
        self.name = f"{self.label} on {self.impl.describe_file(self.url)}"
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise LockUnavailable(f"cannot open the run lock file {path}: {exc.strerror}") from None
            try:  # an existing lock file that is not ours to write: flock needs only read access
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                writable = False
            except OSError:
                raise LockUnavailable(
                    f"cannot create the run lock file {path}: {exc.strerror} (create it once, or set "
                    "database.sqlite_lock_dir to a directory every reaper of this database can write)"
                ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_identity().encode(), 0)
        self._fd = fd
        return True

    # -- holding it ------------------------------------------------------------------------------------

    def _ping(self) -> bool:
        with self._mutex:
            if self._conn is None or self._lost.is_set():
                return False
            try:
                self._conn.execute(sa.text("SELECT 1"))
                self._conn.commit()
                return True
            except Exception:  # noqa: BLE001 - any failure on the lock connection means the lock is gone
                return False

    def _beat(self) -> None:
        while not self._stop.wait(self.check_in):
            if not self._ping():
                self._give_up()
                return

    def _give_up(self) -> None:
        """Count the lock lost; remember the session (it may still hold the lock) and close our end of it."""
        with self._mutex:
            if self._lost.is_set():
                return
            self._lost.set()
            self._abandon()
            if self._conn is not None:
                try:
                    self._conn.invalidate()  # closed without the rollback a pool would try first
                except Exception:  # noqa: BLE001
                    pass
            self._close_connection()

    def _abandon(self) -> None:
        if self.key is not None and self._session is not None:
            with _abandoned_mutex:
                _abandoned[self.key] = self._session

    def alive(self) -> bool:
        """Still holding: the lock connection answers within one check-in (a dropped connection drops the lock)."""
        if self._fd is not None:
            return True
        if self._conn is None or self._lost.is_set():
            return False
        if self._ping():
            return True
        self._give_up()
        return False

    def holder(self) -> str:
        """A description of whoever holds the lock now, as far as the database can tell."""
        if self.impl.file_lock:
            try:
                return self.impl.lock_file(self.url, self.lock_dir).read_text().strip() or "unknown"
            except OSError:
                return "unknown"
        engine = make_engine(self.url, readonly=False, bounds=self.bounds, purpose="lock", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                if self.key is None:
                    self._resolve(conn)
                assert self.key is not None
                found = self.impl.lock_holder(conn, self.key)
        finally:
            engine.dispose()
        return found or "unknown (released meanwhile?)"

    # -- letting go ------------------------------------------------------------------------------------

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            return
        self._stop.set()
        # Letting go never waits on a silent network: after RELEASE_WAIT the lock connection is cut, which fails
        # a check-in in flight and the unlock at once (the session then ends with its connection, or is stranded
        # and ended by the server within stranded_after).
        cutter = threading.Timer(RELEASE_WAIT, self._cut)
        cutter.daemon = True
        cutter.start()
        try:
            if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
                self._heartbeat.join(timeout=self.check_in + 1)
                self._heartbeat = None
            with self._mutex:
                if self._conn is not None and not self._lost.is_set():
                    try:
                        assert self.key is not None
                        self.impl.unlock(self._conn, self.key)
                        self._conn.commit()
                    except Exception:  # noqa: BLE001 - a dead connection has released the lock, or will be ended
                        self._abandon()
                self._close_connection()
        finally:
            cutter.cancel()

    def _cut(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            self.impl.abort(conn.connection.dbapi_connection)
        except Exception:  # noqa: BLE001 - closed meanwhile
            pass

    def discard(self) -> None:
        """Release a lock whose connection may be broken; never raises."""
        try:
            self.release()
        except Exception:  # noqa: BLE001
            with self._mutex:
                self._close_connection()

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _close(self) -> None:
        with self._mutex:
            self._close_connection()

    def __enter__(self) -> RunLock:
        if not self.try_acquire():
            raise LockHeld(f"another dcr-reaper holds the lock '{self.name}': {self.holder()}; doing nothing")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
