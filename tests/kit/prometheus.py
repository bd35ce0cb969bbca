"""Prometheus: reading an exposition, `promtool`, the alert rules and the Grafana dashboard, and a real
Prometheus server with its HTTP API."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kit.cli import tool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "dcr-reaper-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "dcr-reaper-rules.test.yaml"
DASHBOARD = REPO / "grafana" / "dcr-reaper.json"
# Values for Grafana's variables when a dashboard query is sent to Prometheus directly.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m", "$job": "dcr-reaper"}


# --- an exposition ----------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (sample name, labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS` (a skip, or under CI a failure, when it is not installed)."""
    command = [tool("promtool", "prometheus"), *args]
    return subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, encoding="utf-8", timeout=60)


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the exposition."""
    res = promtool("check", "metrics", stdin=text)
    assert res.returncode == 0, f"promtool check metrics exited {res.returncode}:\n{res.stdout}{res.stderr}"


# --- the rules and the dashboard ------------------------------------------------------------------------------


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


# --- a real Prometheus ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def epoch(rfc3339: str) -> float:
    """Seconds since the epoch of a Prometheus API timestamp (nanoseconds cut to microseconds)."""
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    base, fraction, zone = m.groups()
    parsed = datetime.fromisoformat(f"{base}{zone.replace('Z', '+00:00')}")
    return parsed.timestamp() + float(f"0.{fraction or 0}")


class Prometheus:
    """/usr/bin/prometheus scraping `targets` under `job` every second, the rules file loaded; its HTTP API."""

    def __init__(self, workdir: Path, job: str, targets: list[str]):
        binary = tool("prometheus")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; asserts the API answered status success and returns the result vector."""
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            body = get_json(url)
        except urllib.error.HTTPError as exc:  # 400 / 422: the expression itself is bad
            raise AssertionError(f"{expr!r}: HTTP {exc.code}: {exc.read().decode()[:500]}") from None
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in get_json(f"{self.base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
