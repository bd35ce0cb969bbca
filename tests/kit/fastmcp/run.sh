#!/usr/bin/env bash
# Proving ground for FastMCP's OAuthProxy store: upstream IdP + proxy (Redis, then the default encrypted
# file tree), 6 churning + 3 well-behaved sessions + a flood of 25, then a decoded dump of every key.
# Needs the project's test environment (pip install -e '.[test]') and Redis on 127.0.0.1:6379.
# Extra arguments go to run.py (e.g. --backend redis --redis-db 13 --encrypt --flood-mode raw).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
export FASTMCP_LOG_LEVEL="${FASTMCP_LOG_LEVEL:-WARNING}" FASTMCP_ENABLE_RICH_LOGGING=false PYTHONDONTWRITEBYTECODE=1
exec "$PYTHON" "$HERE/run.py" "$@"
