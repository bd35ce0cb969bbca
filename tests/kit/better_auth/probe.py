"""Run the real flow on a scratch database per version and dump what Better Auth created and wrote.

    python tests/kit/better_auth/probe.py [1.7 1.6 1.3] [--tz Pacific/Honolulu] [--keep] [--json out.json]

For each version: CREATE DATABASE ba_probe_<v> (optionally ALTER DATABASE ... SET timezone), start the server
(its own migrations), sign up alice, register two clients anonymously (as MCP clients do), log in with the
first, refresh twice; then a third client registered with alice's session, logged in with the RFC 8707
resource (1.7: a JWT access token) and revoked (1.7). Prints the tables, columns, keys and rows.
Needs psycopg (the project's PostgreSQL driver) and a server at REAPER_TEST_POSTGRES_URL's host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver import VERSIONS, BetterAuthServer  # noqa: E402

ADMIN_URL = os.environ.get("REAPER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test").replace(
    "postgresql+psycopg://", "postgresql://"
)


def db_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def recreate(name: str, tz: str | None) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
        if tz:
            conn.execute(f"ALTER DATABASE \"{name}\" SET timezone = '{tz}'")


def drop(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def schema_facts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    cols = conn.execute(
        """SELECT table_name, column_name, data_type, is_nullable, column_default
           FROM information_schema.columns WHERE table_schema = 'public'
           ORDER BY table_name, ordinal_position"""
    ).fetchall()
    tables: dict[str, Any] = {}
    for t, c, ty, nullable, default in cols:
        tables.setdefault(t, {"columns": [], "pk": [], "fks": [], "unique": [], "indexes": []})
        tables[t]["columns"].append(
            {"name": c, "type": ty, "nullable": nullable == "YES", **({"default": default} if default else {})}
        )
    for t, c in conn.execute(
        """SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc
           JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)
           WHERE tc.table_schema = 'public' AND tc.constraint_type = 'PRIMARY KEY'"""
    ).fetchall():
        tables[t]["pk"].append(c)
    for t, c in conn.execute(
        """SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc
           JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)
           WHERE tc.table_schema = 'public' AND tc.constraint_type = 'UNIQUE'"""
    ).fetchall():
        tables[t]["unique"].append(c)
    for t, c, rt, rc, on_delete, on_update in conn.execute(
        """SELECT kcu.table_name, kcu.column_name, ccu.table_name, ccu.column_name, rc.delete_rule, rc.update_rule
           FROM information_schema.referential_constraints rc
           JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)
           JOIN information_schema.constraint_column_usage ccu USING (constraint_schema, constraint_name)
           WHERE rc.constraint_schema = 'public' ORDER BY 1, 2"""
    ).fetchall():
        tables[t]["fks"].append(
            {"column": c, "references": f"{rt}.{rc}", "on_delete": on_delete, "on_update": on_update}
        )
    for t, _name, definition in conn.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
    ).fetchall():
        tables[t]["indexes"].append(definition)
    return tables


def jsonable(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC).isoformat() if v.tzinfo else v.isoformat() + " (naive)"
    if isinstance(v, bytes):
        return v.hex()
    return v


def rows(conn: psycopg.Connection[Any], table: str) -> list[dict[str, Any]]:
    cur = conn.execute(f'SELECT * FROM "{table}" ORDER BY "createdAt"' if table != "jwks" else 'SELECT * FROM "jwks"')
    names = [d.name for d in cur.description or []]
    return [{n: jsonable(v) for n, v in zip(names, r, strict=True)} for r in cur.fetchall()]


OAUTH_TABLES = (
    "oauthClient",
    "oauthApplication",
    "oauthRefreshToken",
    "oauthAccessToken",
    "oauthConsent",
    "oauthClientResource",
    "oauthResource",
)


def dump(conn: psycopg.Connection[Any], schema: dict[str, Any]) -> dict[str, Any]:
    return {t: rows(conn, t) for t in OAUTH_TABLES if t in schema}


def time_check(conn: psycopg.Connection[Any], schema: dict[str, Any], start: dt.datetime) -> dict[str, Any]:
    """Per time column of the oauth tables: the largest distance (seconds) between a stored createdAt and
    the wall clock of the run, and the stored expiry minus createdAt (the TTL, when Better Auth writes
    correct instants). A database time zone mix-up shows as an offset of whole hours."""
    checks: dict[str, Any] = {}
    for table in OAUTH_TABLES:
        if table not in schema:
            continue
        names = [c["name"] for c in schema[table]["columns"]]
        if "createdAt" not in names:
            continue
        for col in [n for n in names if n.endswith("ExpiresAt") or n == "expiresAt"] + ["createdAt"]:
            row = conn.execute(
                f'SELECT min(EXTRACT(EPOCH FROM "{col}" - "createdAt")),'
                f' max(EXTRACT(EPOCH FROM "{col}" - "createdAt")),'
                f' max(abs(EXTRACT(EPOCH FROM "{col}" - %s::timestamptz))) FROM "{table}"',
                (start,),
            ).fetchone()
            if row and row[0] is not None:
                key = f"{table}.{col}"
                if col == "createdAt":
                    checks[key] = {"max_seconds_from_run_start": float(row[2])}
                else:
                    checks[key] = {"ttl_seconds_min": float(row[0]), "ttl_seconds_max": float(row[1])}
    return checks


def probe(version: str, tz: str | None, keep: bool) -> dict[str, Any]:
    name = f"ba_probe_{VERSIONS[version][0]}" + ("_tz" if tz else "")
    recreate(name, tz)
    out: dict[str, Any] = {"version": version, "database": name, "db_timezone": tz, "timings": {}}
    t0 = time.monotonic()
    out["utc_at_start"] = dt.datetime.now(dt.UTC).isoformat()
    with BetterAuthServer(version, db_url(name)) as ba:
        out["timings"]["start"] = round(time.monotonic() - t0, 2)
        out["metadata_endpoints"] = {k: v for k, v in ba.metadata().items() if k.endswith("_endpoint") or k == "issuer"}
        alice = ba.sign_up("alice@example.com", name="Alice")
        c1 = ba.register("Claude Code (memory)", software_id="claude-code", software_version="1.0.0")
        c2 = ba.register("Cursor")
        out["registration_response"] = c1.registration
        tokens = ba.login(alice, c1)
        out["token_response_login"] = {**tokens.response, "access_is_jwt": tokens.access_is_jwt}
        t1 = ba.refresh(c1, tokens)
        t2 = ba.refresh(c1, t1)
        out["token_response_refresh"] = {**t2.response, "access_is_jwt": t2.access_is_jwt}
        out["timings"]["main_flow"] = round(time.monotonic() - t0, 2)
        with psycopg.connect(db_url(name)) as conn:
            out["session_timezone"] = conn.execute("SHOW timezone").fetchone()[0]  # type: ignore[index]
            out["schema"] = schema_facts(conn)
            out["rows_main"] = dump(conn, out["schema"])
            out["time_check"] = time_check(conn, out["schema"], dt.datetime.fromisoformat(out["utc_at_start"]))
        extras: dict[str, Any] = {}
        out["extras"] = extras
        # replaying the refresh token that the first refresh rotated away
        try:
            ba.refresh(c1, tokens.refresh_token or "")
            extras["replayed_rotated_refresh_token"] = "accepted"
        except Exception as exc:  # noqa: BLE001
            extras["replayed_rotated_refresh_token"] = f"refused: {exc}"[:300]
        with psycopg.connect(db_url(name)) as conn:
            extras["rows_after_replay"] = dump(conn, out["schema"])
        # a client registered with alice's session; the resource parameter; revocation
        c3 = ba.register("Claude Code (extras)", as_user=alice)
        t3 = ba.login(alice, c3, resource=ba.mcp_resource)
        extras.update(c3=c3.client_id, c3_consent_asked=ba.consent_asked, access_is_jwt_with_resource=t3.access_is_jwt)
        t3b = ba.refresh(c3, t3, resource=ba.mcp_resource)
        if ba.endpoints["revoke"] and t3b.refresh_token:
            ba.revoke(c3, t3b.refresh_token)
            extras["revoked_refresh_of"] = c3.client_id
        c5 = ba.register("Opaque then revoked")
        t5 = ba.login(alice, c5)
        if ba.endpoints["revoke"]:
            ba.revoke(c5, t5.access_token, "access_token")
            extras["revoked_access_of"] = c5.client_id
        if version == "1.6":
            c4 = ba.register("Consenting client")
            ba.login(alice, c4, prompt="consent")
            extras.update(c4_prompt_consent=c4.client_id, c4_consent_asked=ba.consent_asked)
        # a second login with the second client, twice: is consent asked again?
        ba.login(alice, c2)
        extras["c2_first_login_consent_asked"] = ba.consent_asked
        ba.login(alice, c2)
        extras["c2_second_login_consent_asked"] = ba.consent_asked
        out["timings"]["all"] = round(time.monotonic() - t0, 2)
        with psycopg.connect(db_url(name)) as conn:
            out["rows_all"] = dump(conn, out["schema"])
    out["exit_code"] = ba.returncode
    out["stderr"] = ba.stderr
    if not keep:
        drop(name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("versions", nargs="*", default=list(VERSIONS))
    ap.add_argument("--tz", default=None, help="ALTER DATABASE ... SET timezone to this first")
    ap.add_argument("--keep", action="store_true", help="keep the scratch databases")
    ap.add_argument("--json", default=None, help="write the full dump here")
    args = ap.parse_args()
    results = [probe(v, args.tz, args.keep) for v in args.versions]
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
