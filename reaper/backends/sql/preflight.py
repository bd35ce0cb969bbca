"""The SQL preflight: resolve what the live schema settles, then list what does not match and what the
operator must decide."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from reaper.backends.base import Finding
from reaper.backends.sql.scan import (
    can_live_forever,
    credential_compiler,
    credential_filter,
    forever_fix,
    live_condition,
)
from reaper.db import DatabaseImpl, check_schema, exists_where, table_clause
from reaper.db.schema import expected_types
from reaper.profiles import BoundProfile, Profile, credential_columns, profile_reads
from reaper.profiles.names import resolve_names


class SchemaView:
    """Reflection of one database, each table read once."""

    def __init__(self, engine: Engine):
        self.impl = DatabaseImpl.for_engine(engine)
        self.inspector = sa.inspect(engine)
        self.columns = cache(self._columns)

    @staticmethod
    def _split(table: str) -> tuple[str | None, str]:
        schema, _, bare = table.rpartition(".")
        return schema or None, bare

    def has_table(self, table: str) -> bool:
        schema, bare = self._split(table)
        return bool(self.inspector.has_table(bare, schema=schema))

    def _columns(self, table: str) -> dict[str, Any]:
        """Column name -> reflected type ({} when the table is missing)."""
        if not self.has_table(table):
            return {}
        schema, bare = self._split(table)
        return {c["name"]: c for c in self.inspector.get_columns(bare, schema=schema)}

    def has_column(self, table: str, column: str) -> bool:
        return self.impl.find_column(column, self.columns(table)) is not None

    def tables(self, schema: str | None) -> list[str]:
        return [f"{schema}.{t}" if schema else t for t in self.inspector.get_table_names(schema=schema)]

    def leads_an_index(self, table: str, column: str) -> bool:
        """Whether some index (or the primary key) has this column first."""
        schema, bare = self._split(table)
        pk = self.inspector.get_pk_constraint(bare, schema=schema).get("constrained_columns") or []
        firsts: list[str | None] = [pk[0]] if pk else []
        firsts += [
            ix["column_names"][0] for ix in self.inspector.get_indexes(bare, schema=schema) if ix["column_names"]
        ]
        firsts += [
            uc["column_names"][0]
            for uc in self.inspector.get_unique_constraints(bare, schema=schema)
            if uc["column_names"]
        ]
        return column.lower() in {str(c).lower() for c in firsts if c}

    def foreign_keys(self, table: str) -> list[dict[str, Any]]:
        schema, bare = self._split(table)
        return [dict(fk) for fk in self.inspector.get_foreign_keys(bare, schema=schema)]


def resolve(bound: BoundProfile, view: SchemaView) -> tuple[BoundProfile, list[Finding]]:
    """Drop optional credentials whose table is missing and pick each column's spelling this schema uses."""
    profile: Profile = bound.profile
    findings: list[Finding] = []
    absent = {c.name for c in profile.credentials if c.optional and not view.has_table(c.table)}
    for name in sorted(absent):
        table = profile.credential(name).table
        findings.append(Finding("info", "optional_table", f"table '{table}' ({name}) does not exist here: skipped"))
    profile = profile.without(absent)
    chosen: dict[str, str] = {}
    reads = profile_reads(profile)
    for canonical, alternates in profile.spellings.items():
        for table, columns in reads.items():
            if canonical not in columns or not view.has_table(table) or view.has_column(table, canonical):
                continue
            found = next((alt for alt in alternates if view.has_column(table, alt)), None)
            if found is not None:
                chosen[canonical] = found
                findings.append(
                    Finding("info", "spelling", f"column '{table}.{found}' read as '{canonical}' (an earlier release)")
                )
    if chosen:
        profile = resolve_names(profile, {}, "as_is", chosen)
    return BoundProfile(profile, bound.options, bound.ip), findings


def _encoding_findings(profile: Profile, view: SchemaView) -> list[Finding]:
    """Time columns whose zone-awareness differs from the profile's encoding."""
    out = []
    for (table, column), (_, family) in sorted(expected_types(profile).items()):
        if family != "time":
            continue
        info = view.columns(table).get(view.impl.find_column(column, view.columns(table)) or "")
        encoding = _encoding_of(profile, table, column)
        aware = getattr(info["type"], "timezone", None) if info else None
        if aware is None or encoding not in ("timestamp", "timestamptz"):
            continue
        if aware and encoding == "timestamp":
            out.append(
                Finding(
                    "warning",
                    "encoding",
                    f"column '{table}.{column}' is a timestamp with time zone, the profile reads it as "
                    "'timestamp' (naive UTC); correct here because every session runs in UTC",
                    f'encoding = "timestamptz" for {column} in the profile',
                )
            )
        elif not aware and encoding == "timestamptz":
            out.append(
                Finding(
                    "warning",
                    "encoding",
                    f"column '{table}.{column}' is a timestamp without time zone, the profile reads it as "
                    "'timestamptz': its values are taken as UTC; if the server writes local time, liveness is off "
                    "by the server's UTC offset",
                    f'encoding = "timestamp" for {column} in the profile, and check that the server writes UTC',
                )
            )
    return out


def _encoding_of(profile: Profile, table: str, column: str) -> str | None:
    fields = [f for _, f in profile.client.fields() if table == profile.client.table] + [
        c.issued_at for c in profile.credentials if c.table == table and c.issued_at is not None
    ]
    if profile.loops is not None and profile.credential(profile.loops.credential).table == table:
        fields.append(profile.loops.revoked_at)
    for f in fields:
        if f.column == column or (f.lookup is not None and f.lookup.column == column):
            return f.encoding
    return None


def _unmapped_findings(profile: Profile, view: SchemaView, ledger_prefix: str) -> list[Finding]:
    """Tables that reference the client (a foreign key, or a column named like a mapped reference) but that
    the profile does not read: an unmapped credential store is how a live client gets reaped."""
    ct = profile.client.table
    schema, _, _ = ct.rpartition(".")
    mapped = set(profile_reads(profile))
    refs = ({c.ref.lower() for c in profile.credentials} | {profile.client.key.lower()}) - {"id"}
    out = []
    for table in view.tables(schema or None):
        bare = table.rpartition(".")[2]
        if table in mapped or bare.startswith(ledger_prefix):
            continue
        fks = [fk for fk in view.foreign_keys(table) if fk.get("referred_table") == ct.rpartition(".")[2]]
        named = sorted(c for c in view.columns(table) if c.lower() in refs)
        if fks or named:
            how = (
                f"a foreign key to {ct}"
                if fks
                else f"column {', '.join(named)} (named like the profile's client references)"
            )
            out.append(
                Finding(
                    "warning",
                    "unmapped_table",
                    f"table '{table}' references clients ({how}) but the profile does not map it: if it holds "
                    "credentials, a client live only there would look dead",
                    "add it to the profile as a [[credentials]] entry with its live condition, or confirm it "
                    "holds no credentials",
                )
            )
    return out


def forever_finding(bound: BoundProfile, engine: Engine) -> Finding | None:
    """How many clients are live only through credentials that never expire (Authlib's and DOT's default
    refresh lifetime): such clients are never reaped unless the operator says how long tokens live."""
    creds = [c for c in bound.scan_credentials if c.client_column is None]
    if not any(can_live_forever(c) for c in creds):
        return None
    impl = DatabaseImpl.for_engine(engine)
    cm = bound.client
    with engine.connect() as conn:
        now = datetime.fromtimestamp(impl.now(conn), UTC)
        client = table_clause(cm.table, {cm.key}).alias("c")
        live: list[Any] = []
        strict: list[Any] = []
        for cred in creds:
            t = table_clause(cred.table, credential_columns(cred)).alias()
            where = [t.c[cred.ref] == client.c[cm.key], *credential_filter(bound, cred, t, now, impl)]
            for out, is_strict in ((live, False), (strict, True)):
                alive = live_condition(cred, credential_compiler(bound, cred, t, now, impl, is_strict))
                out.append(exists_where(*where, alive))
        query = sa.select(sa.func.count()).select_from(client).where(sa.or_(*live), sa.not_(sa.or_(*strict)))
        count = int(conn.execute(query).scalar_one())
        conn.rollback()
    if not count:
        return None
    fix = forever_fix(bound)
    return Finding(
        "warning",
        "refresh_lifetime",
        f"{count} client(s) are live only because credentials that never expire (refresh tokens, by default) "
        "keep them so: they are never reaped as they stand",
        (f"set {fix} to the server's refresh-token lifetime, or " if fix else "set ")
        + "classify.stale_after to reap superseded ones that stopped refreshing (docs/classification.md)",
    )


def _index_findings(profile: Profile, view: SchemaView) -> list[Finding]:
    """Credential tables whose reference to the client leads no index: every re-check of a reap batch (one NOT
    EXISTS per client and table) then reads the whole table."""
    out = []
    for cred in profile.credentials:
        if cred.kind == "record" or not view.has_table(cred.table):
            continue
        column = view.impl.find_column(cred.ref, view.columns(cred.table)) or cred.ref
        if view.leads_an_index(cred.table, column):
            continue
        out.append(
            Finding(
                "warning",
                "index",
                f"no index on {cred.table}.{column}: a reap re-checks every client against this table, and without "
                "an index each check reads the whole table (a reap runs at a fraction of its speed)",
                view.impl.create_index_sql(cred.table, column),
            )
        )
    return out


def preflight(
    bound: BoundProfile, engine: Engine, ledger_prefix: str, deep: bool = False
) -> tuple[BoundProfile, list[Finding]]:
    """Resolve the profile against the schema, then: schema errors; with `deep` (the `check` command), what the
    operator must decide: time encodings, unmapped tables, missing indexes, never-expiring credentials."""
    view = SchemaView(engine)
    resolved, findings = resolve(bound, view)
    profile = resolved.profile
    findings += [Finding("error", "schema", msg) for msg in check_schema(engine, profile)]
    if deep and not any(f.level == "error" for f in findings):
        findings += _encoding_findings(profile, view)
        findings += _unmapped_findings(profile, view, ledger_prefix)
        findings += _index_findings(profile, view)
        forever = forever_finding(resolved, engine)
        if forever is not None:
            findings.append(forever)
    return resolved, findings
