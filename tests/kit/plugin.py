"""The kit's pytest face: the database fixtures, and the `pg` / `mariadb` markers they imply.

A test that uses PostgreSQL or MariaDB (through any fixture, directly or not, or through a parameter of `db`,
`any_db` or `server_db`) is marked at collection, so `-m "not mariadb"` or `-m "not pg"` leaves out exactly
the tests that need that server, parameter by parameter. A fixture of a test module that opens a server
itself declares it with `@database_fixture("postgresql")`. The markers are declared in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kit import databases
from kit.databases import TestDB
from kit.replica import Replica, streaming_replica

MARKER = {"postgresql": "pg", "mariadb": "mariadb"}
# Fixture name -> the server it opens (filled by database_fixture).
SERVER_FIXTURES: dict[str, str] = {}
# Fixtures parametrized by database kind: the test's parameter says which server it opens.
PARAMETRIZED = ("db", "any_db", "server_db")

F = TypeVar("F", bound=Callable[..., Any])


def database_fixture(kind: str, **fixture_args: Any) -> Callable[[F], F]:
    """A fixture that opens a `kind` server: the tests that use it get its marker."""

    def register(fn: F) -> F:
        SERVER_FIXTURES[fn.__name__] = kind
        return pytest.fixture(fn, **fixture_args)  # type: ignore[return-value]

    return register


@pytest.fixture(scope="session", autouse=True)
def _server_databases() -> Iterator[None]:
    """At the end of the session: drop the spare databases and wait for every drop."""
    yield
    databases.SPARES.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDB]:
    """A fresh database on SQLite and on PostgreSQL."""
    yield from databases.fresh_db(request.param, tmp_path)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[TestDB]:
    yield from databases.sqlite_db(tmp_path)


@database_fixture("postgresql")
def pg_db() -> Iterator[TestDB]:
    yield from databases.server_db("postgresql")


@database_fixture("postgresql", scope="module")
def pg_replica() -> Iterator[Replica]:
    """A streaming hot standby of the PostgreSQL test server (kit.replica), for one test module."""
    databases.require("postgresql")
    with streaming_replica(databases.SERVER_URLS["postgresql"]) as replica:
        yield replica


@database_fixture("mariadb")
def mariadb_db() -> Iterator[TestDB]:
    yield from databases.server_db("mariadb")


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDB]:
    """A fresh database on SQLite, PostgreSQL and MariaDB (profiles that run on all three)."""
    yield from databases.fresh_db(request.param, tmp_path)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_db(request: pytest.FixtureRequest) -> Iterator[TestDB]:
    """A fresh database on PostgreSQL and on MariaDB (servers that support no SQLite: Hydra, Keycloak)."""
    yield from databases.server_db(request.param)


def servers_of(item: pytest.Item) -> set[str]:
    """The database servers a collected test opens, read from its fixtures and its parameters."""
    names = set(getattr(item, "fixturenames", ()))
    kinds = {SERVER_FIXTURES[n] for n in names & SERVER_FIXTURES.keys()}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        kinds |= {callspec.params[n] for n in PARAMETRIZED if n in names and n in callspec.params}
    return kinds & MARKER.keys()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in sorted(servers_of(item)):
            item.add_marker(MARKER[kind])
