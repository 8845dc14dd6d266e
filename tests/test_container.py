"""Issue 20, the images for real: `make image`'s command builds the CPU (and GPU) image of the tiny
run, `docker run` serves it with a read-only root, and it answers as the same model does in this
process, as a non-root user, and drains on SIGTERM.

Needs a Docker engine and the base image (`make base-image`): .ci/run starts the one and builds
the other. Elsewhere the module is skipped with the reason; in CI (CI=true) a missing base image
fails instead, so a broken CI setup cannot pass by skipping."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.container import DOCKER, Container, docker, docker_unavailable_reason, drain
from conftest import CLASS_COLOURS, class_image

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "resnet-classifier-base:bookworm"
TEST_IMAGE = "resnet-classifier:test-{variant}"
"""Images of the tests' own tiny run, named apart from the user's `resnet-classifier:cpu` and removed afterwards."""
BUILD_TIMEOUT_S = 1200
CPU_IMAGE_LIMIT_BYTES = 600_000_000
"""The CPU image stays well under the 1.19 GB of BentoML's default Debian template (measured: 480 MB)."""

REASON = docker_unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no Docker engine: {REASON}"), pytest.mark.slow]


def _require_base_image() -> None:
    if subprocess.run([DOCKER, "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode == 0:
        return
    message = f"{BASE_IMAGE} is not in the Docker engine: build it with `make base-image`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _build(run: Path, variant: str) -> Iterator[str]:
    """`make image RUN=run STEP=1 VARIANT=variant` under the test's image name; removed afterwards."""
    _require_base_image()
    image = TEST_IMAGE.format(variant=variant)
    result = subprocess.run([sys.executable, "-m", "deploy.image", "--run", str(run), "--step", "1", "--variant", variant,
                             "--image", image], cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    yield image
    docker("image", "rm", "-f", image, check=False)


@pytest.fixture(scope="module")
def cpu_image(tiny_run: Path) -> Iterator[str]:
    yield from _build(tiny_run, "cpu")


@pytest.fixture(scope="module")
def served(cpu_image: str) -> Iterator[Container]:
    """The CPU image as the Kubernetes manifests run it: read-only root, only /tmp writable."""
    container = Container.run(cpu_image, read_only=True)
    try:
        container.wait_ready()
        yield container
    finally:
        container.remove()


# --- the same model, in this process ---------------------------------------------------------------

def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    out = {}
    for (name, colour), fmt in zip(CLASS_COLOURS.items(), ("PNG", "JPEG", "WEBP")):
        buffer = io.BytesIO()
        class_image(colour, 48, rng).crop((0, 0, 48, 36)).save(buffer, format=fmt)
        out[f"{name}.{fmt.lower()}"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray((rng.random((30, 40)) * 255).astype(np.uint8), "L").save(buffer, format="BMP")
    out["grey.bmp"] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def in_process(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The service's own answer for each image, computed here: step 1 of the tiny run through
    serve.runtime (one ONNX Runtime CPU session), serve.inputs and serve.voting."""
    import bentoml

    from compress.registry import model_store, register
    from serve.inputs import decode_opened, open_image
    from serve.runtime import Ensemble, Member, RuntimeOptions, card_from_model
    from serve.settings import Settings
    from serve.voting import prediction

    home = tmp_path_factory.mktemp("in-process-home")
    tag = register(tiny_run, step=1, bentoml_home=home)
    card = card_from_model(bentoml.models.get(tag, _model_store=model_store(home)))
    options = RuntimeOptions(provider="cpu")
    ensemble = Ensemble([Member.load(card, options)], options)
    settings = Settings.from_env({})
    answers = {}
    for name, data in _images().items():
        rows = np.empty((1, ensemble.layout.width), dtype=np.float32)
        opened = open_image(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, name="image")
        ensemble.layout.fill(rows[0], decode_opened(opened, "image"))
        probs = ensemble.predict(rows)[0]
        answers[name] = prediction(probs, list(ensemble.classes), voting="soft",
                                   top_k=min(settings.top_k, len(ensemble.classes)), model=tag)
    return answers


def _same_answer(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Labels and order exactly; probabilities to float32 rounding. `model` is the image's own tag."""
    assert {k: v for k, v in got.items() if k not in ("model", "confidence", "top_k")} == \
        {k: v for k, v in expected.items() if k not in ("model", "confidence", "top_k")}
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in expected["top_k"]]
    assert got["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
    assert [t["confidence"] for t in got["top_k"]] == pytest.approx([t["confidence"] for t in expected["top_k"]], abs=1e-6)


def _classify(container: Container, name: str, data: bytes) -> dict[str, Any]:
    response = httpx.post(f"{container.url}/classify", files={"image": (name, data, "application/octet-stream")},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


# --- the CPU image -----------------------------------------------------------------------------------

def test_cpu_image_has_no_cuda_no_torch_no_compilers(cpu_image: str) -> None:
    probe = ("import importlib.util, json, shutil, onnxruntime as ort; print(json.dumps({"
             "'providers': ort.get_available_providers(), 'torch': importlib.util.find_spec('torch') is not None, "
             "'nvidia': importlib.util.find_spec('nvidia') is not None, "
             "'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'git', 'apt-get') if shutil.which(t)]}))")
    found = json.loads(docker("run", "--rm", "--network", "none", "--entrypoint", "python", cpu_image, "-c", probe))
    assert "CPUExecutionProvider" in found["providers"] and not [p for p in found["providers"] if "CUDA" in p
                                                                 or "Tensorrt" in p]
    assert not found["torch"] and not found["nvidia"]
    assert found["tools"] == ["apt-get"]  # Debian's own package tool, no compilers, no git
    size = int(docker("image", "inspect", "--format", "{{.Size}}", cpu_image).strip())
    assert size < CPU_IMAGE_LIMIT_BYTES, f"{size / 1e6:.0f} MB"
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", cpu_image))
    assert labels["resnet-classifier.variant"] == "cpu" and labels["resnet-classifier.models"].startswith("run:")


def test_readonly_container_answers_as_the_model_does_in_process(served: Container, in_process: dict[str, Any]) -> None:
    for name, data in _images().items():
        _same_answer(_classify(served, name, data), in_process[name])
    batch = httpx.post(f"{served.url}/classify_batch", timeout=30,
                       files=[("images", (name, data, "application/octet-stream")) for name, data in _images().items()])
    assert batch.status_code == 200
    for got, name in zip(batch.json(), _images()):
        _same_answer(got, in_process[name])
    bad = httpx.post(f"{served.url}/classify", files={"image": ("x.png", b"not an image", "image/png")}, timeout=30)
    assert bad.status_code in (400, 415) and "error" in bad.json()


def test_container_runs_as_a_user_that_is_not_root(served: Container) -> None:
    assert served.exec("id", "-u").strip() == "1034"
    assert docker("inspect", "--format", "{{.Config.User}}", served.name).strip() == "1034:1034"
    with pytest.raises(RuntimeError, match="Read-only file system"):
        served.exec("touch", "/home/bentoml/written")  # the root really is read-only


def test_metrics_logs_and_health_as_outside(served: Container) -> None:
    metadata = httpx.get(f"{served.url}/metadata", timeout=10).json()
    assert metadata["providers"] == {metadata["model"]: "cpu"} and metadata["worker"]["gpu"] is None
    metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert "serve_model_seconds" in metrics and 'endpoint="/classify"' in metrics
    assert "serving " in served.logs()  # the service's log lines go to the container's stdout
    deadline = time.monotonic() + 60
    while served.health() != "healthy" and time.monotonic() < deadline:
        time.sleep(1)
    assert served.health() == "healthy"


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(cpu_image: str, in_process: dict[str, Any]) -> None:
    from test_deploy import drain_seconds

    container = Container.run(cpu_image)
    try:
        container.wait_ready()
        name, data = next(iter(_images().items()))
        result = drain(container, data, in_flight=4, hold=1.5)
    finally:
        container.remove()
    assert result["statuses"] == [200] * 4, result
    for answer in result["answers"]:
        _same_answer(answer, in_process[name])
    assert result["exit_code"] == 0
    assert result["stop_s"] < drain_seconds() + 5


# --- the GPU image: built here, run on a GPU when there is one -----------------------------------------

@pytest.fixture(scope="module")
def gpu_image(tiny_run: Path) -> Iterator[str]:
    yield from _build(tiny_run, "gpu")


def test_gpu_image_carries_cuda_and_falls_back_to_the_cpu_without_a_gpu(gpu_image: str,
                                                                        in_process: dict[str, Any]) -> None:
    container = Container.run(gpu_image)
    try:
        container.wait_ready()
        probe = "import onnxruntime as ort; print(ort.get_available_providers())"
        assert "CUDAExecutionProvider" in container.exec("python", "-c", probe)
        name, data = next(iter(_images().items()))
        _same_answer(_classify(container, name, data), in_process[name])
        assert container.exec("id", "-u").strip() == "1034"
    finally:
        container.remove()


@pytest.mark.gpu
def test_gpu_image_serves_on_cuda(gpu_image: str) -> None:
    container = Container.run(gpu_image, options=("--gpus", "all"), env={"SERVE_PROVIDER": "cuda"})
    try:
        container.wait_ready(timeout=300)
        metadata = httpx.get(f"{container.url}/metadata", timeout=10).json()
        assert set(metadata["providers"].values()) == {"cuda"} and metadata["worker"]["gpu"]["index"] == 0
    finally:
        container.remove()
