"""ASGI middleware in front of BentoML: every request body is bounded in size and in time
while it streams, and every refusal is a JSON ``{"error": "..."}``.

Measured with BentoML 1.4.39 (which this works around):

- a multipart body without a boundary, a garbled one, a part without Content-Disposition,
  the image sent as a text field (BentoML then fetches it as a URL) or an unexpected file
  field all end in 500 "unexpected error": the upload endpoints' bodies are parsed here
  first, with the parser BentoML uses, and only well-formed requests reach the API;
- nothing bounds how long a body may take: a client holding half a body kept its
  connection (and worker memory) for as long as it liked. Here the whole body must arrive
  within ``body_timeout`` seconds and no gap may exceed ``idle_timeout`` (-> 408);
- a body was read whole into memory before being checked (600 MiB raised the worker by
  1.6 GB). Here it is checked while it streams and kept in memory only up to
  :data:`SPOOL_IN_MEMORY` bytes, the rest in a temporary file;
- a client that sends its whole over-limit body before reading got a connection reset
  (the server closed the socket with unread data): an early refusal first reads and drops
  the rest of the body, up to as much again as the limit, then answers;
- 404/405 answers were plain text, and a malformed ``POST /metadata`` logged a traceback
  and answered a ``detail`` list: those are JSON here, and ``/metadata`` (an API without
  arguments) also answers ``GET``;
- ``/docs.json`` serves the service's own OpenAPI document (see ``serve/openapi.py``).

Cost per request: once this middleware has parsed and checked an upload, handing the body on
to BentoML's API wrapper parsed it a second time, copied every file to a temporary file and
validated the copy with pydantic (measured: about half of the service's CPU per request with
a 32x32 JPEG). An upload endpoint with a ``direct`` handler is therefore answered here, from
the files already parsed, within ``answer_timeout`` seconds (else a JSON 504, as BentoML's
traffic timeout answers); ``serve/stack.py`` places this middleware so that BentoML's metrics
still count these answers. The BentoML API stays declared for its schema and as the way in
while the service instance does not exist yet."""
from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import anyio
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import Response

from serve.multipart import parse_plain_form

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
DirectHandler = Callable[[list[UploadFile]], Awaitable[Response]]
"""Answers an upload endpoint from its parsed files (the guard has checked them)."""

SPOOL_IN_MEMORY = 1024 * 1024
"""Bytes of a body kept in memory; the rest goes to a temporary file."""
REPLAY_CHUNK = 1024 * 1024
MAX_FILENAME_BYTES = 200
"""BentoML names its temporary copy of an upload after the file name: a longer one fails
there (``File name too long``) with a 500."""
JSON_API_MAX_BODY = 64 * 1024
"""Largest body of an API without arguments (``/metadata``)."""
UNEXPECTED_ERROR = "An unexpected error has occurred, please check the server log."
"""BentoML's own words for a 500."""

logger = logging.getLogger("serve")


@dataclass(frozen=True)
class UploadRule:
    """What one endpoint accepts: files in ``field``, at most ``max_files`` of them, in a
    body of at most ``max_body`` bytes."""

    field: str
    max_files: int
    max_body: int


@dataclass(frozen=True)
class BodyBudget:
    """How long a body may take: ``timeout`` seconds in all, ``idle_timeout`` between pieces."""

    timeout: float = 30.0
    idle_timeout: float = 5.0


class Rejected(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ClientGone(Exception):
    """The client disconnected before sending its whole body: nobody to answer."""


class BodyReader:
    """Reads a request body from ``receive`` within a size limit and a time budget, keeping
    a copy (in memory up to :data:`SPOOL_IN_MEMORY`, then in a temporary file) to replay."""

    def __init__(self, receive: Receive, *, limit: int, budget: BodyBudget, keep: bool = True) -> None:
        self.receive = receive
        self.limit = limit
        self.budget = budget
        self.keep = keep
        self.size = 0
        self.done = False
        self.chunks: list[bytes] = []
        self.spool: IO[bytes] | None = None
        self.deadline = anyio.current_time() + budget.timeout
        self.marker = b""  # a byte string to look for while the body streams (see ``seen``)
        self.seen = False
        self._tail = b""

    async def next_chunk(self) -> bytes:
        """The next piece of the body (``b""`` once it is complete)."""
        if self.done:
            return b""
        wait = min(self.budget.idle_timeout, self.deadline - anyio.current_time())
        message = None
        with anyio.move_on_after(max(wait, 0.0)):
            message = await self.receive()
        if message is None:
            raise Rejected(408, f"request body not received in time (the whole body must arrive within "
                                f"{self.budget.timeout:g} s, with no pause over {self.budget.idle_timeout:g} s)",
                           "body_timeout")
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk: bytes = message.get("body", b"")
        self.size += len(chunk)
        self.done = not message.get("more_body", False)
        if self.size > self.limit:
            raise Rejected(413, f"request body is over the limit of {self.limit} bytes", "body_too_large")
        if self.keep and chunk:
            self._keep(chunk)
        if self.marker and not self.seen and chunk:
            window = self._tail + chunk
            self.seen = self.marker in window
            self._tail = window[-len(self.marker):]
        return chunk

    def _keep(self, chunk: bytes) -> None:
        if self.spool is not None:
            self.spool.write(chunk)
            return
        self.chunks.append(chunk)
        if self.size > SPOOL_IN_MEMORY:
            self.spool = tempfile.TemporaryFile()
            for kept in self.chunks:
                self.spool.write(kept)
            self.chunks = []

    async def stream(self) -> AsyncIterator[bytes]:
        while not self.done:
            chunk = await self.next_chunk()
            if chunk:
                yield chunk

    async def read_all(self) -> None:
        async for _ in self.stream():
            pass

    async def drain(self, most: int) -> bool:
        """Read and drop the rest of the body, at most ``most`` more bytes within the time
        budget; whether the body was read to its end."""
        self.keep = False
        self.chunks, spool, self.spool = [], self.spool, None
        if spool is not None:
            spool.close()
        self.limit = self.size + most
        try:
            await self.read_all()
        except (Rejected, ClientGone):
            return False
        return True

    def replay(self, receive: Receive) -> Receive:
        """A ``receive`` that hands the kept body to the app, then the real channel (so the
        app still sees a client disconnect)."""
        if self.spool is None:
            body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            pending = True

            async def from_memory() -> Message:
                nonlocal pending
                if pending:
                    pending = False
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return from_memory
        spool = self.spool
        spool.seek(0)
        finished = False

        async def from_file() -> Message:
            nonlocal finished
            if finished:
                return await receive()
            await asyncio.sleep(0)  # let other requests run between pieces of a large body
            chunk = spool.read(REPLAY_CHUNK)
            finished = len(chunk) < REPLAY_CHUNK or spool.tell() >= self.size
            return {"type": "http.request", "body": chunk, "more_body": not finished}

        return from_file

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.chunks = []


class UploadGuard:
    """The middleware. ``rules``: the upload endpoints (path -> :class:`UploadRule`);
    ``json_apis``: paths of APIs without arguments (answered for ``GET`` too);
    ``openapi``: returns the OpenAPI document served at ``/docs.json``;
    ``on_reject``: called with the reason of every refusal (the metrics);
    ``direct``: path -> the handler that answers that upload endpoint from its parsed files,
    or ``None`` (then the body goes on to BentoML's API, e.g. before the service exists);
    ``answer_timeout``: seconds a direct handler may take (None: no limit)."""

    def __init__(self, app: ASGIApp, *, rules: Mapping[str, UploadRule], max_file_bytes: int,
                 budget: BodyBudget = BodyBudget(), json_apis: tuple[str, ...] = (),
                 openapi: Callable[[], dict[str, Any]] | None = None,
                 on_reject: Callable[[str], None] | None = None,
                 direct: Callable[[str], DirectHandler | None] | None = None,
                 answer_timeout: float | None = None) -> None:
        self.app = app
        self.rules = dict(rules)
        self.max_file_bytes = max_file_bytes
        self.budget = budget
        self.json_apis = json_apis
        self.openapi = openapi
        self.on_reject = on_reject or (lambda reason: None)
        self.direct = direct or (lambda path: None)
        self.answer_timeout = answer_timeout
        self._openapi_body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        rule = self.rules.get(path)
        if rule is not None and method == "POST":
            return await self._upload(scope, receive, send, rule)
        if path in self.json_apis and method in ("GET", "POST"):
            return await self._json_api(scope, receive, send)
        if path == "/docs.json" and method == "GET" and self.openapi is not None:
            if self._openapi_body is None:
                self._openapi_body = json.dumps(self.openapi()).encode()
            return await _send_json(send, 200, self._openapi_body)
        return await self.app(scope, receive, self._json_errors(send))

    # --- the upload endpoints -------------------------------------------------------------

    async def _upload(self, scope: Scope, receive: Receive, send: Send, rule: UploadRule) -> None:
        headers = Headers(scope=scope)
        handler = self.direct(scope["path"])
        # a body answered here is not replayed: no copy of it is kept
        reader = BodyReader(receive, limit=rule.max_body, budget=self.budget, keep=handler is None)
        try:
            try:
                declared = _content_length(headers)
                if declared is not None and declared > rule.max_body:
                    raise Rejected(413, f"request body of {declared} bytes is over the limit of {rule.max_body} "
                                        f"bytes", "body_too_large")
                form = await self._check_form(headers, reader, rule)
            except Rejected as exc:
                return await self._refuse(scope, send, reader, exc, headers)
            except ClientGone:
                return
            try:
                if handler is None:
                    await self.app(scope, reader.replay(receive), send)
                else:
                    await self._answer(handler, form.getlist(rule.field), scope, receive, send)  # type: ignore[arg-type]
            finally:
                await form.close()
        finally:
            reader.close()

    async def _answer(self, handler: DirectHandler, files: list[UploadFile], scope: Scope, receive: Receive,
                      send: Send) -> None:
        """Answer from the parsed files; an unexpected error is a JSON 500, as BentoML answers it,
        and no answer within ``answer_timeout`` a JSON 504."""
        try:
            async with asyncio.timeout(self.answer_timeout):
                response = await handler(files)
        except TimeoutError:
            self.on_reject("answer_timeout")
            text = f"not able to process the request in {self.answer_timeout:g} seconds"
            return await _send_json(send, 504, json.dumps({"error": text}).encode())
        except Exception:
            logger.exception("unexpected error in %s %s", scope["method"], scope["path"])
            return await _send_json(send, 500, json.dumps({"error": UNEXPECTED_ERROR}).encode())
        await response(scope, receive, send)

    async def _check_form(self, headers: Headers, reader: BodyReader, rule: UploadRule) -> FormData:
        """The parsed form, once it holds what ``rule`` asks for (the caller closes it), or
        :class:`Rejected` saying what is wrong."""
        hint = f"send multipart/form-data with the image file in field '{rule.field}'"
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            reader.keep = False
            await reader.read_all()
            if reader.size == 0:
                raise Rejected(400, f"empty request body: {hint}", "malformed_body")
            raise Rejected(415, f"unsupported Content-Type {content_type or '(none)'!r}: {hint}",
                           "unsupported_media_type")
        boundary = headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
        reader.marker = f"--{boundary}--".encode("latin-1", "replace") if boundary else b""
        first = await reader.next_chunk()
        plain = parse_plain_form(headers["content-type"], first, max_files=rule.max_files) if reader.done else None
        try:
            form = plain if plain is not None else await MultiPartParser(
                headers, _chain(first, reader.stream()), max_files=rule.max_files, max_fields=8).parse()
        except MultiPartException as exc:
            if reader.size == 0:
                raise Rejected(400, f"empty request body: {hint}", "malformed_body") from None
            if exc.message.startswith("Too many files"):
                if rule.max_files == 1:
                    raise Rejected(400, f"more than one file: this endpoint takes one in field '{rule.field}' "
                                        f"(use /classify_batch with field 'images' for several)", "too_many_files") from None
                raise Rejected(413, f"more than {rule.max_files} files: the limit of one request", "too_many_files") from None
            raise Rejected(400, f"malformed multipart body ({exc.message}): {hint}", "malformed_body") from None
        except (Rejected, ClientGone):
            raise
        except Exception as exc:  # python-multipart raises its own errors on some garbage
            raise Rejected(400, f"malformed multipart body ({type(exc).__name__}): {hint}", "malformed_body") from None
        try:
            if reader.size == 0:
                raise Rejected(400, f"empty request body: {hint}", "malformed_body")
            values = form.getlist(rule.field)
            if not values:
                if not reader.seen:
                    raise Rejected(400, f"truncated multipart body (no closing boundary): {hint}", "malformed_body")
                raise Rejected(400, f"missing multipart field '{rule.field}': {hint}", "missing_field")
            unexpected = [n for n in dict.fromkeys(form.keys()) if n != rule.field]
            if unexpected:
                raise Rejected(400, f"unexpected multipart field(s) {', '.join(map(repr, unexpected))}: {hint}",
                               "malformed_body")
            if any(not isinstance(v, UploadFile) for v in values):
                raise Rejected(400, f"field '{rule.field}' must be a file upload (with a filename), not a text value",
                               "malformed_body")
            for value in values:
                name = value.filename or ""
                if len(name.encode("utf-8", "replace")) > MAX_FILENAME_BYTES or "\0" in name:
                    raise Rejected(400, f"{rule.field}: file name over {MAX_FILENAME_BYTES} bytes or with a NUL "
                                        f"character", "bad_filename")
                if value.size is not None and value.size > self.max_file_bytes:
                    raise Rejected(413, f"{rule.field}: file {name[:80]!r} of {value.size} bytes is over the "
                                        f"limit of {self.max_file_bytes} bytes", "image_too_large")
        except BaseException:
            await form.close()
            raise
        return form

    async def _refuse(self, scope: Scope, send: Send, reader: BodyReader, exc: Rejected, headers: Headers) -> None:
        """Answer ``exc``: first read and drop the rest of the body (at most as much again as
        the limit), so that a client still sending it reads the answer instead of a reset."""
        self.on_reject(exc.reason)
        complete = reader.done
        most = 2 * reader.limit  # read at most as much again as the limit, in all
        declared = _content_length(headers)
        waits_for_continue = headers.get("expect", "").lower() == "100-continue" and reader.size == 0
        if not complete and exc.status != 408 and not waits_for_continue and (declared or 0) <= most:
            complete = await reader.drain(most - reader.size)
        body = json.dumps({"error": str(exc)}).encode()
        await _send_json(send, exc.status, body, close=not complete)

    # --- /metadata and the other routes ---------------------------------------------------

    async def _json_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An API without arguments: any body must be empty or a JSON object (ignored); the
        API then gets an empty body, so BentoML has nothing to fail on."""
        if scope["method"] == "POST":
            headers = Headers(scope=scope)
            reader = BodyReader(receive, limit=JSON_API_MAX_BODY, budget=self.budget)
            try:
                try:
                    declared = _content_length(headers)
                    if declared is not None and declared > JSON_API_MAX_BODY:
                        raise Rejected(413, f"request body of {declared} bytes is over the limit of "
                                            f"{JSON_API_MAX_BODY} bytes", "body_too_large")
                    await reader.read_all()
                    _check_json_object(headers, b"".join(reader.chunks))
                except Rejected as exc:
                    return await self._refuse(scope, send, reader, exc, headers)
                except ClientGone:
                    return
            finally:
                reader.close()
        bare = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length",
                                                                 b"transfer-encoding")]
        empty = BodyReader(receive, limit=0, budget=self.budget)
        empty.done = True
        await self.app({**scope, "method": "POST", "headers": bare}, empty.replay(receive), send)

    def _json_errors(self, send: Send) -> Send:
        """``send`` for the routes BentoML answers itself: its plain-text 404 and 405 become JSON."""
        held: Message | None = None

        async def wrapped(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                held = message
                return
            if held is None:
                return await send(message)
            if message.get("more_body", False):
                return
            status = held["status"]
            self.on_reject("not_found" if status == 404 else "method_not_allowed")
            extra = [(k, v) for k, v in held.get("headers", []) if k.lower() == b"allow"]
            allowed = b", ".join(v for _, v in extra).decode("latin-1")
            text = "no such endpoint" if status == 404 else f"method not allowed here (allowed: {allowed or 'none'})"
            held, start = None, held
            await _send_json(send, start["status"], json.dumps({"error": text}).encode(), extra_headers=extra)

        return wrapped


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first``, then ``rest``: a body stream whose first piece has already been read."""
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _check_json_object(headers: Headers, body: bytes) -> None:
    if not body.strip():
        return
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Rejected(415, f"unsupported Content-Type {content_type or '(none)'!r}: this endpoint takes no "
                            f"arguments (send no body, or a JSON object)", "unsupported_media_type")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(400, "the body is not valid JSON: this endpoint takes no arguments (send no body, or {})",
                       "malformed_body") from None
    if not isinstance(value, dict):
        raise Rejected(400, "the body must be a JSON object: this endpoint takes no arguments (send no body, or {})",
                       "malformed_body")


async def _send_json(send: Send, status: int, body: bytes, *, close: bool = False,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
