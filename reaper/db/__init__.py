"""SQL plumbing: URLs, engines, per-database implementations, the condition compiler and the schema check."""

from reaper.db.compiler import Compiler, Owner, exists_where, now_param, table_clause, untyped
from reaper.db.engine import abort_connections, check_connection, make_engine, timeouts
from reaper.db.impl import DatabaseImpl, Timeouts
from reaper.db.schema import check_schema
from reaper.db.url import describe_error, parse_url, redact

__all__ = [
    "Compiler",
    "DatabaseImpl",
    "Owner",
    "Timeouts",
    "abort_connections",
    "check_connection",
    "check_schema",
    "describe_error",
    "exists_where",
    "make_engine",
    "now_param",
    "parse_url",
    "redact",
    "table_clause",
    "timeouts",
    "untyped",
]
