"""A token-issuing load like an Authlib token endpoint: look the client up, insert a token, commit.

Runs for a fixed time (or until SIGTERM) in its own process and prints one JSON line:
[[start_unix_time, latency_seconds], ...].
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
import uuid

import psycopg

STOP = threading.Event()


def worker(dsn: str, client_ids: list[str], until: float, pace: float, out: list, seed: int) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn) as conn:
        while time.time() < until and not STOP.is_set():
            cid = rng.choice(client_ids)
            t0 = time.time()
            p0 = time.perf_counter()
            with conn.transaction():
                conn.execute("SELECT client_metadata FROM oauth2_client WHERE client_id = %s", (cid,)).fetchone()
                conn.execute(
                    "INSERT INTO oauth2_token (id, client_id, token_type, access_token, refresh_token, issued_at,"
                    " expires_in) VALUES (nextval('bench_token_id'), %s, 'Bearer', %s, %s, %s, 3600)",
                    (cid, uuid.uuid4().hex, uuid.uuid4().hex, int(t0)),
                )
            out.append((t0, time.perf_counter() - p0))
            time.sleep(pace)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dsn")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pace", type=float, default=0.005, help="sleep between requests per thread")
    args = ap.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE IF NOT EXISTS bench_token_id START 100000000")
        # Live clients only: the auth server serves the clients people use.
        live = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT client_id FROM oauth2_token WHERE access_token_revoked_at = 0 LIMIT 2000"
            )
        ]
    # SIGTERM ends the load early; the samples are still printed.
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    until = time.time() + args.seconds
    samples: list = []
    threads = [
        threading.Thread(target=worker, args=(args.dsn, live, until, args.pace, samples, i))
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
