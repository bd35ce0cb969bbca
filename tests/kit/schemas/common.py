"""What the hand-built server schemas share: column types per database, naive UTC times, create and insert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

Json = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Uuid = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")


def utcnow() -> datetime:
    """Naive UTC, the way these servers store `timestamp` columns."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def create(engine: sa.Engine, md: sa.MetaData) -> sa.MetaData:
    md.create_all(engine)
    return md


def insert(engine: sa.Engine, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
