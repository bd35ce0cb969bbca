"""Restore: put reaped clients back exactly as they were, from their tombstones, through any backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from reaper.backends.base import Backend, errors
from reaper.errors import ConfigError, ReaperError, SchemaError
from reaper.reaping.runner import holding


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)
    rows: int = 0


def restore_from_ledger(backend: Backend, run_id: str | None = None, client_id: str | None = None) -> RestoreResult:
    """Restore every open tombstone of a run, or the latest of one client (by client_id or key)."""
    if bool(run_id) == bool(client_id):
        raise ConfigError("restore needs exactly one of --run or --client")
    problems = errors(backend.check())
    if problems:
        raise SchemaError(problems)
    with holding(backend):
        ledger = backend.ledger()
        if not ledger.exists():
            raise ReaperError("no ledger found: nothing has been reaped here yet")
        tombs = ledger.open_tombstones(run_id=run_id, client_id=client_id)
        if not tombs:
            what = f"run {run_id}" if run_id else f"client {client_id}"
            raise ReaperError(f"no unrestored tombstone for {what}")
        if client_id:
            tombs = tombs[-1:]
        actor = backend.actor()
        try:
            rows = actor.restore(tombs)
        finally:
            actor.close()
    return RestoreResult([t.client_key for t in tombs], rows)
