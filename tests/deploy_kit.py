"""Paths and loaders for the deployment artifacts (tests/test_deploy.py, tests/test_prometheus_e2e.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from reaper_testkit import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "dcr-reaper-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "dcr-reaper-rules.test.yaml"
DASHBOARD = REPO / "grafana" / "dcr-reaper.json"
ALERTS_DOC = REPO / "docs" / "alerts.md"
METRICS_DOC = REPO / "docs" / "metrics.md"
ROLES_SQL = DEPLOY / "sql" / "authlib-roles.sql"

EXPECTED_ALERTS = {
    "DCRChurnHigh",
    "DCROrphansGrowing",
    "DCRClientCountNearCap",
    "DCRReaperDown",
    "DCRReaperLastSuccessStale",
    "DCRScanFailing",
    "DCRSuspectedReauthLoop",
}
# Values for Grafana's variables when a dashboard query is sent to Prometheus directly.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m", "$job": "dcr-reaper"}


def tool(name: str) -> str:
    """The path of a command the tests need; a clear failure (not a skip) when it is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"'{name}' is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def load_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the rules file."""
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alert_rules() -> dict[str, dict[str, Any]]:
    """The alerting rules by name."""
    return {r["alert"]: r for r in load_rules() if "alert" in r}


def load_dashboard() -> dict[str, Any]:
    """grafana/dcr-reaper.json, parsed."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, Grafana variables substituted."""
    out = []
    for panel in load_dashboard()["panels"]:
        for target in panel["targets"]:
            out.append((panel["title"], substitute(target["expr"])))
    return out


def substitute(expr: str) -> str:
    """Replace Grafana's variables by values Prometheus understands (longest names first)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr
