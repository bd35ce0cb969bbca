"""A real PostgreSQL streaming replica of the test server, for tests that scan a standby and act on its primary.

`pg_basebackup -R` copies the server at `SERVER_URLS["postgresql"]` into a temporary data directory, and a second
postmaster serves it as a hot standby on a free port, streaming from the first. PostgreSQL refuses to run as
root, so as root every server command runs as the `postgres` OS user, who owns the directory. The primary must
accept replication connections from 127.0.0.1 (`.ci/run` adds the pg_hba.conf rule); when it does not, the test
fails and says how to fix it. The standby is stopped and its directory removed afterwards, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

# Settings a hot standby must hold at least at the primary's values, or it refuses to start.
_AT_LEAST_PRIMARY = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)
SLOT_PREFIX = "dcr_reaper_test_replica_"  # then the owning process's pid and a random part
HBA_FIX = "add `host replication postgres 127.0.0.1/32 trust` to its pg_hba.conf and reload (.ci/run does)"


def _as_server_user(argv: list[str]) -> list[str]:
    """Root runs PostgreSQL's programs as `postgres`; anyone else runs them as themselves."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    """A running hot standby of the test server: URLs for its databases, and control over its replay."""

    primary: URL
    port: int
    admin: Engine  # the standby's `postgres` database, autocommit
    primary_admin: Engine

    def url(self, primary_db_url: str) -> str:
        """The standby's URL for a database of the primary (same database, same user, the standby's port)."""
        return make_url(primary_db_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def catch_up(self, timeout: float = 300.0) -> None:
        """Wait until the standby has replayed everything the primary has written until now (the whole server's
        log: on a busy shared server that takes a while)."""
        with self.primary_admin.connect() as conn:
            target = conn.execute(sa.text("SELECT pg_current_wal_lsn()::text")).scalar_one()
        deadline = time.monotonic() + timeout
        while True:
            with self.admin.connect() as conn:
                done = conn.execute(
                    sa.text("SELECT pg_last_wal_replay_lsn() >= CAST(:t AS pg_lsn)"), {"t": target}
                ).scalar()
            if done:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the replica did not replay up to {target} within {timeout:.0f}s")
            time.sleep(0.05)

    def pause(self) -> None:
        """Stop replaying (WAL is still received): the standby's data stays as it is now, a deterministic lag."""
        with self.admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
            for _ in range(600):
                if conn.execute(sa.text("SELECT pg_get_wal_replay_pause_state()")).scalar() == "paused":
                    return
                time.sleep(0.05)
        pytest.fail("the replica's replay did not pause")

    def resume(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_resume()"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_leftovers(primary_admin: Engine, bindir: Path) -> None:
    """What a killed test process left (no teardown runs on SIGKILL or SIGTERM): its standby, its directory, and its
    replication slot, which would keep the shared primary's WAL for ever. Only a dead owner's."""
    for root in Path(tempfile.gettempdir()).glob("dcr-reaper-replica-*"):
        owner = root / "owner"
        if owner.is_file() and not _alive(int(owner.read_text() or 0)):
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=120,
                check=False,
            )
            shutil.rmtree(root, ignore_errors=True)
    with primary_admin.connect() as conn:
        slots = conn.execute(
            sa.text("SELECT slot_name FROM pg_replication_slots WHERE NOT active AND slot_name LIKE :p"),
            {"p": SLOT_PREFIX + "%"},
        ).scalars()
        for slot in list(slots):
            if not _alive(int(slot.removeprefix(SLOT_PREFIX).split("_")[0])):
                conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": slot})


def _drop_slot(primary_admin: Engine, slot: str) -> None:
    with primary_admin.connect() as conn:
        conn.execute(
            sa.text("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = :s"),
            {"s": slot},
        )


def _run(argv: list[str], what: str, timeout: float = 300, attempts: int = 1) -> None:
    for attempt in range(attempts):
        done = subprocess.run(_as_server_user(argv), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode == 0 or "pg_hba.conf" in done.stderr:
            break
        time.sleep(1 + attempt)  # a server shared with other suites may cut the copy's stream: copy again
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        if "pg_hba.conf" in detail:
            detail += f"\nthe primary refuses replication connections: {HBA_FIX}"
        pytest.fail(f"{what} failed ({done.returncode}):\n{detail}")


def _standby_conf(primary: Engine, port: int, data: Path) -> str:
    with primary.connect() as conn:
        floors = {name: conn.execute(sa.text(f"SHOW {name}")).scalar_one() for name in _AT_LEAST_PRIMARY}
    lines = [
        f"port = {port}",
        "listen_addresses = '127.0.0.1'",
        f"unix_socket_directories = '{data}'",
        "hot_standby = on",
        "max_standby_streaming_delay = -1",  # replay waits for a scan rather than cancel it
        "shared_buffers = 16MB",
        "fsync = off",
        "timezone = 'UTC'",
        *(f"{name} = {value}" for name, value in floors.items()),
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def streaming_replica(primary_url: str) -> Iterator[Replica]:
    """A hot standby of the server at `primary_url`, streaming from it, until the block ends."""
    primary = make_url(primary_url)
    primary_admin = sa.create_engine(primary.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with primary_admin.connect() as conn:
        major = int(conn.execute(sa.text("SHOW server_version_num")).scalar_one()) // 10000
    bindir = Path(os.environ.get("REAPER_TEST_PG_BIN", f"/usr/lib/postgresql/{major}/bin"))
    if not (bindir / "pg_basebackup").exists():
        primary_admin.dispose()
        pytest.fail(f"no PostgreSQL {major} programs in {bindir} (set REAPER_TEST_PG_BIN)")
    _clear_leftovers(primary_admin, bindir)
    root = Path(tempfile.mkdtemp(prefix="dcr-reaper-replica-"))
    data, log = root / "data", root / "server.log"
    (root / "owner").write_text(str(os.getpid()))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    # A slot keeps the primary's WAL until the standby has it: a busy shared server recycles it fast, and a standby
    # that falls behind without one can never catch up. Dropped in teardown, or by the next run if killed.
    slot = f"{SLOT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    port = _free_port()
    admin: Engine | None = None
    started = False
    try:
        with primary_admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_create_physical_replication_slot(:s, true)"), {"s": slot})
        _run(
            [
                str(bindir / "pg_basebackup"),
                f"--host={primary.host or '127.0.0.1'}",
                f"--port={primary.port or 5432}",
                f"--username={primary.username or 'postgres'}",
                f"--pgdata={data}",
                "--write-recovery-conf",
                f"--slot={slot}",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
            "pg_basebackup from the test server",
            attempts=3,
        )
        # Debian keeps the server's configuration outside its data directory: the copy has none of it.
        for name, text in {
            "postgresql.conf": _standby_conf(primary_admin, port, data),
            "pg_hba.conf": "local all all trust\nhost all all 127.0.0.1/32 trust\n",
            "pg_ident.conf": "",
        }.items():
            (data / name).write_text(text)
            if os.geteuid() == 0:
                shutil.chown(data / name, "postgres", "postgres")
        started = True
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start"], "the replica")
        except BaseException:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            print(f"replica server log:\n{tail}")
            raise
        admin = sa.create_engine(
            primary.set(host="127.0.0.1", port=port, database="postgres"), isolation_level="AUTOCOMMIT"
        )
        replica = Replica(primary, port, admin, primary_admin)
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar() is True
        yield replica
    finally:
        if admin is not None:
            admin.dispose()
        if started:
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=120,
                check=False,
            )
        _drop_slot(primary_admin, slot)
        primary_admin.dispose()
        shutil.rmtree(root, ignore_errors=True)
