"""Fixtures: the proving-ground server on a fresh database (SQLite and PostgreSQL), after a simulated run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from reaper.config import Config, load_config

from .clients import HOUR, Scenario, run_scenario
from .server import RunningServer, SimClock, create_schema

SESSIONS = 18  # the churner registers on every other session: 9 clients, 8 loop cycles
GAP = 2 * HOUR
END_MARGIN = 3 * HOUR  # the run ends this long before the real now: later sessions stay in the past too

# Thresholds scaled to the simulated day and a half (the defaults are for production rhythms).
CLASSIFY = {"young_for": "30m", "abandoned_after": "1h", "churn_window": "2d", "churn_min_registrations": 5}
POLICY = {"min_age": "1h", "max_per_run": 10_000, "max_fraction": 1.0, "pause": 0, "late_token_sweep": 0}


def reaper_config(url: str, profile: str = "authlib", **sections: Any) -> Config:
    """The reaper's configuration for a proving-ground database (no config file, no environment)."""
    data: dict[str, Any] = {
        "database_url": url,
        "profile": profile,
        "classify": dict(CLASSIFY),
        "policy": dict(POLICY),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, data, environ={})


@pytest.fixture
def ground(db: Any) -> Iterator[Scenario]:
    """SESSIONS sessions (churner, well-behaved client, one flood) against the real Authlib server."""
    create_schema(db.engine)
    clock = SimClock(time.time() - SESSIONS * GAP - END_MARGIN)
    server = RunningServer(db.engine, clock)
    scenario = None
    try:
        scenario = run_scenario(server, sessions=SESSIONS, gap=GAP)
        yield scenario
    finally:
        if scenario is not None:
            scenario.close()
        else:
            server.close()
