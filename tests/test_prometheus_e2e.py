"""End to end with a real Prometheus: `dcr-reaper serve` on an Authlib database with DCR churn, scraped
every second by /usr/bin/prometheus with the alert rules loaded; then every PromQL expression of the dashboard
and of the rules is evaluated through the HTTP API.

What it proves: each expression is valid against a real server and real series (status success); the
selectors match what dcr-reaper really exports, under the job name the rules expect; the panels that should
show data do; the values follow the database (orphans, live, the registrations added while running); every
rule evaluates without error. Bounded: the scenario has 45 s, the test a hard 90 s; both processes are
stopped at the end.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kit.cli import ServeProcess, poll
from kit.databases import TestDB
from kit.prometheus import (
    Prometheus,
    dashboard_exprs,
    epoch,
    get_json,
    load_dashboard,
    load_rules,
    substitute,
)
from kit.schemas.authlib import LOOP_FAMILY_LABEL, create_schema, register_more, seed_churn

JOB = "dcr-reaper"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
DEADLINE = 45.0  # seconds for the whole scenario; each wait below takes from it
# Panels that stay empty in this scenario, and why.
EMPTY_PANELS = {"Reaped per hour by reason": "the service runs report-only (service.reap = false)"}


@pytest.fixture
def stack(pg_db: TestDB, tmp_path: Path) -> Iterator[tuple[TestDB, Prometheus, Callable[[], str]]]:
    """dcr-reaper serve (1 s scans) and Prometheus (1 s scrapes and rule evaluations) on a churning DB."""
    create_schema(pg_db.engine)
    seed_churn(pg_db.engine)
    args = ["--profile", "authlib", "--database-url", pg_db.url, "--interval", "1s"]
    with ServeProcess(args, tmp_path, "reaper") as reaper:
        reaper.wait_started()
        with Prometheus(tmp_path, JOB, [f"127.0.0.1:{reaper.port}"]) as prom:

            def logs() -> str:
                return "\n".join(
                    f"--- {name}\n{text[-3000:]}"
                    for name, text in (("reaper", reaper.output()), ("prometheus", prom.output()))
                )

            yield pg_db, prom, logs
    assert reaper.proc.returncode is not None and prom.proc.returncode is not None


def test_dashboard_and_rules_evaluate_on_a_real_prometheus(stack: tuple[TestDB, Prometheus, Callable[[], str]]) -> None:
    db, prom, logs = stack
    deadline = time.monotonic() + DEADLINE

    def wait_for(what: str, check: Callable[[], bool]) -> None:
        """Poll `check` until true; fail with `what` and the logs once the scenario's deadline has passed."""
        left = max(deadline - time.monotonic(), 0)
        poll(check, left, what, interval=0.25, details=logs, ignore=(OSError, AssertionError, KeyError, IndexError))

    family = f'{{job="{JOB}", family="{LOOP_FAMILY_LABEL}"}}'

    # dcr-reaper scanned (7 orphans, 2 live) and Prometheus scraped it, under the job the rules select.
    orphans = f'dcr_clients{{job="{JOB}", verdict="orphan"}}'
    wait_for("the first scrape of a scan", lambda: prom.value(orphans) == 7)
    assert prom.value(f'up{{job="{JOB}"}}') == 1

    # Registrations while it runs: two rounds, each seen by a later scan and counted once.
    register_more(db.engine, 3)
    wait_for("3 observed registrations", lambda: prom.value(f"dcr_registrations_observed_total{family}") == 3)
    time.sleep(1.1)  # registration times have one-second resolution: the next round must be newer
    register_more(db.engine, 2)
    wait_for("5 observed registrations", lambda: prom.value(f"dcr_registrations_observed_total{family}") == 5)
    wait_for(
        "the counter's increase over a range",
        lambda: (prom.value(f"sum(increase(dcr_registrations_observed_total{family}[1m]))") or 0) > 0,
    )
    # Every rule (recording and alerting) has been evaluated at least once since.
    started = time.time()
    wait_for(
        "a rule evaluation after the registrations",
        lambda: all(epoch(r["lastEvaluation"]) > started for r in prom.rules()),
    )

    # --- the dashboard: every query succeeds; every panel but the documented ones shows data ---------------
    for title, expr in dashboard_exprs():
        result = prom.query(expr)
        if title in EMPTY_PANELS:
            assert result == [], (title, expr, result)
        else:
            assert result, f"panel {title!r}: no data for {expr!r}"
    # The job variable's query (a Grafana function): the label values it lists include this job.
    (job_var,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "job"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", job_var["query"])
    assert match, job_var["query"]
    metric, label = match.groups()
    query = urllib.parse.urlencode({"match[]": metric})
    values = get_json(f"{prom.base}/api/v1/label/{label}/values?{query}")
    assert values["status"] == "success" and JOB in values["data"]

    # The panels' numbers follow the database: 9 seeded + 5 new clients, the new ones still young.
    by_verdict = {
        r["metric"]["verdict"]: float(r["value"][1])
        for r in prom.query(substitute('max by (verdict) (dcr_clients{job=~"$job"})'))
    }
    assert by_verdict == {"live": 2, "young": 5, "orphan": 7, "abandoned": 0, "idle": 0, "protected": 0}
    assert prom.value(substitute('max(dcr_last_scan_clients{job=~"$job"})')) == 14
    assert prom.value(substitute('max(dcr_families{job=~"$job", state="churning"})')) == 1
    assert prom.value(substitute('sum(dcr_leader{job=~"$job"})')) == 1
    assert prom.value(substitute('sum(increase(dcr_scan_failures_total{job=~"$job"}[1h]))')) == 0
    age = prom.value(substitute('time() - max(dcr_last_success_timestamp_seconds{job=~"$job"})'))
    assert age is not None and 0 <= age < 10
    top = prom.query(substitute('topk(10, max by (family) (dcr_family_clients{job=~"$job", verdict="orphan"}))'))
    assert {r["metric"]["family"]: float(r["value"][1]) for r in top}[LOOP_FAMILY_LABEL] == 7

    # --- the rules: every expression succeeds; every selector in them matches real series ------------------
    rules = load_rules()
    for rule in rules:
        prom.query(rule["expr"])
        for selector in re.findall(r"\b[a-z_:]+\{[^}]*\}", rule["expr"]):
            name = rule.get("alert") or rule["record"]
            assert prom.query(selector), f"{name}: {selector} matches no series"
    assert prom.value("dcr:client_cap") == 200 and prom.value("dcr:scan_interval_seconds") == 300
    loaded = {r["name"]: r for r in prom.rules()}
    assert set(loaded) == {r.get("alert") or r["record"] for r in rules}
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
    # A healthy, scraped reaper: the alerts about the reaper itself stay quiet (they would go pending at once
    # on a job name or label mismatch); the churn ones need far more time than this test ('for:').
    for name in ("DCRReaperDown", "DCRReaperLastSuccessStale", "DCRScanFailing", "DCRClientCountNearCap"):
        assert loaded[name]["state"] == "inactive", (name, loaded[name])
    assert prom.query(next(r["expr"] for r in rules if r.get("alert") == "DCRReaperDown")) == []
    # The re-auth loop condition's first half holds already: one family churns.
    assert prom.query(f'max by (namespace, job) (dcr_families{{job="{JOB}", state="churning"}}) > 0')
