"""Reap and restore throughput on an Authlib database made through Authlib's own mixins, with renamed tables
(`client`, `token`, `code`, as a Flask app names them) and, as Authlib makes it, no index on the token's or the
code's client_id: `python -m bench.reap` (docs/performance.md).

Measured in one run, each on a fresh copy of the cached dataset (PostgreSQL's template copy):
- reap without the indexes (a slice of the plan: every batch's re-check scans the credential tables),
- reap of the whole plan with the indexes, and restore of that run,
- the floor: the same batches as bare psycopg statements (DELETE ... RETURNING of the client and its children,
  and the returned rows written to a scratch table; then the rows inserted back), no re-check, no Python per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

VERSION = 1
TABLES = {"oauth2_client": "client", "oauth2_token": "token", "oauth2_code": "code"}
FAMILY = 30  # registrations per family: the newest live, the rest orphans
SPAN = 60 * 86400
ADMIN_DSN = os.environ.get("REAPER_BENCH_ADMIN_DSN", "host=127.0.0.1 user=postgres dbname=test")
TARGETS = {"reap_indexed": 10_000, "reap_unindexed": 2_000, "restore": 10_000}
INDEXES = ("CREATE INDEX ix_token_client_id ON token (client_id)", "CREATE INDEX ix_code_client_id ON code (client_id)")


def dbname(n: int) -> str:
    return f"dcr_bench_authlib_v{VERSION}_n{n}"


def sqla_url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    return f"postgresql+psycopg://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}/{parts['dbname']}"


def models() -> sa.MetaData:
    """Authlib's three mixins under the renamed tables, an integer id primary key each (as its docs show)."""
    from authlib.integrations.sqla_oauth2 import (
        OAuth2AuthorizationCodeMixin,
        OAuth2ClientMixin,
        OAuth2TokenMixin,
    )
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class Client(Base, OAuth2ClientMixin):
        __tablename__ = TABLES["oauth2_client"]
        id = sa.Column(sa.Integer, primary_key=True)

    class Token(Base, OAuth2TokenMixin):
        __tablename__ = TABLES["oauth2_token"]
        id = sa.Column(sa.Integer, primary_key=True)
        user_id = sa.Column(sa.Integer)

    class Code(Base, OAuth2AuthorizationCodeMixin):
        __tablename__ = TABLES["oauth2_code"]
        id = sa.Column(sa.Integer, primary_key=True)
        user_id = sa.Column(sa.Integer)

    return Base.metadata


def ensure(n: int, log: Any) -> str:
    """The cached N-client database (made once): its DSN."""
    name = dbname(n)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)
        admin.execute(f"CREATE DATABASE {name}_tmp")
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=f"{name}_tmp")
    started = time.monotonic()
    log(f"making {n:,} clients, {3 * n:,} tokens and {n:,} codes through Authlib's mixins ...")
    engine = sa.create_engine(sqla_url(dsn))
    models().create_all(engine)
    engine.dispose()
    now = int(time.time())
    f = max(1, n // FAMILY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Client i is in family i % f and registered at base + i * step: the last f ids are each family's newest
        # (live: a fresh token); every other one is an orphan whose tokens are revoked and whose code is used up.
        conn.execute(
            """
            INSERT INTO client (id, client_id, client_secret, client_id_issued_at, client_secret_expires_at,
                                client_metadata)
            SELECT i, md5('c' || i), md5('secret' || i), %(base)s + (i::bigint * %(span)s / %(n)s), 0,
                   json_build_object('client_name', 'Claude Code (srv-' || (i %% %(f)s) || ')',
                     'redirect_uris', json_build_array('http://localhost:' || (49152 + (i::bigint * 7919) %% 16000)
                                                       || '/callback'),
                     'grant_types', json_build_array('authorization_code', 'refresh_token'),
                     'token_endpoint_auth_method', 'none')::text
            FROM generate_series(1, %(n)s) AS i
            """,
            {"base": now - SPAN - 3600, "span": SPAN, "n": n, "f": f},
        )
        conn.execute(
            """
            INSERT INTO token (id, client_id, token_type, access_token, refresh_token, scope, issued_at,
                               access_token_revoked_at, refresh_token_revoked_at, expires_in, user_id)
            SELECT t, md5('c' || c), 'Bearer', md5('a' || t), md5('r' || t), 'openid',
                   CASE WHEN live THEN %(now)s - 60 ELSE reg + (t %% 3) * 3600 END,
                   CASE WHEN live THEN 0 ELSE reg + (t %% 3) * 3600 + 1800 END,
                   CASE WHEN live THEN 0 ELSE reg + (t %% 3) * 3600 + 1800 END,
                   3600, c %% 1000
            FROM (SELECT t, ((t - 1) / 3) + 1 AS c, (((t - 1) / 3) + 1) > %(n)s - %(f)s AS live,
                         %(base)s + ((((t - 1) / 3) + 1)::bigint * %(span)s / %(n)s) AS reg
                  FROM generate_series(1, 3 * %(n)s) AS t) s
            """,
            {"base": now - SPAN - 3600, "span": SPAN, "n": n, "f": f, "now": now},
        )
        conn.execute(
            """
            INSERT INTO code (id, code, client_id, redirect_uri, response_type, scope, auth_time, code_challenge,
                              code_challenge_method, user_id)
            SELECT i, md5('code' || i), md5('c' || i), 'http://localhost/callback', 'code', 'openid',
                   %(base)s + (i::bigint * %(span)s / %(n)s) + 20, 'x', 'S256', i %% 1000
            FROM generate_series(1, %(n)s) AS i WHERE i <= %(n)s - %(f)s
            """,
            {"base": now - SPAN - 3600, "span": SPAN, "n": n, "f": f},
        )
        conn.execute("VACUUM ANALYZE")
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name}_tmp RENAME TO {name}")
    log(f"made in {time.monotonic() - started:.1f}s")
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)


def fresh_copy(n: int, suffix: str) -> str:
    name = f"dcr_bench_reap_{suffix}_{os.getpid()}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {dbname(n)}")
        # The copy went through the WAL: flush it now, or the checkpoint it triggers lands in whichever phase runs
        # next (full-page writes for every page that phase touches first).
        admin.execute("CHECKPOINT")
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)


def drop(dsn: str) -> None:
    name = dict(p.split("=", 1) for p in dsn.split())["dbname"]
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def config_for(url: str, batch: int, pause: float) -> Any:
    from reaper.config import load_config

    policy = {
        "max_per_run": 10_000_000,
        "max_fraction": 1.0,
        "batch_size": batch,
        "pause": pause,
        "late_token_sweep": 0,
        "min_age": "1h",
    }
    return load_config(
        None, {"database_url": url, "profile": "authlib", "tables": TABLES, "policy": policy}, environ={}
    )


def reap_and_restore(dsn: str, batch: int, pause: float, limit: int | None, restore: bool, log: Any) -> dict[str, Any]:
    """Plan, then time the apply (and the restore of its run) through the reaper's own verbs."""
    from reaper.commands import apply, plan
    from reaper.commands import restore as restore_run

    config = config_for(sqla_url(dsn), batch, pause)
    t0 = time.perf_counter()
    the_plan = plan(config)
    planned = time.perf_counter() - t0
    if limit is not None:
        the_plan.candidates = the_plan.candidates[:limit]
    t0 = time.perf_counter()
    result = apply(config, the_plan, force=True)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "batch_size": batch,
        "pause": pause,
        "plan_s": planned,
        "clients": result.total_acted,
        "seconds": seconds,
        "clients_per_s": result.total_acted / seconds,
    }
    log(f"  reaped {result.total_acted:,} clients in {seconds:.2f}s = {out['clients_per_s']:,.0f}/s (batch {batch})")
    if restore:
        assert result.run_id
        t0 = time.perf_counter()
        back = restore_run(config, run_id=result.run_id)
        rs = time.perf_counter() - t0
        out["restore"] = {"clients": len(back.restored), "seconds": rs, "clients_per_s": len(back.restored) / rs}
        log(f"  restored {len(back.restored):,} clients in {rs:.2f}s = {len(back.restored) / rs:,.0f}/s")
    return out


def floor(dsn: str, batch: int, limit: int, log: Any) -> dict[str, Any]:
    """The same work as bare statements: per batch, DELETE ... RETURNING the children and the clients, the rows
    copied to a scratch table as JSON; then all put back with INSERT ... SELECT from it."""
    with psycopg.connect(dsn) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT c.client_id FROM client c WHERE NOT EXISTS (SELECT 1 FROM token t WHERE t.client_id = "
                "c.client_id AND t.access_token_revoked_at = 0) ORDER BY c.id DESC LIMIT %s",
                (limit,),
            )
        ]
        conn.execute("CREATE TABLE scratch (t text, row jsonb)")
        conn.commit()
        t0 = time.perf_counter()
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            with conn.transaction():
                for table in ("token", "code", "client"):
                    conn.execute(
                        f"WITH gone AS (DELETE FROM {table} WHERE client_id = ANY(%s) RETURNING *) "
                        f"INSERT INTO scratch SELECT '{table}', to_jsonb(gone) FROM gone",
                        (chunk,),
                    )
        reap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with conn.transaction():
            for table in ("client", "token", "code"):
                conn.execute(
                    # LATERAL: `(jsonb_populate_record(...)).*` would call the function once per column.
                    f"INSERT INTO {table} SELECT r.* FROM scratch s, jsonb_populate_record(NULL::{table}, s.row) r "
                    f"WHERE s.t = '{table}'"
                )
        restore_s = time.perf_counter() - t0
    n = len(ids)
    log(f"  floor: {n:,} clients deleted in {reap_s:.2f}s ({n / reap_s:,.0f}/s), put back in {restore_s:.2f}s")
    return {
        "clients": n,
        "reap_s": reap_s,
        "restore_s": restore_s,
        "reap_per_s": n / reap_s,
        "restore_per_s": n / restore_s,
    }


def run(n: int, batch: int, pause: float, unindexed_limit: int, unindexed_batch: int, log: Any) -> dict[str, Any]:
    ensure(n, log)
    results: dict[str, Any] = {"clients": n, "targets": TARGETS}
    dsn = fresh_copy(n, "noindex")
    try:
        log(f"reap without the token/code client_id indexes ({unindexed_limit:,} clients):")
        results["unindexed"] = reap_and_restore(dsn, unindexed_batch, pause, unindexed_limit, False, log)
    finally:
        drop(dsn)
    dsn = fresh_copy(n, "index")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for stmt in INDEXES:
                conn.execute(stmt)
            conn.execute("ANALYZE")
        log("reap with the indexes, then restore of that run:")
        results["indexed"] = reap_and_restore(dsn, batch, pause, None, True, log)
    finally:
        drop(dsn)
    dsn = fresh_copy(n, "floor")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for stmt in INDEXES:
                conn.execute(stmt)
            conn.execute("ANALYZE")
        results["floor"] = floor(dsn, batch, results["indexed"]["clients"], log)
    finally:
        drop(dsn)
    return results


def report(r: dict[str, Any]) -> None:
    ix, un, fl = r["indexed"], r["unindexed"], r["floor"]
    rows = [
        (
            "reap, indexes",
            f"{ix['clients']:,} in {ix['seconds']:.2f}s, batch {ix['batch_size']}, pause {ix['pause']}",
            f"{ix['clients_per_s']:,.0f}/s",
            f">= {TARGETS['reap_indexed']:,}/s",
            f"floor {fl['reap_per_s']:,.0f}/s = {ix['clients_per_s'] / fl['reap_per_s']:.2f}x",
        ),
        (
            "restore of that run",
            f"{ix['restore']['clients']:,} in {ix['restore']['seconds']:.2f}s",
            f"{ix['restore']['clients_per_s']:,.0f}/s",
            f">= {TARGETS['restore']:,}/s",
            f"floor {fl['restore_per_s']:,.0f}/s = {ix['restore']['clients_per_s'] / fl['restore_per_s']:.2f}x",
        ),
        (
            "reap, no index",
            f"{un['clients']:,} in {un['seconds']:.2f}s, batch {un['batch_size']}, pause {un['pause']}",
            f"{un['clients_per_s']:,.0f}/s",
            f">= {TARGETS['reap_unindexed']:,}/s",
            "",
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    from reaper.config import Config

    default_batch = Config().policy.batch_size
    default_pause = Config().policy.pause
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=default_batch, help="policy.batch_size (default: the default)")
    ap.add_argument("--pause", type=float, default=default_pause, help="policy.pause (default: the default)")
    ap.add_argument("--unindexed", type=int, default=30_000, help="clients reaped without the indexes")
    ap.add_argument("--unindexed-batch", type=int, default=None, help="batch size without the indexes")
    ap.add_argument("--out", default="bench/results/reap.json")
    args = ap.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = run(args.clients, args.batch, args.pause, args.unindexed, args.unindexed_batch or args.batch, log)
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"written {args.out}")


if __name__ == "__main__":
    main()
