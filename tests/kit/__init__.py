"""The test kit, registered as a pytest plugin (`kit.plugin`, named in tests/conftest.py).

- `databases`: a fresh real database per test (SQLite, PostgreSQL, MariaDB), the skip-or-fail rule for servers
  that do not answer, and plain queries over tables (rows, snapshots, counts per client).
- `plugin`: the fixtures tests use (`db`, `sqlite_db`, `pg_db`, `mariadb_db`, `any_db`, `server_db`) and the
  `pg` / `mariadb` markers they put on the tests that use them.
- `cli`: the real CLI in a subprocess, `serve` as a real process, external tools, and `poll`, the one bounded
  wait every test uses.
- `config`: reaper configurations (in memory and as TOML files) with the caps out of the way.
- `ledger`: reading the reaper's runs and tombstones.
- `prometheus`: parsing expositions, promtool, the rules and the dashboard, a real Prometheus.
- `proxy`: a TCP proxy in front of a database that refuses or cuts connections on demand.
- `schemas`: one module per server: its schema as the server makes it, and row writers.
- `better_auth`: the real Better Auth servers (npm), driven over HTTP.
"""
