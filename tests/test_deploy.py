"""Deployment artifacts: alert rules (promtool), dashboard, Kubernetes manifests (kubernetes-validate), the
files generated from them, Dockerfile / compose / systemd, and the least-privilege PostgreSQL roles on a real
database.

The end-to-end run of the dashboard and the rules against a real Prometheus is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import make_url

from kit.cli import REPO, ServeProcess, assert_errors, clean_env, run_cli, tool
from kit.databases import TestDB
from kit.prometheus import (
    DASHBOARD,
    RULES,
    RULES_TEST,
    alert_rules,
    dashboard_exprs,
    load_dashboard,
    load_rules,
    promtool,
)
from kit.schemas.authlib import create_schema, seed_churn
from reaper.config import load_config
from reaper.profiles import bind_profile
from reaper.profiles import profile_reads as profile_columns

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
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


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w)", text):
        total += int(number) * units[unit]
    return total


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(dcr_[a-z_]+)` \|", METRICS_DOC.read_text(), flags=re.M))


# --- alert rules ------------------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in res.stdout


@pytest.mark.slow
def test_promtool_rule_unit_tests_pass() -> None:
    res = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_check_config_accepts_the_example_prometheus_config() -> None:
    config = DEPLOY / "prometheus" / "prometheus.yml"
    res = promtool("check", "config", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    scrape = yaml.safe_load(config.read_text())["scrape_configs"]
    assert [s["job_name"] for s in scrape] == ["dcr-reaper"], 'the alert rules select job="dcr-reaper"'


def test_the_rules_define_exactly_the_documented_alerts() -> None:
    assert set(alert_rules()) == EXPECTED_ALERTS


def test_every_alert_fires_in_one_unit_test_and_stays_silent_in_another() -> None:
    """Silent cases count only when evaluated after the alert's `for:` (pending is trivially silent)."""
    rules = alert_rules()
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            assert name in rules, f"unit test for unknown alert {name}"
            if check["exp_alerts"]:
                fires.add(name)
            elif duration_seconds(check["eval_time"]) >= duration_seconds(rules[name].get("for", "0s")):
                silent.add(name)
    assert fires == EXPECTED_ALERTS, f"no firing case for {EXPECTED_ALERTS - fires}"
    assert silent == EXPECTED_ALERTS, f"no silent case (after 'for') for {EXPECTED_ALERTS - silent}"


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    anchors = github_anchors(ALERTS_DOC.read_text(encoding="utf-8"))
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"docs/alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/alerts.md has no section '## {name}'"


def test_the_cap_and_the_scan_interval_are_recording_rules_every_alert_reads() -> None:
    records = {r["record"]: r["expr"] for r in load_rules() if "record" in r}
    assert records == {"dcr:client_cap": "vector(200)", "dcr:scan_interval_seconds": "vector(300)"}
    alerts = alert_rules()
    assert "scalar(dcr:client_cap)" in alerts["DCRClientCountNearCap"]["expr"]
    assert "scalar(dcr:scan_interval_seconds)" in alerts["DCRReaperLastSuccessStale"]["expr"]
    assert "time() - " in alerts["DCRReaperLastSuccessStale"]["expr"]
    assert 'absent(up{job="dcr-reaper"}' in alerts["DCRReaperDown"]["expr"]


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    documented = documented_metrics()
    assert "dcr_clients" in documented and len(documented) >= 10, "docs/metrics.md table not found"
    exprs = [r["expr"] for r in load_rules()] + [e for _, e in dashboard_exprs()]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bdcr_[a-z_]+", e)}
    assert used, "no dcr_ metric found in the expressions"
    assert used <= documented, f"undocumented metrics: {sorted(used - documented)}"


# --- dashboard --------------------------------------------------------------------------------------------


def test_dashboard_has_a_prometheus_datasource_variable_used_by_every_panel() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dash["panels"]:
        assert panel["datasource"] == wanted, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
    assert variables["job"]["datasource"] == wanted


def test_every_dashboard_panel_has_title_description_unit_and_a_query() -> None:
    panels = load_dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "duplicate panel ids"
    for panel in panels:
        assert panel["title"].strip(), panel
        assert len(panel.get("description", "").strip()) > 20, f"{panel['title']}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_dashboard_has_the_requested_panels() -> None:
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in load_dashboard()["panels"]}
    assert "increase(dcr_registrations_observed_total" in by_title["Registrations per hour by family"]
    assert "[1h]" in by_title["Registrations per hour by family"]
    assert 'verdict="orphan"' in by_title["Orphans over time"]
    assert "by (verdict)" in by_title["Clients by verdict"]
    assert "dcr_reaped_clients_total" in by_title["Reaped per hour by reason"]
    assert "reason" in by_title["Reaped per hour by reason"]
    assert by_title["Top churning families"].startswith("topk(")
    assert 'dcr_families{job=~"$job", state="churning"}' in by_title["Suspected re-auth loops"]
    assert "dcr_last_success_timestamp_seconds" in by_title["Last successful scan"]
    assert "dcr_scan_failures_total" in by_title["Scan failures (1h)"]
    assert "dcr_scan_duration_seconds" in by_title["Scan duration"]
    assert "dcr_leader" in by_title["Leader"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule): a syntax error fails here, without a Prometheus."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_points_at_a_file_provider() -> None:
    config = yaml.safe_load((REPO / "grafana/provisioning/dashboards.yaml").read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- generated Kubernetes wrappers ------------------------------------------------------------------------


def test_generated_manifests_are_up_to_date() -> None:
    res = subprocess.run(
        [sys.executable, str(DEPLOY / "render.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_prometheusrule_holds_exactly_the_rules_file() -> None:
    resource = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == yaml.safe_load(RULES.read_text())


def test_dashboard_configmap_embeds_the_dashboard_byte_for_byte() -> None:
    resource = yaml.safe_load((K8S / "grafana-dashboard-configmap.yaml").read_text())
    assert resource["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert resource["data"] == {"dcr-reaper.json": DASHBOARD.read_text(encoding="utf-8")}


# --- Kubernetes manifests ---------------------------------------------------------------------------------

# kubernetes-validate ships schemas for the built-in kinds only. PrometheusRule and PodMonitor are Prometheus
# Operator CRDs: they get the strict structural schemas below instead, written from the
# monitoring.coreos.com/v1 CRDs and limited to the fields these manifests may use (anything else is rejected,
# as --strict does).
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "query_offset": DURATION,
                            "labels": STRING_MAP,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {
            "enum": [
                "replace",
                "keep",
                "drop",
                "keepequal",
                "dropequal",
                "hashmod",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "lowercase",
                "uppercase",
            ]
        },
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
    },
}
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": STRING_MAP,
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["key", "operator"],
                                "additionalProperties": False,
                                "properties": {
                                    "key": {"type": "string"},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": RELABEL},
                            "metricRelabelings": {"type": "array", "items": RELABEL},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {"PrometheusRule": PROMETHEUS_RULE_SCHEMA, "PodMonitor": PODMONITOR_SCHEMA}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every document of every file in deploy/kubernetes."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {name: doc for name, doc in manifests() if doc["kind"] == kind}


@pytest.mark.parametrize("name,resource", manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly(name: str, resource: dict[str, Any]) -> None:
    if resource["kind"] in CRD_SCHEMAS:
        # No schema in kubernetes-validate for CRDs (it only warns): the structural schema above instead.
        with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
            kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
        jsonschema.validate(resource, CRD_SCHEMAS[resource["kind"]])
    else:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_validate_cli_passes_and_skips_only_the_crds() -> None:
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    res = subprocess.run([cli, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ERROR" not in res.stdout
    warned = re.findall(r"Couldn't find schema for kind (\w+)", res.stdout)
    assert sorted(warned) == ["PodMonitor", "PrometheusRule"], res.stdout


def test_the_structural_crd_schemas_reject_mistakes() -> None:
    """The hand-written CRD schemas can fail: a misspelt field and a wrong duration are rejected."""
    rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    rule["spec"]["groups"][1]["rules"][0]["fro"] = "5m"
    with pytest.raises(jsonschema.ValidationError, match="fro"):
        jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, PODMONITOR_SCHEMA)


def test_native_sidecar_needs_kubernetes_1_28_and_the_plain_variant_works_on_older_clusters() -> None:
    deployments = by_kind("Deployment")
    native, plain = deployments["deployment-native-sidecar.yaml"], deployments["deployment-sidecar.yaml"]
    oldest = kubernetes_validate.utils.all_versions()[0]
    kubernetes_validate.validate(plain, oldest, strict=True)
    kubernetes_validate.validate(native, "1.29", strict=True)
    if tuple(map(int, oldest.split(".")[:2])) >= (1, 28):
        pytest.skip(f"this kubernetes-validate has no schema older than {oldest} to show the difference")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(native, oldest, strict=True)


def reaper_container(deployment: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The dcr-reaper container and where it sits: 'initContainers' (native sidecar) or 'containers'."""
    spec = deployment["spec"]["template"]["spec"]
    for where in ("initContainers", "containers"):
        for container in spec.get(where, []):
            if container["name"] == "dcr-reaper":
                return container, where
    raise AssertionError("no dcr-reaper container")


def test_deployments_run_dcr_reaper_as_documented() -> None:
    deployments = by_kind("Deployment")
    assert set(deployments) == {
        "deployment-native-sidecar.yaml",
        "deployment-sidecar.yaml",
        "deployment-standalone.yaml",
    }
    (secret,) = by_kind("Secret").values()
    config_map = by_kind("ConfigMap")["configmap.yaml"]
    (monitor,) = by_kind("PodMonitor").values()
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        container, where = reaper_container(deployment)
        containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        if name == "deployment-native-sidecar.yaml":
            assert where == "initContainers" and container["restartPolicy"] == "Always"
            assert [c["name"] for c in pod["spec"]["containers"]] == ["auth-server"]
        elif name == "deployment-sidecar.yaml":
            assert where == "containers" and "initContainers" not in pod["spec"]
            assert [c["name"] for c in containers] == ["auth-server", "dcr-reaper"]
        else:
            assert [c["name"] for c in containers] == ["dcr-reaper"]
        assert container["args"] == ["serve"]
        env = {e["name"]: e for e in container["env"]}
        assert env["DCR_REAPER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "url",
        }
        assert "url" in secret["stringData"]
        (port,) = container["ports"]
        assert port["containerPort"] == 9465
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
        if name == "deployment-standalone.yaml":
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
        else:
            # A sidecar's readiness gates the auth server's pod: see the manifests' header comment.
            assert "readinessProbe" not in container
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/etc/dcr-reaper"]]["configMap"]["name"] == config_map["metadata"]["name"]
        assert env["DCR_REAPER_CONFIG"]["value"] == "/etc/dcr-reaper/config.toml"
        assert "emptyDir" in volumes[mounts["/tmp"]]
        # The PodMonitor finds this pod and this port.
        for key, value in monitor["spec"]["selector"]["matchLabels"].items():
            assert pod["metadata"]["labels"].get(key) == value, name
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == port["name"]


def test_podmonitor_names_the_job_the_rules_select() -> None:
    (monitor,) = by_kind("PodMonitor").values()
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"action": "replace", "targetLabel": "job", "replacement": "dcr-reaper"} in relabel


def test_the_configmap_holds_a_valid_dcr_reaper_config(tmp_path: Path) -> None:
    text = by_kind("ConfigMap")["configmap.yaml"]["data"]["config.toml"]
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(str(path), {"database_url": "postgresql://dcr_reaper_report@db/auth"}, environ={})
    assert config.profile == "authlib"
    assert config.service.port == 9465 and config.service.reap is False
    assert config.service.scan_interval == 300, "keep dcr:scan_interval_seconds in the rules in step"


# --- Dockerfile, compose, systemd -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_builds_a_non_root_image_that_serves_by_default() -> None:
    """No Docker engine runs here, so the image is not built; its instructions are checked instead."""
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    ops = dict(instructions)
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0, "numeric non-root user (runAsNonRoot can verify it)"
    assert json.loads(ops["ENTRYPOINT"]) == ["dcr-reaper"]
    assert json.loads(ops["CMD"]) == ["serve"]
    assert ops["EXPOSE"] == "9465"
    run = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install /src" in run and f"--uid {user}" in run
    # Everything the image copies exists (the build context is the repository root).
    for op, arg in instructions:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (REPO / source).exists(), source


def test_docker_compose_example_wires_postgres_reaper_and_prometheus() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "dcr-reaper", "prometheus"} <= set(services)
    reaper = services["dcr-reaper"]
    build = reaper["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert reaper["environment"]["DCR_REAPER_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in reaper["environment"]["DCR_REAPER_DATABASE_URL"]
    assert reaper["read_only"] is True and reaper["cap_drop"] == ["ALL"]
    config = load_config(None, {}, environ=dict(reaper["environment"]))  # the settings are valid
    assert config.profile == "authlib" and config.service.scan_interval == 60
    assert reaper["depends_on"]["postgres"]["condition"] == "service_healthy"
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounts[target] = (DEPLOY / source).resolve()
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert mounts["/etc/prometheus/dcr-reaper-rules.yaml"] == RULES
    targets = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["dcr-reaper:9465"]
    # Grafana's file provider finds the dashboard where compose mounts it.
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards.yaml").read_text())["providers"][0]
    assert mounts[f"{provider['options']['path']}/dcr-reaper.json"] == DASHBOARD


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (DEPLOY / "systemd" / "dcr-reaper.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            assert current is not None
            sections[current].append((key, value))
    return sections


def test_systemd_unit_is_hardened() -> None:
    service = dict(systemd_unit()["Service"])
    assert service["ExecStart"].endswith("dcr-reaper serve")
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert service.get(key) == value, key
    assert "AF_INET" in service["RestrictAddressFamilies"]


def test_systemd_verify_and_security_score(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify insists that ExecStart exists: point it at this machine's dcr-reaper.
    exe = shutil.which("dcr-reaper") or str(Path(sys.executable).parent / "dcr-reaper")
    text = (DEPLOY / "systemd" / "dcr-reaper.service").read_text()
    unit = tmp_path / "dcr-reaper.service"
    unit.write_text(text.replace("/usr/local/bin/dcr-reaper", exe))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stdout + res.stderr
    # Exposure 0 (best) .. 10 (worst); threshold 20 = 2.0, systemd's "OK" band.
    res = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout[-800:] + res.stderr


# --- least-privilege PostgreSQL roles ---------------------------------------------------------------------


class Roles:
    """The roles of deploy/sql/authlib-roles.sql, unique to this test, on a seeded Authlib database."""

    def __init__(self, db: TestDB):
        suffix = uuid.uuid4().hex[:8]
        self.db = db
        self.report = f"dcr_reaper_report_{suffix}"
        self.reap = f"dcr_reaper_reap_{suffix}"
        self.ledger_schema = "dcr_reaper"
        self.password = uuid.uuid4().hex

    def url(self, role: str) -> str:
        """A URL that logs in as `role` (with a password, in case the server does not trust local logins)."""
        url = make_url(self.db.url).set(username=role, password=self.password)
        return url.render_as_string(hide_password=False)

    def set_passwords(self) -> None:
        """What an operator does after running the script (`\\password`)."""
        with self.db.engine.begin() as conn:
            for role in (self.report, self.reap):
                conn.execute(sa.text(f"ALTER ROLE \"{role}\" PASSWORD '{self.password}'"))

    def apply_sql(self) -> subprocess.CompletedProcess[str]:
        url = make_url(self.db.url)
        env = clean_env()
        if url.password:
            env["PGPASSWORD"] = url.password
        return subprocess.run(
            [
                tool("psql", "postgresql-client"),
                "-X",
                "-q",
                "-h",
                url.host or "127.0.0.1",
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                "-d",
                url.database or "",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                f"report_role={self.report}",
                "-v",
                f"reap_role={self.reap}",
                "-f",
                str(ROLES_SQL),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def drop(self) -> None:
        with self.db.engine.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename IN (:a, :b)"),
                {"a": self.report, "b": self.reap},
            )
            for role in (self.reap, self.report):
                if conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
                    conn.execute(sa.text(f'DROP OWNED BY "{role}" CASCADE'))
                    conn.execute(sa.text(f'DROP ROLE "{role}"'))
            conn.commit()


@pytest.fixture
def roles(pg_db: TestDB) -> Iterator[Roles]:
    create_schema(pg_db.engine)
    seed_churn(pg_db.engine)
    r = Roles(pg_db)
    try:
        res = r.apply_sql()
        assert res.returncode == 0, res.stderr
        r.set_passwords()
        yield r
    finally:
        r.drop()


def run_json(args: list[str], tmp_path: Path, **env: str) -> dict[str, Any]:
    res = run_cli(args + ["--format", "json"], tmp_path, env=clean_env(**env))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_roles_script_is_idempotent_and_converges(roles: Roles) -> None:
    """A second run succeeds and takes back what the file does not grant (here: a stray secret column)."""

    def secret_readable() -> bool:
        with roles.db.engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text("SELECT has_column_privilege(:r, 'oauth2_client', 'client_secret', 'SELECT')"),
                    {"r": roles.report},
                ).scalar()
            )

    assert not secret_readable()
    with roles.db.engine.begin() as conn:
        conn.execute(sa.text(f'GRANT SELECT (client_secret) ON oauth2_client TO "{roles.report}"'))
    assert secret_readable()
    res = roles.apply_sql()
    assert res.returncode == 0, res.stderr
    assert not secret_readable()


def test_report_role_gets_exactly_the_columns_the_profile_reads(roles: Roles) -> None:
    config = load_config(None, {"database_url": roles.db.url, "profile": "authlib"}, environ={})
    expected = {(table, col) for table, cols in profile_columns(bind_profile(config).profile).items() for col in cols}
    with roles.db.engine.connect() as conn:
        granted = set(
            conn.execute(
                sa.text(
                    "SELECT table_name, column_name FROM information_schema.column_privileges "
                    "WHERE grantee = :r AND privilege_type = 'SELECT'"
                ),
                {"r": roles.report},
            ).all()
        )
        table_grants = conn.execute(
            sa.text("SELECT count(*) FROM information_schema.table_privileges WHERE grantee = :r"), {"r": roles.report}
        ).scalar()
    assert granted == expected
    assert table_grants == 0, "the report role must not get whole tables (client_secret, access_token)"


@pytest.mark.slow
def test_report_role_reports_and_serves_but_the_database_refuses_its_writes(roles: Roles, tmp_path: Path) -> None:
    report = run_json(["report", "--profile", "authlib", "--database-url", roles.url(roles.report)], tmp_path)
    verdicts = {c["verdict"] for c in report["clients"]}
    assert len(report["clients"]) == 9 and verdicts == {"live", "orphan"}
    assert sum(c["verdict"] == "orphan" for c in report["clients"]) == 7
    # A plain read-write connection as the role: the grants alone refuse every write and every secret.
    engine = sa.create_engine(roles.url(roles.report))
    try:
        for statement in (
            "DELETE FROM oauth2_client",
            "UPDATE oauth2_client SET client_metadata = '{}'",
            "INSERT INTO oauth2_token (client_id, access_token, issued_at, expires_in,"
            " access_token_revoked_at, refresh_token_revoked_at) VALUES ('x', 'y', 0, 0, 0, 0)",
            "DELETE FROM oauth2_code",
            "SELECT client_secret FROM oauth2_client",
            "SELECT access_token FROM oauth2_token",
            "CREATE TABLE public.dcr_reaper_runs (id int)",
            "CREATE SCHEMA dcr_sneaky",
        ):
            with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    with roles.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar() == 9
    # The sidecar's job: serve as the read-only role is ready and exports the scan.
    assert_serves(roles.url(roles.report), tmp_path)


def assert_serves(url: str, tmp_path: Path) -> None:
    """`serve` starts, gets ready (a successful scan as leader) and exports the orphans; within 30 s."""
    with ServeProcess(["--profile", "authlib", "--database-url", url, "--interval", "1s"], tmp_path) as proc:
        proc.wait_started()
        # Ready as leader (a replica answers 503 until its first attempt on the lock, then 200 as a standby).
        proc.poll(lambda: proc.get("/readyz")[1].startswith("leader: "), 30, "/readyz as leader", ignore=(OSError,))
        text = proc.metrics()
        assert 'dcr_clients{verdict="orphan"} 7.0' in text
        assert "dcr_leader 1.0" in text and "dcr_scan_failures_total 0.0" in text


@pytest.mark.slow
def test_reap_role_applies_with_a_ledger_and_restores(roles: Roles, tmp_path: Path) -> None:
    url = roles.url(roles.reap)
    policy = {
        "DCR_REAPER_POLICY__MIN_AGE": "1h",
        "DCR_REAPER_POLICY__MAX_FRACTION": "1.0",
        "DCR_REAPER_POLICY__LATE_TOKEN_SWEEP": "0.2s",
    }
    result = run_json(["reap", "--apply", "--profile", "authlib", "--database-url", url], tmp_path, **policy)
    assert result["applied"] is True and result["planned"] == 7
    with roles.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar() == 2
        ledger = conn.execute(
            sa.text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = :s ORDER BY 1"),
            {"s": roles.ledger_schema},
        ).all()
        assert ledger == [
            ("dcr_reaper_aliases", roles.reap),
            ("dcr_reaper_evidence", roles.reap),
            ("dcr_reaper_restores", roles.reap),
            ("dcr_reaper_runs", roles.reap),
            ("dcr_reaper_tombstones", roles.reap),
        ]
        tombstones = conn.execute(
            sa.text(f"SELECT count(*) FROM {roles.ledger_schema}.dcr_reaper_tombstones WHERE run_id = :r"),
            {"r": result["run_id"]},
        ).scalar()
        assert tombstones == 7
        assert not conn.execute(
            sa.text("SELECT 1 FROM pg_tables WHERE tablename LIKE 'dcr_reaper_%' AND schemaname <> :s"),
            {"s": roles.ledger_schema},
        ).first()
    # restore puts every client back (INSERT is granted for this and for the late-token sweep).
    res = run_cli(["restore", "--run", result["run_id"], "--profile", "authlib", "--database-url", url], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "restored 7 client(s)" in res.stdout
    with roles.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar() == 9
    # Still no general write access: no updates of client data, no tables outside its ledger schema.
    engine = sa.create_engine(url)
    try:
        for statement in (
            "UPDATE oauth2_client SET client_metadata = '{}'",
            "UPDATE oauth2_token SET expires_in = 0",
            "CREATE TABLE public.sneaky (id int)",
        ):
            with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


REAP_ENV = {
    "DCR_REAPER_POLICY__MIN_AGE": "1h",
    "DCR_REAPER_POLICY__MAX_FRACTION": "1.0",
    "DCR_REAPER_POLICY__LATE_TOKEN_SWEEP": "0.2s",
}


@pytest.mark.slow
def test_report_role_cannot_reap(roles: Roles, tmp_path: Path) -> None:
    """The read-only role may not make the ledger: one line names the schema, the role and the fix."""
    env = clean_env(**REAP_ENV)
    res = run_cli(
        ["reap", "--apply", "--profile", "authlib", "--database-url", roles.url(roles.report)], tmp_path, env=env
    )
    (line,) = assert_errors(res, 1)
    assert "permission denied" in line
    assert f"role {roles.report}" in line and "schema public" in line
    assert "Fix: reap and restore as the reap role the roles script of deploy/sql/ makes" in line
    with roles.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth2_client")).scalar() == 9


@pytest.mark.slow
def test_a_ledger_a_superuser_made_moves_to_the_reap_role(roles: Roles, tmp_path: Path) -> None:
    """A first run as a superuser leaves its ledger in public: the reap role's error names it and the fix, and
    running the roles script again moves it into the reap role's schema, earlier runs still restorable."""
    superuser = roles.db.url
    first = run_json(["reap", "--apply", "--profile", "authlib", "--database-url", superuser], tmp_path, **REAP_ENV)
    assert first["planned"] == 7
    with roles.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM public.dcr_reaper_tombstones")).scalar() == 7

    url = roles.url(roles.reap)
    res = run_cli(
        ["reap", "--apply", "--profile", "authlib", "--database-url", url], tmp_path, env=clean_env(**REAP_ENV)
    )
    (line,) = assert_errors(res, 1)
    assert f"role {roles.reap}" in line and "public.dcr_reaper_*" in line
    assert "run the roles script of deploy/sql/ again as the owner" in line and "Moving an existing ledger" in line

    moved = roles.apply_sql()
    assert moved.returncode == 0, moved.stderr
    with roles.db.engine.connect() as conn:
        owners = conn.execute(
            sa.text("SELECT schemaname, tablename, tableowner FROM pg_tables WHERE tablename LIKE 'dcr_reaper_%'")
        ).all()
    assert {(s, o) for s, _, o in owners} == {(roles.ledger_schema, roles.reap)}, owners

    listed = run_json(["runs", "--profile", "authlib", "--database-url", url], tmp_path)
    assert [(r["id"], r["status"], r["acted"]) for r in listed] == [(first["run_id"], "ok", 7)]
    back = run_cli(["restore", "--run", first["run_id"][:8], "--profile", "authlib", "--database-url", url], tmp_path)
    assert back.returncode == 0, back.stderr
    assert "restored 7 client(s)" in back.stdout
    again = run_json(["reap", "--apply", "--profile", "authlib", "--database-url", url], tmp_path, **REAP_ENV)
    assert again["applied"] is True and len(again["acted"]) > 0


def test_roles_sql_documents_its_variables() -> None:
    text = ROLES_SQL.read_text()
    for variable in (
        "dbname",
        "schema",
        "client_table",
        "token_table",
        "code_table",
        "ledger_schema",
        "ledger_prefix",
        "report_role",
        "reap_role",
    ):
        assert re.search(rf"^--\s+{variable}\s", text, flags=re.M), variable
        assert f":{{?{variable}}}" in text, variable
