"""Issue 20 without a Docker engine: the image variants `make image` builds (their bentofiles, and
the Dockerfile a real `bentoml build` renders from the project's template), and the Kubernetes
manifests, rendered from deploy/k8s/ as `kubectl apply -k` would and validated offline against
the schemas of named Kubernetes versions (kubernetes-validate, strict: unknown fields fail)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
"""The oldest Kubernetes release still commonly run (every field used here is GA there) and the newest."""
BENTOML = Path(sys.executable).with_name("bentoml")


def _bentofile() -> dict[str, Any]:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def drain_seconds() -> int:
    """The drain bound the image's CMD gives `bentoml serve` (deploy/Dockerfile.template)."""
    found = re.search(r"set drain_seconds = (\d+)", (REPO / "deploy" / "Dockerfile.template").read_text())
    assert found, "deploy/Dockerfile.template sets no drain_seconds"
    return int(found.group(1))


# --- image variants -------------------------------------------------------------------------------

def test_cpu_variant_swaps_onnxruntime_gpu_for_the_cpu_build() -> None:
    from deploy.image import variant_bentofile

    source = _bentofile()
    (gpu_runtime,) = [p for p in source["python"]["packages"] if p.startswith("onnxruntime")]
    version = gpu_runtime.split("==")[1]
    cpu = variant_bentofile(source, "cpu", "base:1")
    assert f"onnxruntime=={version}" in cpu["python"]["packages"]
    assert not [p for p in cpu["python"]["packages"] if "gpu" in p or "nvidia" in p or "torch" in p]
    assert {"name": "SERVE_PROVIDER", "value": "cpu"} in cpu["envs"]
    gpu = variant_bentofile(source, "gpu", "base:1", {"SERVE_VOTING": "hard"})
    assert gpu["python"]["packages"] == source["python"]["packages"] and gpu["envs"] == [
        {"name": "SERVE_VOTING", "value": "hard"}]
    for variant in (cpu, gpu):
        assert variant["docker"] == {"base_image": "base:1", "dockerfile_template": "deploy/Dockerfile.template"}
        assert variant["service"] == source["service"] and variant["include"] == source["include"]
    assert source["python"]["packages"] == _bentofile()["python"]["packages"]  # the source is left as it was


def test_a_bentoml_pin_in_the_bentofile_is_refused() -> None:
    from deploy.image import ImageError, variant_bentofile

    source = _bentofile()
    source["python"]["packages"].append("bentoml==1.4.0")
    with pytest.raises(ImageError, match="pins bentoml"):
        variant_bentofile(source, "cpu", "base:1")
    with pytest.raises(ImageError, match="VARIANT"):
        variant_bentofile(_bentofile(), "tpu", "base:1")


def test_run_sources_of_make_image(tiny_run: Path, tmp_path: Path) -> None:
    from deploy.image import ImageError, ModelSource, parse_sources

    assert parse_sources(str(tiny_run)) == [ModelSource(tiny_run, None)]
    assert parse_sources(str(tiny_run), 1) == [ModelSource(tiny_run, 1)]
    assert parse_sources(f"{tiny_run}:0, {tiny_run}:1") == [ModelSource(tiny_run, 0), ModelSource(tiny_run, 1)]
    for spec, step, message in ((f"{tiny_run},{tiny_run}", 1, "STEP applies to one run"),
                                (f"{tiny_run}:x", None, "must be a number"), (str(tmp_path), None, "not a run directory"),
                                (" , ", None, "RUN is empty")):
        with pytest.raises(ImageError, match=message):
            parse_sources(spec, step)


def test_make_image_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "deploy.image", "--run", str(tmp_path), "--variant", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a run directory" in result.stderr


def test_bentoml_build_renders_the_cpu_dockerfile_without_compilers(tiny_run: Path, tmp_path: Path) -> None:
    """A real `bentoml build` of the CPU variant, as `make image` runs it: the Bento's
    requirements and the Dockerfile BentoML renders from deploy/Dockerfile.template."""
    import bentoml

    from compress.registry import register
    from deploy.image import build_env, variant_bentofile

    home = tmp_path / "home"
    tag = register(tiny_run, step=1, bentoml_home=home)
    bentofile = home / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(variant_bentofile(_bentofile(), "cpu", "resnet-classifier-base:bookworm")))
    result = subprocess.run([str(BENTOML), "build", "-f", str(bentofile), "--output", "tag", str(REPO)], cwd=REPO,
                            env={**build_env(home), "SERVE_MODELS": tag}, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    name, _, version = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:").partition(":")
    bento = home / "bentos" / name / version
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "onnxruntime==1.31.1" in requirements and f"bentoml=={bentoml.__version__}" in requirements
    assert not [line for line in requirements if "onnxruntime-gpu" in line or "torch" in line]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM resnet-classifier-base:bookworm" in dockerfile
    for absent in ("apt-get", "build-essential", "git ", "gcc"):
        assert absent not in dockerfile, absent
    assert "USER 1034:1034" in dockerfile and "HEALTHCHECK" in dockerfile and "ARG SERVE_PROVIDER=cpu" in dockerfile
    assert f'CMD ["--timeout-graceful-shutdown", "{drain_seconds()}"]' in dockerfile
    assert dockerfile.index("USER 1034:1034") > dockerfile.index("COPY --chown=bentoml:bentoml . ./")


# --- Kubernetes -------------------------------------------------------------------------------------

def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as Kubernetes applies one to these manifests: maps merge, lists
    of named items (containers, env, ports, volumes) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: _merge(base[key], value) if key in base else value for key, value in patch.items()}}
    named = (lambda items: isinstance(items, list) and items and all(isinstance(i, dict) and "name" in i for i in items))
    if named(base) and named(patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = _merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def _pod_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder`` for the features deploy/k8s/ uses (resources, patches,
    images, labels without selectors), in Python: kubectl needs no cluster for this, but is
    not on every machine that runs the suite."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "patches", "images", "labels"}
    assert set(spec) <= known, f"{folder}: kustomization uses {set(spec) - known}; teach kustomize() in this test"
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = folder / entry
        resources += kustomize(target) if target.is_dir() else _documents(target)
    for patch in spec.get("patches", []):
        for doc in _documents(folder / patch["path"]):
            (index,) = [i for i, r in enumerate(resources)
                        if (r["kind"], r["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
            resources[index] = _merge(resources[index], doc)
    for image in spec.get("images", []):
        for container in (c for r in resources for c in _pod_containers(r)):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in spec.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    return resources


def _by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [r["kind"] for r in resources]
    assert len(kinds) == len(set(kinds)), kinds
    return {r["kind"]: r for r in resources}


@pytest.fixture(scope="module", params=["cpu", "gpu"], ids=["overlay-cpu", "overlay-gpu"])  # "gpu" alone would mark the GPU tests
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(K8S / request.param)


def test_manifests_are_valid_kubernetes(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    _, resources = overlay
    assert {r["kind"] for r in resources} == {"Deployment", "Service", "HorizontalPodAutoscaler",
                                              "PodDisruptionBudget"}
    for version in KUBERNETES_VERSIONS:
        for resource in resources:
            kubernetes_validate.validate(resource, version, strict=True)  # raises on any error


def test_validation_catches_a_wrong_field(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    deployment = json.loads(json.dumps(_by_kind(overlay[1])["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_deployment_probes_drains_and_runs_as_the_image_expects(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    variant, resources = overlay
    kinds = _by_kind(resources)
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"resnet-classifier:{variant}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports["http"] == int(env["PORT"])  # the image serves on $PORT
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    assert {kind: get["path"] for kind, get in probes.items()} == {"startup": "/readyz", "readiness": "/readyz",
                                                                  "liveness": "/livez"}
    assert all(get["port"] == "http" for get in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # models load and warm up first
    # SIGTERM: the pause before it, then the image's drain bound, within the grace period
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    budget = int(prestop[1]) + drain_seconds()
    assert budget < pod["spec"]["terminationGracePeriodSeconds"] <= budget + 15
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == BENTO_UID_GID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}[tmp["name"]]
    resources_ = container["resources"]
    assert {"cpu", "memory"} <= set(resources_["requests"]) and "memory" in resources_["limits"]
    gpus = resources_["limits"].get("nvidia.com/gpu")
    assert (gpus is not None and int(gpus) >= 1) if variant == "gpu" else gpus is None


def test_service_autoscaler_and_budget_point_at_the_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    kinds = _by_kind(overlay[1])
    deployment = kinds["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    budget = kinds["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    # a node drain can always evict one pod: more replicas than the budget keeps
    assert kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"] > budget["minAvailable"]
    assert deployment["spec"]["replicas"] > budget["minAvailable"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: the Python rendering is checked alone")
def test_kubectl_kustomize_renders_the_same(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    variant, resources = overlay
    result = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "KUBECONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    key = (lambda r: (r["kind"], r["metadata"]["name"]))
    assert sorted(rendered, key=key) == sorted(resources, key=key)
