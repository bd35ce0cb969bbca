"""What the hand-built schemas share. The servers that do not install from PyPI (Hydra, Keycloak, Spring
Authorization Server, Doorkeeper, Better Auth) have their schemas built from the shapes documented in
shared/docs/AUTH-SERVERS.md with the types each server uses per database, plus small row writers. Only the
columns the documents name (and the ones a server needs to work: keys, secrets, foreign keys) are created.

Here: column types per database, naive UTC times, create and insert."""

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
