"""Authlib-shaped datasets: N clients in churning families and 3N tokens, generated inside the database.

PostgreSQL data is generated server-side (INSERT ... SELECT generate_series) into a database named after N and
kept between runs; a marker table says which generator version made it. SQLite data is written from Python.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import psycopg

VERSION = 3
FAMILY_SIZE = 30  # members per churning family: one live (the newest), the rest orphans
STABLE_SHARE = 0.02  # a few stable single-member families, live
SPAN = 60 * 86400  # registrations spread over 60 days

SCHEMA = """
CREATE TABLE oauth2_client (
    id integer PRIMARY KEY, client_id varchar(48), client_secret varchar(120),
    client_id_issued_at integer NOT NULL DEFAULT 0, client_secret_expires_at integer NOT NULL DEFAULT 0,
    client_metadata text);
CREATE TABLE oauth2_token (
    id integer PRIMARY KEY, client_id varchar(48), token_type varchar(40), access_token varchar(255) NOT NULL,
    refresh_token varchar(255), scope text DEFAULT '', issued_at integer NOT NULL,
    access_token_revoked_at integer NOT NULL DEFAULT 0, refresh_token_revoked_at integer NOT NULL DEFAULT 0,
    expires_in integer NOT NULL DEFAULT 0, user_id integer);
CREATE TABLE oauth2_code (
    id integer PRIMARY KEY, code varchar(120) NOT NULL, client_id varchar(48), redirect_uri text DEFAULT '',
    response_type text DEFAULT '', scope text DEFAULT '', nonce text, auth_time integer NOT NULL,
    acr text, amr text, code_challenge text, code_challenge_method varchar(48));
CREATE TABLE bench_meta (version integer, n integer, now integer);
"""
# Authlib indexes oauth2_client.client_id; the reaper needs the token/code client_id indexes too
# (docs/performance.md says why: every batch re-checks liveness by client_id).
INDEXES = """
CREATE INDEX ix_oauth2_client_client_id ON oauth2_client (client_id);
CREATE UNIQUE INDEX ix_oauth2_token_access ON oauth2_token (access_token);
CREATE INDEX ix_oauth2_token_refresh ON oauth2_token (refresh_token);
CREATE INDEX ix_oauth2_token_client_id ON oauth2_token (client_id);
CREATE INDEX ix_oauth2_code_client_id ON oauth2_code (client_id);
"""


def families(n: int) -> int:
    return max(1, n // FAMILY_SIZE)


def pg_admin_url(base: str) -> str:
    return base


def pg_dbname(n: int, family_count: int | None = None) -> str:
    return f"dcr_bench_v{VERSION}_n{n}" + (f"_f{family_count}" if family_count else "")


def ensure_pg(admin_dsn: str, n: int, log=print, family_count: int | None = None) -> tuple[str, int]:
    """The DSN of a PostgreSQL database holding the N-client dataset (made now, or cached); and its 'now'. With
    `family_count`, the clients are spread over that many families instead of families of FAMILY_SIZE."""
    name = pg_dbname(n, family_count)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            admin.execute(f"CREATE DATABASE {name}")
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        meta = conn.execute("SELECT to_regclass('bench_meta')").fetchone()[0]
        if meta:
            row = conn.execute("SELECT version, n, now FROM bench_meta").fetchone()
            if row and row[0] == VERSION and row[1] == n:
                return dsn, row[2]
        started = time.monotonic()
        log(f"generating {n:,} clients and {3 * n:,} tokens in {name} ...")
        conn.execute("DROP TABLE IF EXISTS oauth2_client, oauth2_token, oauth2_code, bench_meta")
        for stmt in filter(str.strip, SCHEMA.split(";")):
            conn.execute(stmt)
        now = int(time.time())
        f = family_count or families(n)
        stable = int(f * STABLE_SHARE)
        # Client i belongs to family i % f and registers at base + i * step: the last f ids are the newest
        # member of each family. Families below `stable` have one member only (ids beyond are re-mapped).
        conn.execute(
            """
            INSERT INTO oauth2_client (id, client_id, client_secret, client_id_issued_at, client_metadata)
            SELECT i, md5('c' || i), md5('secret' || i), %(base)s + (i::bigint * %(span)s / %(n)s),
                   json_build_object(
                     'client_name', CASE WHEN i %% %(f)s < %(stable)s THEN 'Editor ' || (i %% %(f)s)
                                         ELSE 'Claude Code (srv-' || (i %% %(f)s) || ')' END,
                     'redirect_uris', json_build_array(
                        CASE WHEN i %% %(f)s < %(stable)s THEN 'https://editor.example/' || (i %% %(f)s)
                             ELSE 'http://localhost:' || (49152 + (i::bigint * 7919) %% 16000) || '/callback' END),
                     'grant_types', json_build_array('authorization_code', 'refresh_token'),
                     'token_endpoint_auth_method', 'none')::text
            FROM generate_series(1, %(n)s) AS i
            WHERE NOT (i %% %(f)s < %(stable)s AND i <= %(n)s - %(f)s)
            """,
            {"base": now - SPAN - 3600, "span": SPAN, "n": n, "f": f, "stable": stable},
        )
        conn.execute(
            """
            INSERT INTO oauth2_token (id, client_id, token_type, access_token, refresh_token, issued_at,
                                      access_token_revoked_at, refresh_token_revoked_at, expires_in, user_id)
            SELECT t, md5('c' || c), 'Bearer', md5('a' || t), md5('r' || t),
                   CASE WHEN live THEN %(now)s - 60 ELSE reg + (t %% 3) * 3600 END,
                   CASE WHEN live THEN 0 ELSE reg + (t %% 3) * 3600 + 1800 END,
                   CASE WHEN live THEN 0 ELSE reg + (t %% 3) * 3600 + 1800 END,
                   3600, c %% 1000
            FROM (SELECT t, ((t - 1) / 3) + 1 AS c,
                         (((t - 1) / 3) + 1) > %(n)s - %(f)s AS live,
                         %(base)s + ((((t - 1) / 3) + 1)::bigint * %(span)s / %(n)s) AS reg
                  FROM generate_series(1, 3 * %(n)s) AS t) s
            WHERE EXISTS (SELECT 1 FROM oauth2_client WHERE id = s.c)
            """,
            {"base": now - SPAN - 3600, "span": SPAN, "n": n, "f": f, "now": now},
        )
        for stmt in filter(str.strip, INDEXES.split(";")):
            conn.execute(stmt)
        conn.execute("VACUUM ANALYZE")
        conn.execute("INSERT INTO bench_meta VALUES (%s, %s, %s)", (VERSION, n, now))
        log(f"generated in {time.monotonic() - started:.1f}s")
        return dsn, now


def copy_pg(admin_dsn: str, n: int, name: str) -> str:
    """A throw-away copy of the cached dataset (for reaping), made by PostgreSQL's template copy."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {pg_dbname(n)}")
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)


def drop_pg(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_sqlite(path: Path, n: int) -> int:
    """The same dataset in an SQLite file; returns its 'now'."""
    path.unlink(missing_ok=True)
    now = int(time.time())
    f = families(n)
    stable = int(f * STABLE_SHARE)
    base = now - SPAN - 3600
    rng = random.Random(1)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA + INDEXES)
    import json

    def clients():
        for i in range(1, n + 1):
            fam = i % f
            if fam < stable and i <= n - f:
                continue
            if fam < stable:
                meta = {"client_name": f"Editor {fam}", "redirect_uris": [f"https://editor.example/{fam}"]}
            else:
                meta = {
                    "client_name": f"Claude Code (srv-{fam})",
                    "redirect_uris": [f"http://localhost:{rng.randint(49152, 65535)}/callback"],
                }
            yield (i, f"c{i:012d}", f"secret{i}", base + i * SPAN // n, 0, json.dumps(meta))

    db.executemany("INSERT INTO oauth2_client VALUES (?,?,?,?,?,?)", clients())
    present = {r[0] for r in db.execute("SELECT id FROM oauth2_client")}

    def tokens():
        for t in range(1, 3 * n + 1):
            c = (t - 1) // 3 + 1
            if c not in present:
                continue
            live = c > n - f
            reg = base + c * SPAN // n
            issued = now - 60 if live else reg + (t % 3) * 3600
            revoked = 0 if live else issued + 1800
            yield (t, f"c{c:012d}", "Bearer", f"a{t}", f"r{t}", "", issued, revoked, revoked, 3600, c % 1000)

    db.executemany("INSERT INTO oauth2_token VALUES (?,?,?,?,?,?,?,?,?,?,?)", tokens())
    db.execute("INSERT INTO bench_meta VALUES (?,?,?)", (VERSION, n, now))
    db.commit()
    db.close()
    return now
