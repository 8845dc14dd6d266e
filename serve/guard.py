"""ASGI middleware that vets requests to the image endpoints before BentoML parses them.

Measured with BentoML 1.4.39: a multipart body without a boundary, a garbled one, a part
without Content-Disposition, the image sent as a text field (BentoML then fetches it as a
URL) or an unexpected file field all end in 500 "unexpected error". This middleware reads
the body (up to a size limit: 413 above it, before anything is parsed), parses the
multipart form with the same parser BentoML uses, and answers every malformed request
with a 4xx JSON ``{"error": "..."}``; only well-formed requests reach the API, whose own
errors (undecodable images) are 4xx as well. It also lets ``GET /metadata`` reach the
POST-only BentoML API of the same name."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class UploadRule:
    """What one endpoint accepts: files in ``field``, at most ``max_files`` of them."""

    field: str
    max_files: int

    def max_body(self, max_file_bytes: int) -> int:
        """The largest body: every file at its limit plus room for part headers."""
        return self.max_files * (max_file_bytes + 4096) + 65536


class Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UploadGuard:
    def __init__(self, app: ASGIApp, *, rules: Mapping[str, UploadRule], max_file_bytes: int,
                 get_as_post: tuple[str, ...] = ()) -> None:
        self.app = app
        self.rules = dict(rules)
        self.max_file_bytes = max_file_bytes
        self.get_as_post = get_as_post

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if path in self.get_as_post and scope["method"] == "GET":
            return await self.app({**scope, "method": "POST"}, receive, send)
        rule = self.rules.get(path)
        if rule is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive, rule.max_body(self.max_file_bytes))
            if body is None:
                return  # the client went away
            await self._check_form(Headers(scope=scope), body, rule)
        except Rejected as exc:
            response = JSONResponse({"error": str(exc)}, status_code=exc.status,
                                    headers={"connection": "close"} if exc.status == 413 else None)
            return await response(scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Rejected(413, f"request body of {length} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Rejected(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, headers: Headers, body: bytes, rule: UploadRule) -> None:
        hint = f"send multipart/form-data with the image file in field '{rule.field}'"
        if not body:
            raise Rejected(400, f"empty request body: {hint}")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            raise Rejected(415, f"unsupported Content-Type {content_type or '(none)'!r}: {hint}")

        async def stream() -> Any:
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_files=float("inf")).parse()
        except MultiPartException as exc:
            raise Rejected(400, f"malformed multipart body ({exc.message}): {hint}") from None
        except Exception as exc:  # python-multipart raises its own errors on some garbage
            raise Rejected(400, f"malformed multipart body ({type(exc).__name__}): {hint}") from None
        try:
            values = form.getlist(rule.field)
            if not values:
                if not _closed(headers, body):
                    raise Rejected(400, f"truncated multipart body (no closing boundary): {hint}")
                raise Rejected(400, f"missing multipart field '{rule.field}': {hint}")
            unexpected = [n for n in dict.fromkeys(form.keys()) if n != rule.field]
            if unexpected:
                raise Rejected(400, f"unexpected multipart field(s) {', '.join(map(repr, unexpected))}: {hint}")
            if any(not isinstance(v, UploadFile) for v in values):
                raise Rejected(400, f"field '{rule.field}' must be a file upload (with a filename), not a text value")
            if len(values) > rule.max_files:
                if rule.max_files == 1:
                    raise Rejected(400, f"{len(values)} files in field '{rule.field}': this endpoint takes one "
                                        f"(use /classify_batch with field 'images' for several)")
                raise Rejected(413, f"{len(values)} files in field '{rule.field}', over the limit of {rule.max_files}")
            for value in values:
                if value.size is not None and value.size > self.max_file_bytes:
                    raise Rejected(413, f"{rule.field}: file {value.filename!r} of {value.size} bytes is over the "
                                        f"limit of {self.max_file_bytes} bytes")
        finally:
            await form.close()


def _closed(headers: Headers, body: bytes) -> bool:
    """Whether the body holds the multipart close delimiter (``--boundary--``)."""
    boundary = headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    return bool(boundary) and f"--{boundary}--".encode("latin-1", "replace") in body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body to the app, then the real channel
    (so the app still sees a client disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
