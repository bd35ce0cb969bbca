"""Reaper configurations for tests: in memory (`make_config`) or as a TOML file for a subprocess
(`write_config`), with the caps and pauses out of the way unless a test is about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reaper.config import Config, load_config

# Caps out of the way unless a test is about them; no grace pauses unless a test wants them.
OPEN_POLICY: dict[str, Any] = {"max_per_run": 100_000, "max_fraction": 1.0, "pause": 0, "late_token_sweep": 0}


def make_config(
    url: str,
    profile: str = "authlib",
    policy: dict[str, Any] | None = None,
    classify: dict[str, Any] | None = None,
    **extra: Any,
) -> Config:
    """A configuration from these settings alone (no file, no environment)."""
    overrides: dict[str, Any] = {"database_url": url, "profile": profile, "policy": {**OPEN_POLICY, **(policy or {})}}
    if classify:
        overrides["classify"] = classify
    overrides.update(extra)
    return load_config(None, overrides, environ={})


def write_config(
    path: Path, policy: dict[str, Any], ledger_url: str | None = None, classify: dict[str, Any] | None = None
) -> Path:
    """A TOML configuration file: [policy] (over OPEN_POLICY), and [classify] and [ledger] when given."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[policy]"] + [f"{k} = {value(v)}" for k, v in {**OPEN_POLICY, **policy}.items()]
    if classify:
        lines += ["[classify]"] + [f"{k} = {value(v)}" for k, v in classify.items()]
    if ledger_url:
        lines += ["[ledger]", f"url = {value(ledger_url)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
