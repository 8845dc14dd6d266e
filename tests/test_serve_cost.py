"""Issue 11, cost per request: the upload endpoints are answered by the guard from the files it
has already parsed (not by BentoML's API wrapper, which parsed the body again and copied every
file to disk), plainly framed forms are read without Starlette's parser, the guard sits outside
BentoML's tracing and timeout layers, and nothing is traced without an exporter. What must not
change: the answers, BentoML's own client, BentoML's headers, the fallback through the API, the
parsed forms, JSON 500s (and now 504s).

Speed is measured in bench/results/cpu-2core-serve/, never asserted here."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from test_serve import (CLASSES, Server, Store, _encode, _picture, classify,  # noqa: F401
                        server_factory, store)


@pytest.fixture(scope="module")
def served(store: Store, server_factory: Any) -> Server:
    return server_factory(SERVE_MODELS=store.step1).wait_ready()


def _jpeg(seed: int) -> bytes:
    return _encode(_picture(CLASSES[seed % 3], (32, 32), seed), "JPEG", quality=90)


# --- against a real `bentoml serve` ---------------------------------------------------------------

def test_bentoml_client_gets_the_same_answers(served: Server, tmp_path: Path) -> None:
    """BentoML's SyncHTTPClient (which builds its calls from /schema.json) still works, and its
    answers are the ones a plain multipart POST gets."""
    import bentoml

    files = []
    for seed in range(3):
        files.append(tmp_path / f"{seed}.jpg")
        files[-1].write_bytes(_jpeg(seed))
    with bentoml.SyncHTTPClient(served.url, timeout=30) as client:
        single = client.classify(image=files[0])
        batch = client.classify_batch(images=files)
    assert single == classify(served, files[0].read_bytes(), "0.jpg").json()
    assert batch[0] == single and len(batch) == 3
    assert [answer["label"] for answer in batch] == [classify(served, f.read_bytes()).json()["label"] for f in files]


def test_answers_carry_bentoml_headers(served: Server) -> None:
    """``Server`` and ``X-BentoML-Request-ID`` (16 hex digits, one per request), as BentoML's
    API wrapper sent them, on answers and on refusals from the service."""
    ids = set()
    with httpx.Client() as client:
        for seed in range(5):
            response = classify(served, _jpeg(seed), client=client)
            assert response.status_code == 200
            assert response.headers["server"] == "BentoML Service/Classifier"
            assert re.fullmatch(r"[0-9a-f]{16}", response.headers["x-bentoml-request-id"])
            ids.add(response.headers["x-bentoml-request-id"])
        bad = classify(served, b"not an image", client=client)
    assert len(ids) == 5
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]
    assert bad.headers["server"] == "BentoML Service/Classifier"


# --- the guard's direct path, in process (ASGI) -----------------------------------------------------

def _guard(app: Any, direct: Any) -> Any:
    from serve.guard import BodyBudget, UploadGuard, UploadRule

    return UploadGuard(app, rules={"/up": UploadRule("image", 1, 1 << 20)}, max_file_bytes=1 << 20,
                       budget=BodyBudget(5, 2), direct=direct)


def _post(asgi: Any, data: bytes = b"\x89PNG payload") -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as client:
            return await client.post("/up", files={"image": ("a.png", data, "image/png")})

    return asyncio.run(go())


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Stands for BentoML: answers the length of the body it was given."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await JSONResponse({"app_saw_bytes": len(body)})(scope, receive, send)


def test_guard_without_a_handler_replays_the_body_to_the_api() -> None:
    response = _post(_guard(_echo_app, lambda path: None))
    assert response.status_code == 200 and response.json()["app_saw_bytes"] > len(b"\x89PNG payload")


def test_guard_answers_from_the_parsed_files() -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def handler(files: list[UploadFile]) -> JSONResponse:
        seen.extend((f.filename, f.file.read()) for f in files)
        return JSONResponse({"direct": True})

    response = _post(_guard(_echo_app, lambda path: handler if path == "/up" else None), b"image bytes")
    assert response.json() == {"direct": True}
    assert seen == [("a.png", b"image bytes")]


def test_guard_turns_a_handler_failure_into_a_json_500() -> None:
    async def handler(files: list[UploadFile]) -> JSONResponse:
        raise RuntimeError("boom")

    response = _post(_guard(_echo_app, lambda path: handler))
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "unexpected error" in response.json()["error"]


def test_guard_still_refuses_before_the_handler() -> None:
    called = []

    async def handler(files: list[UploadFile]) -> JSONResponse:
        called.append(files)
        return JSONResponse({})

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_guard(_echo_app, lambda path: handler)),
                                     base_url="http://test") as client:
            return await client.post("/up", files={"other": ("a.png", b"x", "image/png")})

    response = asyncio.run(go())
    assert response.status_code == 400 and "missing multipart field 'image'" in response.json()["error"]
    assert not called


# --- tracing ------------------------------------------------------------------------------------------

@pytest.fixture
def tracing_config() -> Any:
    from bentoml._internal.configuration.containers import BentoMLContainer

    tracing = BentoMLContainer.config.tracing
    saved = (tracing.exporter_type.get(), tracing.excluded_urls.get())
    yield tracing
    tracing.exporter_type.set(saved[0])
    tracing.excluded_urls.set(saved[1])


def test_nothing_is_traced_without_an_exporter(tracing_config: Any) -> None:
    from serve.tracing import UntracedRequests

    tracing_config.exporter_type.set(None)
    tracing_config.excluded_urls.set("/private")
    skip = UntracedRequests()
    for url in ("http://127.0.0.1:3000/classify", "http://h/classify_batch?x=1", "http://h/livez", "http://h/nope"):
        assert skip.url_disabled(url)

    tracing_config.exporter_type.set("otlp")
    traced = UntracedRequests()
    assert not traced.url_disabled("http://127.0.0.1:3000/classify")
    assert not traced.url_disabled("http://h/livez")
    assert traced.url_disabled("http://h/private")  # the configured exclusions stay


def test_request_id_is_the_span_id_when_there_is_one() -> None:
    from bentoml._internal.context import trace_context

    from serve.tracing import request_id

    assert re.fullmatch(r"[0-9a-f]{16}", request_id())
    trace_context.request_id = 0xABC
    try:
        assert request_id() == "0000000000000abc"
    finally:
        trace_context.request_id = None


def test_open_image_reads_the_header_once_and_decodes_like_before() -> None:
    from serve.inputs import BadInput, decode_image, decode_opened, open_image

    data = _encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
    opened = open_image(data, max_bytes=10**6, max_pixels=10**6)
    assert opened.size == (40, 30)
    assert decode_opened(opened).tobytes() == decode_image(data, max_bytes=10**6, max_pixels=10**6).tobytes()
    with pytest.raises(BadInput, match="not an image"):
        open_image(b"plain text", max_bytes=10**6, max_pixels=10**6)
    with pytest.raises(BadInput, match="over the limit"):
        open_image(_encode(Image.new("L", (2000, 2000)), "PNG"), max_bytes=10**6, max_pixels=10**6)
    truncated = open_image(data[: len(data) // 2], max_bytes=10**6, max_pixels=10**6)  # the header is intact
    with pytest.raises(BadInput, match="damaged or truncated"):
        decode_opened(truncated)


# --- SERVE_WORKERS=auto -------------------------------------------------------------------------------

def test_auto_workers_one_per_core_capped_by_memory(tmp_path: Path) -> None:
    from serve import workers

    model = tmp_path / "model.onnx"
    model.write_bytes(b"\0" * 1000)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 3000)  # external weights count too
    per_worker = workers.BASE_WORKER_BYTES + 3 * 4000 + 2 * 1000 * workers.DECODE_BYTES_PER_PIXEL
    roomy = workers.plan([model], max_pixels=1000, cores=2, available_bytes=100 * per_worker)
    assert (roomy.workers, roomy.bytes_per_worker, roomy.memory_workers) == (2, per_worker, 80)
    assert "limited by cores" in roomy.describe()
    tight = workers.plan([model], max_pixels=1000, cores=2, available_bytes=int(1.3 * per_worker))
    assert tight.workers == 1 and "limited by memory" in tight.describe()
    assert workers.plan([model], max_pixels=1000, cores=2, available_bytes=0).workers == 1  # never none
    # the decode budget counts at most 4 images at once, whatever the cores
    many = workers.plan([], max_pixels=10**6, cores=16, available_bytes=10 * 2**40)
    assert many.workers == 16 and many.bytes_per_worker == workers.BASE_WORKER_BYTES + 4 * 10**6 * workers.DECODE_BYTES_PER_PIXEL


def test_serve_workers_setting_takes_auto() -> None:
    from serve.settings import AUTO, ConfigError, Settings

    assert Settings.from_env({"SERVE_WORKERS": "auto"}).workers == AUTO
    assert Settings.from_env({"SERVE_WORKERS": "3"}).workers == 3
    with pytest.raises(ConfigError):
        Settings.from_env({"SERVE_WORKERS": "0"})


def test_auto_workers_serve(store: Store, server_factory: Any) -> None:
    """A real `bentoml serve` with SERVE_WORKERS=auto starts the planned workers, logs the
    plan, and answers."""
    from serve import workers

    server = server_factory(SERVE_MODELS=store.step1, SERVE_WORKERS="auto").wait_ready()
    expected = workers.plan([], max_pixels=4_000_000).workers  # the tiny model's files barely count
    assert classify(server, _jpeg(1)).status_code == 200
    assert len(server.workers) == expected
    assert "SERVE_WORKERS=auto:" in server.output()


# --- the plain multipart fast path ------------------------------------------------------------------

def _starlette_form(content_type: str, body: bytes, max_files: int) -> Any:
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    async def stream() -> Any:
        yield body

    async def go() -> Any:
        return await MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=max_files,
                                     max_fields=8).parse()

    return asyncio.run(go())


def _form_view(form: Any) -> list[tuple[str, str | None, list[tuple[bytes, bytes]], bytes, int | None]]:
    return [(name, value.filename, value.headers.raw, value.file.read(), value.size) for name, value in form.multi_items()]


def _client_body(files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://h/up", files=files)
    return request.headers["content-type"], request.read()


def _bodies() -> list[tuple[str, str, bytes, bool]]:
    """(what, content type, body, whether the fast path must take it)."""
    jpeg = _jpeg(1)
    tricky = b"data\r\n--b0und not a boundary\r\n--b0undar\r\n" + jpeg
    bodies = [("httpx, one file", *_client_body([("image", ("d.jpg", jpeg, "image/jpeg"))]), True),
              ("httpx, three files", *_client_body([("images", (f"{i}.png", bytes([i]) * 50, "image/png"))
                                                    for i in range(3)]), True),
              ("httpx, UTF-8 file name", *_client_body([("image", ("héllo wörld.jpg", jpeg, "image/jpeg"))]), True),
              ("httpx, empty file", *_client_body([("image", ("e.jpg", b"", "image/jpeg"))]), True)]

    def hand(parts: list[bytes], boundary: str = "b0und", end: bytes = b"--\r\n") -> tuple[str, bytes]:
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
        return f"multipart/form-data; boundary={boundary}", body[:-2] + b"\r\n--" + boundary.encode() + end

    def part(disposition: str, data: bytes = b"xyz", extra: str = "Content-Type: image/png\r\n") -> bytes:
        return f"Content-Disposition: {disposition}\r\n{extra}\r\n".encode() + data

    plain = 'form-data; name="image"; filename="a.png"'
    bodies += [
        ("curl-style boundary, no final CRLF", *hand([part(plain)], boundary="-" * 24 + "a1b2c3", end=b"--"), True),
        ("data holding boundary-like bytes", *hand([part(plain, tricky)]), False),
        ("header without a space", *hand([part(plain, extra="Content-Type:image/png\r\n")]), False),
        ("escaped quote in the file name", *hand([part('form-data; name="image"; filename="a\\"b.png"')]), False),
        ("semicolon in the file name", *hand([part('form-data; name="image"; filename="a;b.png"')]), False),
        ("a text field", *hand([part('form-data; name="image"', extra="")]), False),
        ("filename before name", *hand([part('form-data; filename="a.png"; name="image"')]), False),
        ("an early closing boundary", *hand([part(plain, b"x\r\n--b0und--\r\nmore")]), False),
        ("no part headers", *hand([b"\r\nraw"]), False),
        ("Windows path file name", *hand([part('form-data; name="image"; filename="C:\\x\\a.png"')]), False),
    ]
    content_type, body = _client_body([("image", ("d.jpg", jpeg, "image/jpeg"))])
    bodies += [("charset parameter", content_type + "; charset=latin-1", body, False),
               ("quoted boundary", content_type.replace("boundary=", 'boundary="') + '"', body, False),
               ("truncated", content_type, body[:-10], False),
               ("preamble", content_type, b"preamble\r\n" + body, False)]
    return bodies


@pytest.mark.parametrize("what,content_type,body,fast", _bodies(), ids=[b[0] for b in _bodies()])
def test_plain_form_reads_what_starlette_reads_or_steps_aside(what: str, content_type: str, body: bytes,
                                                            fast: bool) -> None:
    from starlette.formparsers import MultiPartException

    from serve.multipart import parse_plain_form

    plain = parse_plain_form(content_type, body, max_files=3)
    assert (plain is not None) == fast, what
    if plain is not None:
        assert _form_view(plain) == _form_view(_starlette_form(content_type, body, 3))
    else:  # whatever Starlette makes of it is what the guard answers, as before
        try:
            _starlette_form(content_type, body, 3)
        except MultiPartException:
            pass


def test_plain_form_leaves_too_many_files_to_starlette() -> None:
    from serve.multipart import parse_plain_form

    content_type, body = _client_body([("images", (f"{i}.png", b"x", "image/png")) for i in range(3)])
    assert parse_plain_form(content_type, body, max_files=2) is None
    assert parse_plain_form(content_type, body, max_files=3) is not None


# --- the guard outside BentoML's tracing and timeout layers -----------------------------------------

def test_guard_answers_504_when_the_handler_takes_too_long() -> None:
    from serve.guard import BodyBudget, UploadGuard, UploadRule

    reasons: list[str] = []

    async def slow(files: list[UploadFile]) -> JSONResponse:
        await asyncio.sleep(30)
        return JSONResponse({})

    guard = UploadGuard(_echo_app, rules={"/up": UploadRule("image", 1, 1 << 20)}, max_file_bytes=1 << 20,
                        budget=BodyBudget(5, 2), direct=lambda path: slow, answer_timeout=0.2,
                        on_reject=reasons.append)
    response = _post(guard)
    assert response.status_code == 504 and "0.2 seconds" in response.json()["error"]
    assert reasons == ["answer_timeout"]


def test_guard_moves_behind_the_metrics_middleware_unless_traced() -> None:
    from starlette.middleware import Middleware

    from serve.guard import UploadGuard
    from serve.stack import reorder

    Metrics, Tracing, Timeout, Context = (type(name, (), {}) for name in ("Metrics", "Tracing", "Timeout", "Context"))
    Bounded = type("Bounded", (Metrics,), {})  # serve/metrics.py's subclass of BentoML's
    bentoml_order = [Middleware(Bounded), Middleware(Tracing), Middleware(Timeout), Middleware(UploadGuard),
                     Middleware(Context)]

    def names(stack: list[Any]) -> list[str]:
        return [entry.cls.__name__ for entry in stack]

    assert names(reorder(bentoml_order, UploadGuard, Metrics, traced=False)) == \
        ["Bounded", "UploadGuard", "Tracing", "Timeout", "Context"]
    assert reorder(bentoml_order, UploadGuard, Metrics, traced=True) == bentoml_order
    without_metrics = bentoml_order[1:]
    assert names(reorder(without_metrics, UploadGuard, Metrics, traced=False)) == \
        ["UploadGuard", "Tracing", "Timeout", "Context"]


def test_served_stack_puts_the_guard_behind_the_metrics() -> None:
    """The real BentoML app factory, as a worker builds it (no exporter configured)."""
    import serve.service as service

    app = service.Classifier.to_asgi(is_main=True)
    names = [entry.cls.__name__ for entry in app.user_middleware]
    assert names[:2] == ["BoundedTrafficMetrics", "UploadGuard"], names
    assert names.index("UploadGuard") < names.index("OpenTelemetryMiddleware") < names.index("TimeoutMiddleware")
