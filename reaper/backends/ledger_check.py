"""What `check` says about the ledger: where it lives, and whether this role may create and write it."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from reaper.backends.base import Finding
from reaper.ledger import Ledger


def ledger_findings(ledger: Ledger, where: str) -> list[Finding]:
    """Read-only: the ledger's location (info), and a warning naming the missing right and its grant."""
    schema = ledger.metadata.schema
    names = [t.name for t in (ledger.runs, ledger.tombstones, ledger.aliases, ledger.restores)]
    place = f"{schema + '.' if schema else ''}{ledger.runs.name.removesuffix('runs')}*"
    shared = " (the auth database itself: tombstones commit with each delete)" if ledger.shared else ""
    out = [Finding("info", "ledger", f"the ledger is {place} in {where}{shared}")]
    try:
        with ledger.engine.connect() as conn:
            who, missing = ledger.impl.ledger_rights(conn, schema, names)
            conn.rollback()
    except DBAPIError as exc:
        return [*out, Finding("warning", "ledger", f"could not read the ledger's rights: {exc.orig or exc}")]
    if missing == "":
        out.append(
            Finding(
                "info",
                "ledger",
                f"the rights on the ledger are not checked on {ledger.engine.dialect.name}: a reap needs SELECT, "
                f"INSERT, UPDATE, DELETE on {place} (and CREATE for the first run)",
            )
        )
    elif missing is not None:
        fix = ledger.impl.ledger_grants(who, schema)
        out.append(Finding("warning", "ledger", f"{who} may not {missing}: reap and restore will fail", fix))
    return out
