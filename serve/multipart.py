"""A fast path for the plainly framed multipart bodies that HTTP clients send.

Starlette's ``MultiPartParser`` (python-multipart underneath: a callback per header, per
piece of data, an async generator) costs about 0.1 ms of CPU for a one-file form with a
32x32 JPEG on the 2-core development machine: as much as decoding the image. Nearly every
upload is the same plain shape (httpx, requests, curl, BentoML's client)::

    --BOUNDARY\\r\\n
    Content-Disposition: form-data; name="image"; filename="cat.jpg"\\r\\n
    Content-Type: image/jpeg\\r\\n
    \\r\\n
    <bytes>\\r\\n
    --BOUNDARY--\\r\\n

:func:`parse_plain_form` reads exactly that shape, whole bodies that arrived in one piece,
into the same ``FormData`` Starlette would build (same names, file names, part headers and
contents, files in ``SpooledTemporaryFile``s), and answers ``None`` for anything else
(quoting, escapes, text fields, odd spacing, an early closing boundary, more files than
allowed, ...), which then goes through Starlette's parser and its error messages as before.
``tests/test_serve_cost.py`` checks it against Starlette's parser on client-made and edge-case
bodies."""
from __future__ import annotations

import re
from tempfile import SpooledTemporaryFile

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartParser, _user_safe_decode  # decodes names as Starlette's parser does

MAX_PLAIN_BODY = 1024 * 1024
"""Larger bodies go to Starlette's parser (whose files then spill to disk as before)."""
_CONTENT_TYPE = re.compile(r"multipart/form-data; boundary=([0-9A-Za-z'()+_,\-./:=?]{1,70})")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+): ([^\s][^\r\n]*[^\s]|[^\s])")
_DISPOSITION = re.compile(rb'form-data; name="([^"\\;\r\n\x00]*)"; filename="([^"\\;\r\n\x00]*)"')


def parse_plain_form(content_type: str, body: bytes, *, max_files: int) -> FormData | None:
    """The files of a plainly framed ``multipart/form-data`` ``body`` (see the module
    docstring), or ``None`` when it is not that shape (the caller then uses Starlette's
    parser). Every part must be a file; at most ``max_files`` of them."""
    match = _CONTENT_TYPE.fullmatch(content_type)
    if match is None or len(body) > MAX_PLAIN_BODY:
        return None
    boundary = match.group(1).encode("ascii")
    opening, delimiter = b"--" + boundary + b"\r\n", b"\r\n--" + boundary + b"\r\n"
    closing = b"\r\n--" + boundary + b"--"
    if not body.startswith(opening):
        return None
    end = len(body) - len(closing) - (2 if body.endswith(b"\r\n") else 0)
    if end < len(opening) or body[end:end + len(closing)] != closing:
        return None
    inner = body[len(opening):end]
    parts = inner.split(delimiter)
    # every other "\r\n--boundary" would be a boundary python-multipart reads differently
    if inner.count(b"\r\n--" + boundary) != len(parts) - 1 or body.count(closing) != 1 or len(parts) > max_files:
        return None
    items: list[tuple[str, str | UploadFile]] = []
    for part in parts:
        head, separator, data = part.partition(b"\r\n\r\n")
        if not separator:
            return None
        headers: list[tuple[bytes, bytes]] = []
        disposition = None
        for line in head.split(b"\r\n"):
            header = _HEADER.fullmatch(line)
            if header is None:
                return None
            name, value = header.group(1).lower(), header.group(2)
            headers.append((name, value))
            if name == b"content-disposition":
                disposition = value
        fields = _DISPOSITION.fullmatch(disposition) if disposition is not None else None
        if fields is None:
            return None
        file = SpooledTemporaryFile(max_size=MultiPartParser.spool_max_size)
        file.write(data)
        file.seek(0)
        upload = UploadFile(file=file, size=len(data), filename=_user_safe_decode(fields.group(2), "utf-8"),  # type: ignore[arg-type]
                            headers=Headers(raw=headers))
        items.append((_user_safe_decode(fields.group(1), "utf-8"), upload))
    return FormData(items)
