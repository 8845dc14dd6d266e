"""The HTTP service, for real: `bentoml serve` subprocesses on free localhost ports, serving
models registered from the tiny run into a temporary BENTOML_HOME, answering real HTTP.

Expected answers come from an independent path: the training pipeline's torchvision
transform and a plain ONNX Runtime session on the run's ONNX file. Pure-function tests of
voting, preprocessing, decoding and settings sit at the end (no server)."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from conftest import CLASS_COLOURS, class_image, cuda_available

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
START_TIMEOUT_S = 90
MAX_BYTES, MAX_PIXELS, MAX_FILES = 1_000_000, 4_000_000, 8


# --- the model store and the servers ----------------------------------------------------------

@dataclass
class Store:
    home: Path
    step0: str
    step1: str
    other_classes: str
    run: Path


@pytest.fixture(scope="module")
def store(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Steps 0 and 1 of the tiny run, plus a model whose class names differ."""
    from compress.registry import register

    home = tmp_path_factory.mktemp("bentoml-home")
    other = tmp_path_factory.mktemp("other") / "run"
    shutil.copytree(tiny_run, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["dataset"]["classes"] = ["apple", "banana", "cherry"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    return Store(home, register(tiny_run, step=0, name="tiny-s0", bentoml_home=home),
                 register(tiny_run, step=1, name="tiny-s1", bentoml_home=home),
                 register(other, step=1, name="fruit", bentoml_home=home), tiny_run)


_PORTS_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free localhost port not given to another server of this session: servers start
    together, and the kernel may offer a port again once the probing socket is closed."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


class Server:
    """A `bentoml serve` process in the repository root; always stopped by :meth:`stop`."""

    def __init__(self, home: Path, log: Path, **env: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                       "SERVE_MAX_BYTES": str(MAX_BYTES), "SERVE_MAX_PIXELS": str(MAX_PIXELS),
                       "SERVE_MAX_FILES": str(MAX_FILES), **env}
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen([str(BENTOML), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                        cwd=REPO, env=environment, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.workers: list[int] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.workers = _children(self.process.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        self.workers = sorted(set(self.workers) | set(_children(self.process.pid)))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.workers:  # workers run in their own process groups
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log_file.close()


@pytest.fixture(scope="module")
def server_factory(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: list[Server] = []
    logs = tmp_path_factory.mktemp("serve-logs")

    def start(**env: str) -> Server:
        server = Server(store.home, logs / f"serve-{len(started)}.log", **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def servers(store: Store, server_factory: Any) -> dict[str, Server]:
    """The three servers, started together (their start-ups overlap): one model, and the
    two-member ensemble with soft and with hard voting."""
    pending = {"single": server_factory(SERVE_MODELS=store.step1),
               "soft": server_factory(SERVE_MODELS=f"{store.step0},{store.step1}", SERVE_VOTING="soft"),
               # two model threads with a session each, batches padded to fixed sizes: the GPU data
               # path's options, run here on the CPU provider
               "hard": server_factory(SERVE_MODELS=f"tiny-s0, {store.step1}", SERVE_VOTING="hard",
                                      SERVE_MODEL_THREADS="2", SERVE_SESSIONS="per-thread",
                                      SERVE_BATCH_SHAPES="buckets", SERVE_MAX_BATCH_SIZE="6")}
    return {name: server.wait_ready() for name, server in pending.items()}


@pytest.fixture(scope="module")
def single(servers: dict[str, Server]) -> Server:
    return servers["single"]


# --- images and the independent reference -----------------------------------------------------

def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _picture(name: str, size: tuple[int, int], seed: int) -> Image.Image:
    square = class_image(CLASS_COLOURS[name], max(size), np.random.default_rng(seed))
    return square.crop((0, 0, *size))


def format_corpus() -> dict[str, bytes]:
    """Every accepted format and mode; non-square sizes exercise resize + centre crop."""
    cat, dog, owl = _picture("cat", (40, 30), 1), _picture("dog", (24, 52), 2), _picture("owl", (300, 200), 3)
    grey16 = Image.fromarray(np.asarray(owl.convert("L"), dtype=np.uint16) * 257)
    assert grey16.mode == "I;16"
    rgba = cat.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    palette_t = dog.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_t.info["transparency"] = 0
    frame2 = _picture("owl", (40, 30), 4)
    return {
        "png-RGB": _encode(cat, "PNG"), "png-RGBA": _encode(rgba, "PNG"), "png-L": _encode(dog.convert("L"), "PNG"),
        "png-LA": _encode(dog.convert("LA"), "PNG"), "png-P": _encode(dog.convert("P"), "PNG"),
        "png-P-transparent": _encode(palette_t, "PNG"), "png-I;16": _encode(grey16, "PNG"),
        "jpeg-RGB": _encode(owl, "JPEG", quality=90), "jpeg-L": _encode(owl.convert("L"), "JPEG"),
        "jpeg-CMYK": _encode(cat.convert("CMYK"), "JPEG"),
        "webp-RGB": _encode(dog, "WEBP"), "webp-RGBA": _encode(rgba, "WEBP", lossless=True),
        "bmp-RGB": _encode(owl, "BMP"), "bmp-L": _encode(cat.convert("L"), "BMP"), "bmp-P": _encode(dog.convert("P"), "BMP"),
        "gif-animated": _gif([cat, frame2]), "tiff-RGB": _encode(dog, "TIFF"),
    }


def _gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def reference_probs(store: Store, step: int, images: list[bytes]) -> np.ndarray:
    """Probabilities from the training pipeline's eval transform and a plain ORT session."""
    import onnxruntime as ort
    import torch

    from compress.data import Preprocessing
    from compress.imaging import open_rgb

    manifest = json.loads((store.run / "manifest.json").read_text())
    entry = next(s for s in manifest["steps"] if s["step"] == step)
    transform = Preprocessing.from_dict(manifest["preprocessing"]).eval_transform()
    batch = torch.stack([transform(open_rgb(io.BytesIO(data))) for data in images]).numpy()
    session = ort.InferenceSession(str(store.run / entry["onnx"]), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": batch})[0].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def classify(server: Server, data: bytes, filename: str = "image.png", client: httpx.Client | None = None) -> httpx.Response:
    poster = client or httpx
    return poster.post(f"{server.url}/classify", files={"image": (filename, data, "application/octet-stream")},
                       timeout=30)


CLASSES = ["cat", "dog", "owl"]


def _check_single(answer: dict[str, Any], probs: np.ndarray, tag: str) -> None:
    best = int(np.argmax(probs))
    assert set(answer) == {"label", "class_index", "confidence", "top_k", "model"}
    assert answer["class_index"] == best and answer["label"] == CLASSES[best] and answer["model"] == tag
    assert answer["confidence"] == pytest.approx(probs[best], abs=1e-4)
    assert [t["label"] for t in answer["top_k"]] == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]
    for entry in answer["top_k"]:
        assert entry["confidence"] == pytest.approx(probs[CLASSES.index(entry["label"])], abs=1e-4)


# --- single model ---------------------------------------------------------------------------

def test_every_format_and_mode_matches_direct_onnxruntime(single: Server, store: Store) -> None:
    corpus = format_corpus()
    expected = reference_probs(store, 1, list(corpus.values()))
    with httpx.Client() as client:
        for (name, data), probs in zip(corpus.items(), expected):
            response = classify(single, data, f"{name}.img", client)
            assert response.status_code == 200, (name, response.text)
            _check_single(response.json(), probs, store.step1)


def test_classify_batch_matches_single_answers(single: Server, store: Store) -> None:
    corpus = list(format_corpus().items())[:MAX_FILES]
    files = [("images", (f"{name}.img", data, "application/octet-stream")) for name, data in corpus]
    response = httpx.post(f"{single.url}/classify_batch", files=files, timeout=30)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert isinstance(answers, list) and len(answers) == len(corpus)
    for answer, probs in zip(answers, reference_probs(store, 1, [data for _, data in corpus])):
        _check_single(answer, probs, store.step1)


def _multipart(body: bytes, boundary: str = "xyz") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def bad_requests() -> dict[str, tuple[str, dict[str, Any], int]]:
    """name -> (endpoint, httpx.post keyword arguments, expected status)."""
    png = _encode(_picture("cat", (40, 30), 5), "PNG")
    jpeg = _encode(_picture("dog", (64, 64), 6), "JPEG")
    bomb = _encode(Image.new("L", (3000, 3000)), "PNG", optimize=True)  # 9 M pixels in a few KB
    assert len(bomb) < 100_000
    image = lambda data, name="x.png": {"files": {"image": (name, data, "application/octet-stream")}}
    return {
        "text file": ("/classify", image(b"this is not an image\n", "notes.txt"), 400),
        "truncated png": ("/classify", image(png[: len(png) // 2]), 400),
        "truncated jpeg": ("/classify", image(jpeg[: len(jpeg) // 2], "x.jpg"), 400),
        "png header only": ("/classify", image(png[:33]), 400),
        "empty file": ("/classify", image(b""), 400),
        "empty body": ("/classify", {}, 400),
        "empty multipart body": ("/classify", _multipart(b""), 400),
        "missing field": ("/classify", {"files": {"picture": ("x.png", png, "image/png")}}, 400),
        "text value, not a file": ("/classify", _multipart(  # BentoML would fetch it as a URL
            b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nhttp://127.0.0.1:1/a.png\r\n--xyz--\r\n'), 400),
        "decompression bomb": ("/classify", image(bomb), 400),
        "oversize upload": ("/classify", image(os.urandom(MAX_BYTES + 1)), 413),
        "oversize body": ("/classify", _multipart(b"-" * (2 * MAX_BYTES)), 413),
        "no boundary": ("/classify", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400),
        "garbled multipart": ("/classify", _multipart(b"garbage garbage"), 400),
        "truncated multipart": ("/classify", _multipart(
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png[:100]), 400),
        "json body": ("/classify", {"json": {"image": "abc"}}, 415),
        "two files on /classify": ("/classify", {"files": [("image", ("a.png", png)), ("image", ("b.png", png))]}, 400),
        "batch: one bad file": ("/classify_batch", {"files": [("images", ("a.png", png)), ("images", ("b.txt", b"no"))]}, 400),
        "batch: too many files": ("/classify_batch", {"files": [("images", (f"{i}.png", png)) for i in range(MAX_FILES + 1)]}, 413),
        "batch: missing field": ("/classify_batch", {"files": {"image": ("a.png", png)}}, 400),
    }


@pytest.mark.parametrize("name", list(bad_requests()))
def test_bad_input_gets_4xx_json_and_the_service_keeps_answering(single: Server, name: str) -> None:
    endpoint, kwargs, status = bad_requests()[name]
    response = httpx.post(f"{single.url}{endpoint}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert isinstance(error, dict) and isinstance(error.get("error"), str) and len(error["error"]) > 10
    follow_up = classify(single, _encode(_picture("owl", (20, 20), 7), "PNG"))
    assert follow_up.status_code == 200 and follow_up.json()["label"] in CLASSES


def test_1000_requests_at_concurrency_16_without_errors(single: Server) -> None:
    images = [_encode(_picture(name, (32, 32), seed), "PNG") for seed, name in enumerate(CLASSES * 4)]
    before = httpx.get(f"{single.url}/metadata", timeout=30).json()["batching"]
    statuses: list[int] = []
    started = time.perf_counter()
    with httpx.Client(limits=httpx.Limits(max_connections=16), timeout=60) as client:
        def worker(offset: int) -> list[int]:
            return [classify(single, images[(offset + i) % len(images)], client=client).status_code
                    for i in range(offset, 1000, 16)]

        with ThreadPoolExecutor(16) as pool:
            for result in pool.map(worker, range(16)):
                statuses.extend(result)
    elapsed = time.perf_counter() - started
    print(f"\n1000 requests at concurrency 16: {elapsed:.1f} s, {1000 / elapsed:.0f} requests/s")
    assert len(statuses) == 1000 and set(statuses) == {200}
    assert elapsed < 120
    after = httpx.get(f"{single.url}/metadata", timeout=30).json()["batching"]
    rows, calls = after["rows"] - before["rows"], after["model_calls"] - before["model_calls"]
    print(f"{rows} images in {calls} model calls")
    assert rows == 1000 and calls < rows  # concurrent requests shared model calls


def test_health_metrics_and_metadata(single: Server, store: Store) -> None:
    assert httpx.get(f"{single.url}/readyz").status_code == 200
    assert httpx.get(f"{single.url}/livez").status_code == 200
    metrics = httpx.get(f"{single.url}/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text and "/classify" in metrics.text
    for method in ("GET", "POST"):
        meta = httpx.request(method, f"{single.url}/metadata", timeout=30)
        assert meta.status_code == 200, meta.text
        info = meta.json()
        assert info["classes"] == CLASSES and info["model"] == store.step1
        # SERVE_PROVIDER=auto: CUDA where it runs, else the CPU fallback
        assert info["providers"] == {store.step1: "cuda" if cuda_available() else "cpu"}
        assert info["precisions"] == {store.step1: "fp32"}
        assert info["runtime"]["model_threads"] == 1 and info["runtime"]["sessions"] == "shared"
        assert info["runtime"]["batch_shapes"] == ("buckets" if cuda_available() else "exact")
        (model,) = info["models"]
        assert model["tag"] == store.step1 and model["step"] == 1 and 0 <= model["accuracy"] <= 1
        assert model["macs"] > 0 and model["params"] > 0 and model["latency"]["ort_cpu_b1_p50_ms"] > 0
    assert cuda_available() or "serving on CPU" in single.output()  # the fallback is logged


# --- ensembles ----------------------------------------------------------------------------------

def _ensemble_expectation(p0: np.ndarray, p1: np.ndarray, voting: str) -> tuple[str, float]:
    """Written out independently of serve/voting.py, for two members."""
    mean = (p0 + p1) / 2
    if voting == "soft":
        return CLASSES[int(np.argmax(mean))], float(mean.max())
    v0, v1 = int(np.argmax(p0)), int(np.argmax(p1))
    if v0 == v1:
        return CLASSES[v0], 1.0
    return CLASSES[v0 if mean[v0] >= mean[v1] else v1], 0.5


@pytest.mark.parametrize("voting", ["soft", "hard"])
def test_ensemble_votes_match_direct_onnxruntime(servers: dict[str, Server], store: Store, voting: str) -> None:
    images = [_encode(_picture(name, (36, 28), seed), "PNG") for seed, name in enumerate(CLASSES * 3)]
    images += list(format_corpus().values())[:6]
    p0, p1 = reference_probs(store, 0, images), reference_probs(store, 1, images)
    server = servers[voting]
    with httpx.Client() as client:
        for data, a, b in zip(images, p0, p1):
            response = classify(server, data, client=client)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["votes"] == [CLASSES[int(np.argmax(a))], CLASSES[int(np.argmax(b))]]
            label, confidence = _ensemble_expectation(a, b, voting)
            assert answer["label"] == label and answer["class_index"] == CLASSES.index(label)
            assert answer["confidence"] == pytest.approx(confidence, abs=1e-4)
            assert answer["model"] == f"{voting}-vote({store.step0},{store.step1})"
            assert answer["top_k"][0]["label"] == label
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["voting"] == voting and [m["tag"] for m in meta["models"]] == [store.step0, store.step1]
    assert set(meta["providers"].values()) == {"cuda" if cuda_available() else "cpu"}
    if voting == "hard":
        runtime = meta["runtime"]
        assert (runtime["model_threads"], runtime["sessions"], runtime["batch_shapes"]) == (2, "per-thread", "buckets")
        expected = [classify(server, data).json()["label"] for data in images]
        with ThreadPoolExecutor(8) as pool:  # concurrent: batches of up to 6 rows on both model threads
            answers = list(pool.map(lambda data: classify(server, data), images * 3))
        assert [a.status_code for a in answers] == [200] * len(answers)
        assert [a.json()["label"] for a in answers] == expected * 3


def _serve_until_exit(store: Store, tmp_path: Path, **env: str) -> tuple[int, str]:
    server = Server(store.home, tmp_path / "fail.log", **env)
    try:
        code = server.process.wait(timeout=START_TIMEOUT_S)
    finally:
        server.stop()
    return code, server.output()


@pytest.mark.parametrize("models, message", [
    ("{step1},{other}", "ensemble members must share class names"),
    ("no-such-model", "is not in the BentoML model store"),
    ("", "SERVE_MODELS is not set"),
])
def test_bad_configuration_is_a_clear_startup_error(store: Store, tmp_path: Path, models: str, message: str) -> None:
    env = {"SERVE_MODELS": models.format(step1=store.step1, other=store.other_classes)}
    code, output = _serve_until_exit(store, tmp_path, **env)
    assert code != 0 and message in output


def test_bentoml_build_packs_the_service_and_the_models(store: Store, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(store.home / "models", home / "models")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           "SERVE_MODELS": f"{store.step0},tiny-s1"}
    result = subprocess.run([str(BENTOML), "build", "--output", "tag"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, _, version = tag.partition(":")
    bento = home / "bentos" / name / version
    import yaml

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    services = {s["name"]: s for s in info["services"]}
    assert info["entry_service"] == "Classifier" and list(services) == ["Classifier"]
    assert [m["tag"] for m in services["Classifier"]["models"]] == [store.step0, store.step1]
    assert {"name": "SERVE_MODELS", "value": f"{store.step0},{store.step1}", "stage": "all"} in info["envs"]
    assert (bento / "src" / "serve" / "service.py").is_file() and (bento / "src" / "compress" / "imaging.py").is_file()
    assert not (bento / "src" / "tests").exists() and not (bento / "src" / "compress" / "training.py").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    import bentoml

    # one BentoML pin, BentoML's own: the version that builds (bentofile.yaml lists none, see deploy/image.py)
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in requirements
    assert [line for line in requirements.splitlines() if line.startswith("bentoml")] == [f"bentoml=={bentoml.__version__}"]
    # BentoML 1.4 copies the models in when exporting or containerizing
    exported = tmp_path / "classifier.bento"
    result = subprocess.run([str(BENTOML), "export", tag, str(exported)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    import tarfile

    with tarfile.open(exported) as archive:
        names = set(archive.getnames())
    for tag_ in (store.step0, store.step1):
        model_name, _, model_version = tag_.partition(":")
        assert any(n.endswith(f"models/{model_name}/{model_version}/model.onnx") for n in names), sorted(names)[:20]


# --- pure functions (no server) -----------------------------------------------------------------

def test_adaptive_batcher_merges_requests_that_wait_and_returns_each_its_rows() -> None:
    import threading

    from serve.batching import AdaptiveBatcher

    calls: list[int] = []
    release = threading.Event()

    def predict(rows: np.ndarray, slot: int) -> np.ndarray:
        assert slot == 0
        calls.append(len(rows))
        if len(calls) == 1:
            release.wait(5)  # the first call holds the model while the others queue
        return rows * 10

    batcher = AdaptiveBatcher(predict, max_batch_size=4)

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher(np.array([[1.0]])))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher(np.array([[float(i)], [float(i) + 0.5]]))) for i in range(2, 6)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert calls == [1, 4, 4]  # alone at first, then the waiting requests two by two (4 rows each)
    assert results[0].tolist() == [[10.0]]
    for i, result in zip(range(2, 6), results[1:]):
        assert result.tolist() == [[10.0 * i], [10.0 * i + 5.0]]
    assert batcher.stats() == {"model_calls": 3, "rows": 9, "mean_batch_size": 3.0}
    # a new event loop (its worker task died with the old one) is served by a new worker
    assert asyncio.run(asyncio.wait_for(batcher(np.array([[2.0]])), 5)).tolist() == [[20.0]]


def test_adaptive_batcher_splits_large_requests_and_survives_a_failing_call() -> None:
    from serve.batching import AdaptiveBatcher

    sizes: list[int] = []

    def predict(rows: np.ndarray, slot: int) -> np.ndarray:
        sizes.append(len(rows))
        if np.isnan(rows).any():
            raise RuntimeError("model failed")
        return rows + 1

    batcher = AdaptiveBatcher(predict, max_batch_size=3)

    async def scenario() -> tuple[np.ndarray, BaseException | None, np.ndarray]:
        big = await batcher(np.arange(7, dtype=np.float32).reshape(7, 1))
        try:
            await batcher(np.array([[np.nan]]))
            failure = None
        except RuntimeError as exc:
            failure = exc
        after = await batcher(np.array([[5.0]]))
        return big, failure, after

    big, failure, after = asyncio.run(scenario())
    assert big.ravel().tolist() == [1, 2, 3, 4, 5, 6, 7] and max(sizes[:3]) <= 3
    assert isinstance(failure, RuntimeError) and after.tolist() == [[6.0]]


def test_soft_voting_constructed() -> None:
    from serve.voting import prediction

    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.2, 0.5, 0.3]], dtype=np.float32)
    answer = prediction(probs, CLASSES, voting="soft", top_k=3, model="m")
    assert answer["label"] == "dog" and answer["class_index"] == 1
    assert answer["confidence"] == pytest.approx(1.3 / 3)
    assert [t["label"] for t in answer["top_k"]] == ["dog", "cat", "owl"]
    assert answer["votes"] == ["cat", "dog", "dog"]


def test_hard_voting_majority_and_tie_break() -> None:
    from serve.voting import hard_vote, prediction

    # majority beats mean probability: soft voting would pick cat (mean 0.53)
    probs = np.array([[0.98, 0.01, 0.01], [0.3, 0.4, 0.3], [0.3, 0.4, 0.3]], dtype=np.float32)
    answer = prediction(probs, CLASSES, voting="hard", top_k=2, model="m")
    assert answer["label"] == "dog" and answer["confidence"] == pytest.approx(2 / 3)
    assert answer["votes"] == ["cat", "dog", "dog"] and [t["label"] for t in answer["top_k"]] == ["dog", "cat"]
    assert prediction(probs, CLASSES, voting="soft", top_k=1, model="m")["label"] == "cat"
    # a 1-1 tie goes to the tied label with the higher mean probability (owl 0.45 vs cat 0.4)
    tie = np.array([[0.5, 0.2, 0.3], [0.3, 0.1, 0.6]], dtype=np.float32)
    shares, order = hard_vote(tie)
    assert CLASSES[order[0]] == "owl" and shares.tolist() == [0.5, 0.0, 0.5]
    # four members, 2-2 tie between dog and owl, cat has no vote
    four = np.array([[0.1, 0.8, 0.1], [0.1, 0.5, 0.4], [0.1, 0.3, 0.6], [0.0, 0.1, 0.9]], dtype=np.float32)
    assert prediction(four, CLASSES, voting="hard", top_k=3, model="m")["label"] == "owl"


def test_single_model_is_not_a_vote() -> None:
    from serve.voting import prediction

    answer = prediction(np.array([[0.2, 0.7, 0.1]], dtype=np.float32), CLASSES, voting="hard", top_k=2, model="m")
    assert answer == {"label": "dog", "class_index": 1, "confidence": pytest.approx(0.7),
                      "top_k": [{"label": "dog", "confidence": pytest.approx(0.7)},
                                {"label": "cat", "confidence": pytest.approx(0.2)}], "model": "m"}


@pytest.mark.parametrize("size, resize, crop", [((40, 30), 16, 16), ((30, 40), 36, 32), ((300, 200), 256, 224),
                                                ((16, 16), 16, 16), ((17, 90), 20, 16)])
def test_preprocessing_equals_the_training_transform(size: tuple[int, int], resize: int, crop: int) -> None:
    from compress.data import Preprocessing as TrainPre
    from serve.inputs import Preprocessing

    image = _picture("owl", size, 11)
    train = TrainPre(crop, resize)
    ours = Preprocessing.from_dict(train.to_dict())(image)
    np.testing.assert_allclose(ours, train.eval_transform()(image).numpy(), atol=1e-6)


def test_input_layout_packs_members_with_different_input_sizes() -> None:
    from serve.inputs import InputLayout, Preprocessing

    small = Preprocessing(16, 16, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    large = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    layout = InputLayout([small, large, small])
    assert layout.member_group == [0, 1, 0] and layout.width == 3 * 16 * 16 + 3 * 32 * 32
    images = [_picture("cat", (40, 30), 1), _picture("dog", (50, 60), 2)]
    rows = layout.pack(images)
    assert rows.shape == (2, layout.width)
    np.testing.assert_array_equal(layout.unpack(rows, 1)[1], large(images[1]))
    np.testing.assert_array_equal(layout.unpack(rows, 2)[0], small(images[0]))


def test_decode_errors_are_bad_input() -> None:
    from serve.inputs import BadInput, decode_image

    png = _encode(_picture("cat", (20, 20), 1), "PNG")
    assert decode_image(png, max_bytes=10**6, max_pixels=10**6).mode == "RGB"
    cases = {b"": (400, "empty"), b"hello": (400, "not an image"), png[:50]: (400, "truncated"),
             png + b"x" * 2000: (413, "over the limit")}
    for data, (status, text) in cases.items():
        with pytest.raises(BadInput, match=text) as info:
            decode_image(data, max_bytes=len(png) + 100, max_pixels=10**6)
        assert info.value.status == status
    with pytest.raises(BadInput, match="pixels, over the limit"):
        decode_image(_encode(Image.new("L", (2000, 2000)), "PNG"), max_bytes=10**6, max_pixels=10**6)


def test_settings_from_env() -> None:
    from serve.settings import ConfigError, Settings

    settings = Settings.from_env({"SERVE_MODELS": " a:1, b ", "SERVE_VOTING": "HARD", "SERVE_MAX_PIXELS": "1_000"})
    assert settings.models == ("a:1", "b") and settings.voting == "hard" and settings.max_pixels == 1000
    assert Settings.from_env({}).models == () and Settings.from_env({}).voting == "soft"
    for env in ({"SERVE_VOTING": "median"}, {"SERVE_MAX_BYTES": "lots"}, {"SERVE_MODELS": "a,a"},
                {"SERVE_PROVIDER": "tpu"}, {"SERVE_MAX_FILES": "0"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)
    with pytest.raises(ConfigError, match="SERVE_MODELS is not set"):
        Settings.from_env({}).require_models()


def test_session_provider_choice(store: Store) -> None:
    from serve.runtime import RuntimeOptions, create_session
    from serve.settings import ConfigError

    path = next((store.run / "steps").glob("step_01/model.onnx"))
    session, provider = create_session(path, RuntimeOptions("cpu"))
    assert provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    if _has_cuda_driver():
        pytest.skip("a GPU driver is present: the fallback paths are not reachable here")
    assert create_session(path, RuntimeOptions("auto"))[1] == "cpu"
    with pytest.raises(ConfigError, match="SERVE_PROVIDER=cuda"):
        create_session(path, RuntimeOptions("cuda"))


def _has_cuda_driver() -> bool:
    from compress.runtime.sessions import cuda_driver_present

    return cuda_driver_present()


def test_fp16_precision_serves_the_fp16_export(store: Store, tmp_path: Path) -> None:
    from compress.export import export_fp16
    from compress.registry import model_store, register
    from serve.runtime import Member, RuntimeOptions, card_from_model
    from serve.settings import ConfigError

    run = tmp_path / "run"
    shutil.copytree(store.run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["steps"][1]
    export_fp16(run / entry["onnx"], run / "steps" / "step_01" / "model_fp16.onnx")
    entry["onnx_fp16"] = "steps/step_01/model_fp16.onnx"
    (run / "manifest.json").write_text(json.dumps(manifest))
    tag = register(run, step=1, name="half", bentoml_home=tmp_path / "home")
    card = card_from_model(model_store(tmp_path / "home").get(tag))
    fp32, fp16 = (Member.load(card, RuntimeOptions("cpu", precision=p)) for p in ("fp32", "fp16"))
    batch = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(fp16.probabilities(batch), fp32.probabilities(batch), atol=2e-2)
    only_fp32 = card_from_model(model_store(store.home).get(store.step1))
    with pytest.raises(ConfigError, match="no fp16 export"):
        Member.load(only_fp32, RuntimeOptions("cpu", precision="fp16"))


def test_bench_serve_baseline_reports_the_fraction_and_server_cpu(single: Server, store: Store, tmp_path: Path) -> None:
    """`bench serve --baseline`: the served model timed in-process in the same run, the service's
    fraction of it, and the CPU its processes spent per request (read from those processes)."""
    from bench.cli import main as bench_main

    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(CLASSES):
        _picture(name, (32, 32), seed).save(images / f"{name}.png")
    out = tmp_path / "out"
    bench_main(["serve", single.url, "--images", str(images), "--concurrency", "1,4", "--requests", "40",
                "--duration", "20", "--baseline", f"{store.run}:1", "--out", str(out)])
    doc = json.loads((out / "results.json").read_text())
    base = doc["baseline"]
    assert base["step"] == 1 and base["session"]["intra_op_spinning"] is False
    assert base["batches"]["1"]["images_per_s"] > 0 and base["service_mean_batch_size"] >= 1
    for level in doc["levels"]:
        assert level["fraction_of_in_process_b1"] == pytest.approx(level["ok_per_s"] / base["batches"]["1"]["images_per_s"])
        assert 0 < level["server_cpu_ms_per_request"] < 1000  # the server worked, and per request, not per level
        # the level's own mean model batch (from /metadata before and after it) and the model's CPU at that batch
        assert 1 <= level["model_mean_batch"] <= level["concurrency"]
        assert base["batches"][str(round(level["model_mean_batch"]))]["cpu_ms_per_image"] == level["model_cpu_ms_per_image"] > 0
        assert level["server_cpu_ms_outside_model"] == pytest.approx(level["server_cpu_ms_per_request"]
                                                                     - level["model_cpu_ms_per_image"])
    assert doc["levels"][0]["model_mean_batch"] == 1  # one request in flight: every model call is batch 1
    assert "## Against the same model in-process" in (out / "report.md").read_text()
    assert "server CPU outside the model" in (out / "report.md").read_text()


@pytest.mark.gpu
def test_service_on_cuda_answers_and_says_cuda(store: Store, server_factory: Any) -> None:
    server = server_factory(SERVE_MODELS=store.step1, SERVE_PROVIDER="cuda").wait_ready()
    image = _encode(_picture("cat", (32, 32), 0), "PNG")
    answer = classify(server, image)
    assert answer.status_code == 200 and answer.json()["label"] in CLASSES
    meta = httpx.get(f"{server.url}/metadata", timeout=30).json()
    assert meta["providers"] == {store.step1: "cuda"}


def test_the_service_serves_an_int8_variant(store: Store, server_factory: Any, tmp_path: Path) -> None:
    """`compress quantize` + `compress register` + `SERVE_PRECISION=int8 bentoml serve`: the int8 model
    answers like direct ONNX Runtime on that file, and /metadata says int8 (and the provider)."""
    from compress.cli import main
    from compress.registry import register

    run = tmp_path / "run"
    shutil.copytree(store.run, run, ignore=shutil.ignore_patterns("bench"))
    main(["quantize", str(run), "--steps", "1", "--calibration-images", "24", "--int8-format", "qdq-u8s8",
          "--max-accuracy-drop", "0.5"])
    tag = register(run, step=1, name="tiny-int8", bentoml_home=store.home)
    server = server_factory(SERVE_MODELS=tag, SERVE_PRECISION="int8").wait_ready()
    images = [_encode(_picture(name, (32, 32), seed), "PNG") for seed, name in enumerate(CLASSES)]
    import onnxruntime as ort

    from compress.data import Preprocessing as TrainPre
    from compress.imaging import open_rgb

    entry = next(s for s in json.loads((run / "manifest.json").read_text())["steps"] if s["step"] == 1)
    session = ort.InferenceSession(str(run / entry["variants"]["int8"]["onnx"]), providers=["CPUExecutionProvider"])
    transform = TrainPre.from_dict(json.loads((run / "manifest.json").read_text())["preprocessing"]).eval_transform()
    for data in images:
        answer = classify(server, data)
        assert answer.status_code == 200, answer.text
        logits = session.run(None, {"input": transform(open_rgb(io.BytesIO(data)))[None].numpy()})[0][0]
        assert answer.json()["label"] == CLASSES[int(logits.argmax())]
    meta = httpx.get(f"{server.url}/metadata", timeout=30).json()
    assert meta["precisions"] == {tag: "int8"} and meta["providers"][tag] in ("cpu", "cuda")
