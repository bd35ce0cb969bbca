"""Shared fixtures: a fresh, real database per test on SQLite, PostgreSQL and MariaDB.

PostgreSQL and MariaDB tests skip when the server is unreachable, unless REAPER_REQUIRE_DBS names it
(`.ci/run` sets it), in which case they fail: CI can never go green by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

SERVER_URLS = {
    "postgresql": os.environ.get("REAPER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("REAPER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
REQUIRED = {d.strip() for d in os.environ.get("REAPER_REQUIRE_DBS", "").split(",") if d.strip()}
_reachable: dict[str, str | None] = {}


def _unreachable_reason(kind: str) -> str | None:
    if kind not in _reachable:
        try:
            eng = sa.create_engine(SERVER_URLS[kind])
            with eng.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            eng.dispose()
            _reachable[kind] = None
        except Exception as exc:  # noqa: BLE001
            _reachable[kind] = f"{kind} unreachable at {make_url(SERVER_URLS[kind]).render_as_string()}: {exc}"
    return _reachable[kind]


def require(kind: str) -> None:
    """Skip (or fail, when REAPER_REQUIRE_DBS names it) unless the database server answers."""
    reason = _unreachable_reason(kind)
    if reason:
        if kind in REQUIRED:
            pytest.fail(f"REAPER_REQUIRE_DBS requires {kind}: {reason}")
        pytest.skip(reason)


@dataclass
class TestDB:
    """A fresh empty database: `url` for the reaper, `engine` (read-write) for setting up fixtures."""

    __test__ = False
    kind: str
    url: str
    engine: Engine


def _server_db(kind: str) -> Iterator[TestDB]:
    require(kind)
    name = f"reaper_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(SERVER_URLS[kind], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = make_url(SERVER_URLS[kind]).set(database=name)
    engine = sa.create_engine(url)
    try:
        yield TestDB(kind, url.render_as_string(hide_password=False), engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            if kind == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def _sqlite_db(tmp_path: Path) -> Iterator[TestDB]:
    path = tmp_path / "auth.sqlite"
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    with engine.connect():
        pass  # creates the file
    try:
        yield TestDB("sqlite", url, engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDB]:
    """A fresh database on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield from _sqlite_db(tmp_path)
    else:
        yield from _server_db(request.param)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[TestDB]:
    yield from _sqlite_db(tmp_path)


@pytest.fixture
def pg_db() -> Iterator[TestDB]:
    yield from _server_db("postgresql")


@pytest.fixture
def mariadb_db() -> Iterator[TestDB]:
    yield from _server_db("mariadb")


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDB]:
    """A fresh database on SQLite, PostgreSQL and MariaDB (profiles that run on all three)."""
    if request.param == "sqlite":
        yield from _sqlite_db(tmp_path)
    else:
        yield from _server_db(request.param)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_db(request: pytest.FixtureRequest) -> Iterator[TestDB]:
    """A fresh database on PostgreSQL and on MariaDB (servers that support no SQLite: Hydra, Keycloak)."""
    yield from _server_db(request.param)
