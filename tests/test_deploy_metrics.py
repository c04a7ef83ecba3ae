"""Every metric the alerts and the dashboard use is one the server registers (service/metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "trimserve.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
# A series name outside a recording rule's colon-separated name, with its optional {matchers}.
SERIES = re.compile(r"(?<![\w:])(trimserve_\w+)(?![\w:])(\{[^}]*\})?")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def exposed_series() -> dict[str, set[str]]:
    """Series name -> its label names, as the server's registry exposes them."""
    series: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            for suffix in SUFFIXES[metric._type]:
                series[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def rule_expressions() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"]]


def all_expressions() -> list[str]:
    return rule_expressions() + dashboard_expressions(json.loads(DASHBOARD.read_text()))


def test_metric_names_and_labels_in_deploy_exist_on_the_server() -> None:
    series = exposed_series()
    used = set()
    for expr in all_expressions():
        for name, matchers in SERIES.findall(expr):
            assert name in series, f"{name} (in {expr!r}) is not a series service.metrics.Metrics exposes"
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= series[name] | TARGET_LABELS, f"{expr!r}: {name} has no labels {labels - series[name]}"
            used.add(name)
        for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            grouping = {label.strip() for label in clause.split(",") if label.strip()}
            known = set().union(*series.values()) | TARGET_LABELS
            assert grouping <= known, f"{expr!r} groups by unknown labels {grouping - known}"
    assert used, "no trimserve metric found in deploy/"


def test_no_metric_name_anywhere_in_deploy_is_unknown() -> None:
    """Catches names outside expressions too (descriptions, compose, k8s), e.g. after a rename."""
    series = exposed_series()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for name, _ in SERIES.findall(path.read_text()):
                assert name in series, f"{path.relative_to(DEPLOY)} mentions {name}, which the server does not export"


@pytest.mark.parametrize(
    "series",
    [
        "trimserve_time_to_first_token_seconds_bucket",
        "trimserve_time_per_output_token_seconds_bucket",
        "trimserve_request_latency_seconds_bucket",
        "trimserve_generated_tokens_total",
        "trimserve_requests_total",
        "trimserve_process_resident_memory_bytes",
        "trimserve_cuda_memory_allocated_bytes",
        "trimserve_cuda_memory_peak_bytes",
        "trimserve_shadow_nll_sum",
        "trimserve_shadow_top1_agreement_sum",
        "trimserve_shadow_items_total",
    ],
)
def test_dashboard_shows_each_comparison(series: str) -> None:
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert any(series in e for e in exprs), f"the dashboard never plots {series}"


def test_dashboard_has_p50_and_p95_of_ttft_and_tpot_per_variant() -> None:
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    for family in ("trimserve_time_to_first_token_seconds", "trimserve_time_per_output_token_seconds"):
        for q in ("0.5", "0.95"):
            wanted = f"histogram_quantile({q}, sum by (variant, le) (rate({family}_bucket"
            assert any(e.startswith(wanted) for e in exprs), f"no per-variant p{q} of {family}"


def test_dashboard_structure_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == uid
    refs = [[t["refId"] for t in p.get("targets", [])] for p in panels]
    assert all(len(r) == len(set(r)) for r in refs), "refIds must be unique within a panel"
    variable = dashboard["templating"]["list"][0]
    assert variable["name"] == "variant" and variable["multi"] and variable["includeAll"]


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/trimserve.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
