"""Restore: put reaped clients back exactly as they were, from their tombstones."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from reaper.config import Config
from reaper.db import describe_error, make_engine
from reaper.errors import ConfigError, DatabaseError, ReaperError
from reaper.ledger import decode_payload, decode_row
from reaper.lock import RunLock, lock_name

if TYPE_CHECKING:
    from reaper.reap import Reaper


class RestoreConflict(ReaperError):
    """A row to restore already exists (exit 1): nothing was restored."""


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)
    rows: int = 0


def _pk_where(table: sa.Table, row: dict[str, Any]) -> Any:
    pk = list(table.primary_key.columns)
    if not pk:
        return None
    return sa.and_(*(c == row[c.name] for c in pk))


def _conflicts(conn: Connection, reaper_: Reaper, tomb: Any, payload: dict[str, Any]) -> list[str]:
    if tomb.action == "disable":
        return []
    problems = []
    key_col = reaper_.key_col
    client = decode_row(payload["client"])
    if conn.execute(sa.select(sa.literal(1)).where(key_col == client[key_col.name])).first():
        problems.append(f"client {tomb.client_id}: a client with {key_col.name} = {client[key_col.name]!r} exists")
    else:
        where = _pk_where(reaper_.client, client)
        if (
            where is not None
            and conn.execute(sa.select(sa.literal(1)).select_from(reaper_.client).where(where)).first()
        ):
            problems.append(f"client {tomb.client_id}: its primary key is taken by another client row")
    tables = {t.name: t for _, t in reaper_.creds}
    for name, rows in payload["children"].items():
        table = tables[name]
        for raw in rows:
            where = _pk_where(table, decode_row(raw))
            if where is not None and conn.execute(sa.select(sa.literal(1)).select_from(table).where(where)).first():
                problems.append(f"client {tomb.client_id}: a row with the same primary key exists in {name}")
    return problems


def _put_back(conn: Connection, reaper_: Reaper, tomb: Any, payload: dict[str, Any]) -> int:
    client = decode_row(payload["client"])
    if tomb.action == "disable":
        cols = (reaper_.profile.profile.delete.disable_set or {}).keys()
        conn.execute(
            sa.update(reaper_.client)
            .where(reaper_.key_col == client[reaper_.key_col.name])
            .values({c: client[c] for c in cols})
        )
        return 1
    conn.execute(reaper_.client.insert().values(client))
    count = 1
    tables = {t.name: t for _, t in reaper_.creds}
    for name, rows in payload["children"].items():
        if rows:
            conn.execute(tables[name].insert(), [decode_row(r) for r in rows])
            count += len(rows)
    for move in payload.get("moved", []):
        table = tables[move["table"]]
        where = sa.and_(_pk_where(table, decode_row(move["pk"])), table.c[move["column"]] == move["to"])
        conn.execute(sa.update(table).where(where).values({move["column"]: move["from"]}))
    return count


def _restore(reaper_: Reaper, tombs: Sequence[Any], check_only_new: bool) -> RestoreResult:
    result = RestoreResult()
    ledger = reaper_.ledger
    if not tombs:
        return result
    payloads = {t.id: decode_payload(t.payload) for t in tombs}

    def record(lconn: Connection) -> None:
        ids = [t.id for t in tombs]
        lconn.execute(
            sa.update(ledger.tombstones).where(ledger.tombstones.c.id.in_(ids)).values(restored_at=time.time())
        )
        aliases = [t.client_id for t in tombs if t.action == "merge"]
        if aliases:
            lconn.execute(sa.delete(ledger.aliases).where(ledger.aliases.c.alias_client_id.in_(aliases)))

    with reaper_.engine.begin() as conn:
        problems = [p for t in tombs for p in _conflicts(conn, reaper_, t, payloads[t.id])]
        if problems:
            raise RestoreConflict(
                problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + "; nothing restored"
            )
        for t in tombs:
            result.rows += _put_back(conn, reaper_, t, payloads[t.id])
            result.restored.append(t.client_key)
        if reaper_.ledger_engine is None:
            record(conn)  # same transaction as the rows
    if reaper_.ledger_engine is not None:
        # A separate ledger records the restore only once the rows are committed: had it committed first, a
        # refused auth commit would leave the tombstones marked restored and the clients gone for good. The
        # other way round, a failed ledger write leaves them open and a retry stops at RestoreConflict.
        with reaper_.ledger_engine.begin() as lconn:
            record(lconn)
    return result


def restore_keys(config: Config, reaper_: Reaper, keys: list[str], reason: str) -> list[str]:
    """Restore the latest tombstone of each key (used when a credential arrived after the delete)."""
    with (reaper_.ledger_engine or reaper_.engine).connect() as lconn:
        tombs = reaper_.ledger.open_tombstones(lconn, keys=keys)
    latest = {t.client_key: t for t in tombs}
    return _restore(reaper_, list(latest.values()), True).restored


def restore(config: Config, run_id: str | None = None, client_id: str | None = None) -> RestoreResult:
    """Restore every open tombstone of a run, or of one client (by client_id or key)."""
    from reaper.profile import bind_profile
    from reaper.reap import Reaper

    if bool(run_id) == bool(client_id):
        raise ConfigError("restore needs exactly one of --run or --client")
    if not config.database_url:
        raise ConfigError("database_url is not set")
    if bind_profile(config).profile.api is not None:  # Keycloak: POST the kept representation back
        from reaper.keycloak import restore_keycloak

        return restore_keycloak(config, run_id=run_id, client_id=client_id)
    engine = make_engine(config.database_url, readonly=False)
    ledger_engine = make_engine(config.ledger.url, readonly=False) if config.ledger.url else None
    try:
        with RunLock(engine, lock_name(engine, config.ledger.prefix)):
            reaper_ = Reaper(config, bind_profile(config), engine, ledger_engine)
            with (ledger_engine or engine).connect() as lconn:
                if not reaper_.ledger.exists(lconn):
                    raise ReaperError("no ledger found: nothing has been reaped here yet")
                tombs = reaper_.ledger.open_tombstones(lconn, run_id=run_id, client_id=client_id)
            if not tombs:
                what = f"run {run_id}" if run_id else f"client {client_id}"
                raise ReaperError(f"no unrestored tombstone for {what}")
            if client_id:
                tombs = tombs[-1:]
            return _restore(reaper_, tombs, False)
    except DBAPIError as exc:
        raise DatabaseError(f"restore failed: {describe_error(exc, engine.url)}") from None
    finally:
        engine.dispose()
        if ledger_engine is not None:
            ledger_engine.dispose()
