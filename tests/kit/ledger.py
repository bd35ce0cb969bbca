"""Reading the reaper's ledger (runs and tombstones) the way an operator would, with plain SQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kit.databases import has_table

LEDGER_PREFIX = "dcr_reaper_"


def tombstones(engine: sa.Engine, prefix: str = LEDGER_PREFIX) -> list[Any]:
    """Every tombstone row (no payload), oldest first; [] when the ledger was never created."""
    if not has_table(engine, f"{prefix}tombstones"):
        return []
    # A restore is marked in <prefix>restores; ledgers made before that table set tombstones.restored_at.
    marks, restored_at = "", "t.restored_at"
    if has_table(engine, f"{prefix}restores"):
        marks = f" LEFT JOIN {prefix}restores r ON r.tombstone_id = t.id AND r.run_id = t.run_id"
        restored_at = "COALESCE(r.restored_at, t.restored_at)"
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    f"SELECT t.id, t.run_id, t.client_key, t.client_id, t.action, t.state, {restored_at} AS "
                    f"restored_at FROM {prefix}tombstones t{marks} ORDER BY t.id"
                )
            )
        )


def tombstone_count(engine: sa.Engine, prefix: str = LEDGER_PREFIX, state: str | None = None) -> int:
    """How many tombstones (in `state`, if given); 0 when the ledger was never created."""
    try:
        with engine.connect() as conn:
            q = f"SELECT COUNT(*) FROM {prefix}tombstones" + (" WHERE state = :s" if state else "")
            return int(conn.execute(sa.text(q), {"s": state}).scalar_one())
    except sa.exc.DBAPIError:
        return 0  # not created yet


def runs(engine: sa.Engine, prefix: str = LEDGER_PREFIX) -> list[Any]:
    """Every run (id, status, acted, holder), in the order they started; [] when there is no ledger yet."""
    if not has_table(engine, f"{prefix}runs"):
        return []
    with engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT id, status, acted, holder FROM {prefix}runs ORDER BY started_at")))
