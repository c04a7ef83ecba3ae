"""Prometheus accepts deploy/, and a real Prometheus reads per-variant latency from `trimserve serve`.

Needs Debian's `prometheus` package (promtool and the server); `make test` installs it when run
as root, otherwise these tests skip and say so.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_deploy_metrics import DASHBOARD, dashboard_expressions
from tests.tiny_models import tiny_llama
from variants.format import BaseModelRef, VariantManifest
from variants.write import save_variant

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; `make test` does this as root)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus; `make test` does this as root)"
)
VARIANTS = ("full", "depth2")


def promtool(*args: str, cwd: Path = DEPLOY) -> str:
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_alert_rules_fire_as_intended() -> None:
    """Unit tests in tests/promtool: a slower variant and a failing one alert; a faster one does not."""
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml", cwd=ROOT / "tests" / "promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[str]:
    """`trimserve serve` on loopback with two tiny random variants."""
    root = tmp_path_factory.mktemp("variants")
    argv = [sys.executable, "-m", "trimserve", "serve", "--host", "127.0.0.1"]
    for name, layers in zip(VARIANTS, (4, 2), strict=True):
        manifest = VariantManifest(name=name, base=BaseModelRef(source="tiny"), method="random")
        save_variant(tiny_llama(layers=layers), tokenizer, root / name, manifest)
        argv += ["--model", f"{name}={root / name}"]
    port = free_port()
    proc = subprocess.Popen(
        [*argv, "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, 120, "trimserve serve", proc)
    except AssertionError:
        print(stop(proc))
        raise
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[str]:
    """A real Prometheus on loopback scraping the server every second, with deploy/'s alert rules."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus", proc)
    except AssertionError:
        print(stop(proc))
        raise
    yield url
    stop(proc)


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


@needs_prometheus
def test_prometheus_reads_per_variant_latency_quantiles(server: str, prometheus: str) -> None:
    wait_for(lambda: query(prometheus, 'up{job="trimserve"} == 1'), 30, "the first scrape")
    slowest = 0.0
    for name in VARIANTS:
        for i in range(3):
            start = time.monotonic()
            response = httpx.post(
                f"{server}/v1/completions",
                json={"model": name, "prompt": f"request {i} to", "max_tokens": 4, "temperature": 0},
                timeout=60,
            )
            slowest = max(slowest, time.monotonic() - start)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == name

    expr = 'histogram_quantile(0.9, sum by (variant, le) (trimserve_request_latency_seconds_bucket{job="trimserve"}))'

    def every_variant_scraped() -> bool:
        counts = query(prometheus, 'sum by (variant) (trimserve_request_latency_seconds_count{job="trimserve"})')
        return {r["metric"]["variant"]: float(r["value"][1]) for r in counts} == dict.fromkeys(VARIANTS, 3.0)

    wait_for(every_variant_scraped, 30, "a scrape after the requests")
    p90 = {r["metric"]["variant"]: float(r["value"][1]) for r in query(prometheus, expr)}
    assert set(p90) == set(VARIANTS)
    for name, value in p90.items():
        # The quantile interpolates inside the bucket that holds the slowest request the client saw.
        assert 0 < value <= max(slowest, 0.01) * 2.5, f"{name}: p90 {value} s, slowest request {slowest} s"


@needs_prometheus
def test_dashboard_queries_and_rules_evaluate_against_the_live_server(server: str, prometheus: str) -> None:
    for expr in dashboard_expressions(json.loads(DASHBOARD.read_text())):
        if expr.startswith("label_values("):
            metric = expr.removeprefix("label_values(").split(",")[0]
            variants = {r["metric"]["variant"] for r in query(prometheus, metric)}
            assert set(VARIANTS) <= variants, f"{metric} lacks variants"
            continue
        query(prometheus, expr.replace("$__rate_interval", "1m").replace("$variant", ".*"))

    def rules() -> dict[str, dict]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    def evaluated_since_server_up() -> bool:
        current = rules()
        evaluated = all(r.get("lastEvaluation", "").startswith("2") for r in current.values())
        return evaluated and current["TrimserveDown"]["state"] == "inactive"

    wait_for(evaluated_since_server_up, 30, "rule evaluation with the server up")
    current = rules()
    declared = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    assert set(current) == {r.get("alert") or r["record"] for g in declared for r in g["rules"]}
    assert all(r["health"] == "ok" for r in current.values()), {n: r.get("lastError") for n, r in current.items()}
