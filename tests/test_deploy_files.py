"""The Dockerfile, compose stack and Kubernetes manifests agree with each other, the server and README.

No Docker engine or cluster runs here, so these tests read the files: stages, user, health
check, ports, volumes and settings must be what the docs say and what the server accepts.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.ab import experiments_from
from service.registry import read_config
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8000
UID = 10001


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def env(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for line in self.args("ENV"):
            pairs.update(item.split("=", 1) for item in shlex.split(line))
        return pairs


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (name -> default) and the stages, with continuation lines joined."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1].rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name, []))
        elif not stages and instruction == "ARG":
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return global_args, {s.name: s for s in stages}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def split_volume(volume: str) -> tuple[str, str]:
    """Compose `SOURCE:TARGET[:MODE]` -> (SOURCE, TARGET); SOURCE may hold `${VAR:-default}`."""
    if volume.endswith((":ro", ":rw")):
        volume = volume[:-3]
    source, target = volume.rsplit(":", 1)
    return source, target


def readme_section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"<!-- section: {name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start : end if end > 0 else None]


def test_parse_dockerfile_joins_continuations_and_names_stages() -> None:
    text = 'ARG A=1\n# note\nFROM x:1 AS one\nRUN a \\\n    && b\nFROM one AS two\nENV K=v L="w z"\n'
    global_args, stages = parse_dockerfile(text)
    assert global_args == {"A": "1"}
    assert [(s.base, s.name) for s in stages] == [("x:1", "one"), ("one", "two")]
    assert stages[0].args("RUN") == ["a && b"]
    assert stages[1].env() == {"K": "v", "L": "w z"}


def test_image_has_gpu_and_cpu_bases_selected_by_device_arg(dockerfile) -> None:
    global_args, stages = dockerfile
    assert global_args["DEVICE"] == "gpu"
    gpu, cpu, runtime = stages["base-gpu"], stages["base-cpu"], stages["runtime"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", gpu.base)
    assert runtime.base == "base-${DEVICE}"
    for stage, index, device in ((gpu, "/whl/cu", "cuda"), (cpu, "/whl/cpu", "cpu")):
        (torch_index,) = [a for a in stage.args("ARG") if a.startswith("TORCH_INDEX=")]
        assert index in torch_index
        assert any("torch==${TORCH_VERSION}" in r and "${TORCH_INDEX}" in r for r in stage.args("RUN"))
        assert stage.env()["TRIMSERVE_DEVICE"] == device
        assert any("g++" in r for r in stage.args("RUN"))  # `serve --compile-decode` builds kernels
    assert gpu.env()["TRIMSERVE_DTYPE"] in ("bf16", "fp16")
    # The torch pinned in the image is the one the Makefile and the docs use.
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()
    assert all(f"TORCH_VERSION={'2.13.0'}" in s.args("ARG") for s in (gpu, cpu))


def test_runtime_installs_the_package_and_runs_as_non_root(dockerfile) -> None:
    _, stages = dockerfile
    runtime = stages["runtime"]
    copied = {source for a in runtime.args("COPY") for source in a.split()[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = set(re.findall(r'"(\w+)\*"', pyproject.split("[tool.setuptools.packages.find]")[1]))
    assert packages | {"pyproject.toml", "README.md"} <= copied
    assert any("pip install --no-cache-dir ." in r for r in runtime.args("RUN"))
    (user,) = runtime.args("USER")
    assert user not in ("root", "0")
    assert any(f"useradd --create-home --uid {UID} {user}" in r for r in runtime.args("RUN"))
    assert runtime.instructions[-1] == ("CMD", '["serve"]')
    assert json.loads(runtime.args("ENTRYPOINT")[0]) == ["trimserve"]


def test_runtime_port_healthcheck_volume_and_env_config(dockerfile) -> None:
    _, stages = dockerfile
    runtime = stages["runtime"]
    env = runtime.env()
    assert runtime.args("EXPOSE") == [str(PORT)] and env["TRIMSERVE_PORT"] == str(PORT)
    assert env["TRIMSERVE_HOST"] == "0.0.0.0"
    assert json.loads(runtime.args("VOLUME")[0]) == [env["TRIMSERVE_CACHE"]] == ["/data"]
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/data/")  # compiled kernels in the volume, not /tmp
    (health,) = runtime.args("HEALTHCHECK")
    assert "/health" in health and "TRIMSERVE_PORT" in health and re.search(r"--start-period=\d+s", health)
    # Every TRIMSERVE_* variable the image sets is a server setting (or the cache location).
    settings = {f"TRIMSERVE_{f.upper()}" for f in Settings.model_fields} | {"TRIMSERVE_CACHE"}
    image_env = {k for s in stages.values() for k in s.env() if k.startswith("TRIMSERVE_")}
    assert image_env <= settings, f"unknown settings: {image_env - settings}"


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "*.safetensors"} <= set(ignored)


def test_compose_reserves_a_gpu_and_wires_prometheus_and_grafana() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    server = compose["services"]["trimserve"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert server["build"]["context"] == ".." and server["build"]["args"]["DEVICE"] == "gpu"
    assert server["ports"] == [f"{PORT}:{PORT}"]
    env = server["environment"]
    assert env["TRIMSERVE_DEVICE"] == "cuda" and env["TRIMSERVE_DTYPE"] in ("bf16", "fp16")
    settings = {f"TRIMSERVE_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= settings
    mounts = {target: source for source, target in map(split_volume, server["volumes"])}
    assert mounts[env["TRIMSERVE_CONFIG_FILE"]] == "./serve.yaml"
    assert "/data" in mounts and "/data/variants" in mounts
    # Prometheus scrapes the compose service by name and loads the alert rules it is given.
    prom = load(DEPLOY / "prometheus.yml")
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"trimserve:{PORT}"]
    prom_mounts = dict(map(split_volume, compose["services"]["prometheus"]["volumes"]))
    assert prom_mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in prom["rule_files"]:
        assert prom_mounts[f"./{rule_file}"] == f"/etc/prometheus/{rule_file}"
    datasource = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert datasource["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    for service in compose["services"].values():  # every bind-mounted file exists
        for volume in service.get("volumes", []):
            source, _ = split_volume(volume)
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"


def test_serve_config_is_valid_settings_and_the_same_in_compose_and_k8s() -> None:
    config = load(DEPLOY / "serve.yaml")
    configmap = load(K8S / "configmap.yaml")
    assert yaml.safe_load(configmap["data"]["serve.yaml"]) == config
    plan = read_config(DEPLOY / "serve.yaml")  # what the server reads at start
    specs, ab = plan.models, plan.ab
    names = {s.name for s in specs}
    assert "full" in names, "the alerts and dashboard compare against a variant named full"
    assert set(experiments_from(ab, names)) == {"chat"}


def test_k8s_deployment_requests_a_gpu_with_probes() -> None:
    deployment = load(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert pod["spec"]["securityContext"]["runAsUser"] == UID and pod["spec"]["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = {f"TRIMSERVE_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= settings and env["TRIMSERVE_DEVICE"] == "cuda"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert grace >= pre_stop + float(env["TRIMSERVE_SHUTDOWN_TIMEOUT_S"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    assert volumes["config"]["configMap"]["name"] == load(K8S / "configmap.yaml")["metadata"]["name"]
    claim = volumes["variants"]["persistentVolumeClaim"]["claimName"]
    assert claim == load(K8S / "variants-pvc.yaml")["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(env["TRIMSERVE_CONFIG_FILE"]).parent)] == "config"


def test_k8s_service_selects_the_pods_and_kustomization_lists_every_manifest() -> None:
    deployment = load(K8S / "deployment.yaml")
    service = load(K8S / "service.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    kustomization = load(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_readme_documents_the_image_as_built() -> None:
    section = readme_section("deploy")
    for phrase in (
        "--build-arg DEVICE=cpu",
        "docker compose -f deploy/docker-compose.yml up",
        "kubectl apply -k deploy/k8s",
        "/health",
        "/ready",
        f"uid {UID}",
        "TRIMSERVE_CONFIG_FILE",
        "/data",
        "not executed",
    ):
        assert phrase in section, f"README deploy section does not mention {phrase!r}"


GATEWAY = DEPLOY / "gateway"
K8S_GATEWAY = DEPLOY / "k8s-gateway"


def test_gateway_compose_puts_one_vllm_server_per_variant_behind_the_gateway(tmp_path) -> None:
    compose = load(GATEWAY / "docker-compose.yml")
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["build"]["args"]["DEVICE"] == "cpu" and "deploy" not in gateway  # no model, no GPU
    env = gateway["environment"]
    assert set(env) <= {f"TRIMSERVE_{f.upper()}" for f in Settings.model_fields}
    mounts = {target: source for source, target in map(split_volume, gateway["volumes"])}
    assert mounts[env["TRIMSERVE_CONFIG_FILE"]] == "./gateway.yaml"
    plan = read_config(GATEWAY / "gateway.yaml")
    specs, ab = plan.models, plan.ab
    assert {s.backend for s in specs} == {"url"} and "full" in {s.name for s in specs}
    assert set(experiments_from(ab, {s.name for s in specs})) == {"chat"}
    prom = load(GATEWAY / "prometheus.yml")
    targets = {t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert f"gateway:{PORT}" in targets
    for spec in specs:  # each url names a vLLM service of this stack, serving the upstream model
        host = spec.url.split("//")[1].split("/")[0]
        vllm = services[host.split(":")[0]]
        assert vllm["image"].startswith("vllm/vllm-openai:") and host in targets
        assert f"--served-model-name {spec.upstream_model}" in vllm["command"]
        (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and "--gpu-memory-utilization" in vllm["command"]
        assert host.split(":")[0] in gateway["depends_on"]
    for service in services.values():  # every bind-mounted file exists
        for volume in service.get("volumes", []):
            source, _ = split_volume(volume)
            if source.startswith("."):
                assert (GATEWAY / source).exists(), f"compose mounts missing {source}"


def test_gateway_k8s_manifests_match_the_compose_config() -> None:
    kustomization = load(K8S_GATEWAY / "kustomization.yaml")
    assert set(kustomization["resources"]) == {p.name for p in K8S_GATEWAY.glob("*.yaml")} - {"kustomization.yaml"}
    configmap = load(K8S_GATEWAY / "gateway-configmap.yaml")
    k8s_models = yaml.safe_load(configmap["data"]["gateway.yaml"])
    compose_models = load(GATEWAY / "gateway.yaml")
    strip_ports = [{**m, "url": m["url"].replace(":8000", "")} for m in compose_models["models"]]
    assert k8s_models["models"] == strip_ports and k8s_models["ab"] == compose_models["ab"]
    (gateway,) = load(K8S_GATEWAY / "gateway-deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"  # one variant down keeps the rest serving
    env = {e["name"]: e["value"] for e in gateway["env"]}
    assert set(env) <= {f"TRIMSERVE_{f.upper()}" for f in Settings.model_fields}
    for model in k8s_models["models"]:
        host = model["url"].split("//")[1].split("/")[0]
        deployment, service = yaml.safe_load_all((K8S_GATEWAY / f"{host}.yaml").read_text())
        (vllm,) = deployment["spec"]["template"]["spec"]["containers"]
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1 and service["metadata"]["name"] == host
        assert vllm["args"][vllm["args"].index("--served-model-name") + 1] == model["upstream_model"]
