"""The SQL backend: an auth server's own tables on PostgreSQL, MySQL/MariaDB or SQLite."""

from reaper.backends.sql.actor import SqlActor, SqlStatements
from reaper.backends.sql.backend import SqlBackend
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.backends.sql.scan import SqlScan, build_query

__all__ = ["RunLock", "SqlActor", "SqlBackend", "SqlScan", "SqlStatements", "build_query", "lock_name"]
