"""``bench serve``: closed-loop HTTP load against the classification service.

Closed loop: each of C workers sends its next request only when its previous one has been
answered, so C is the number of requests in flight and the service is never flooded beyond
it (open-loop generators measure their own queue instead). Each concurrency level is bounded
by a request count and a duration; requests still in flight at the deadline are awaited (up
to the per-request timeout) and counted. Latency is measured per request on the client, from
sending to the last byte of the answer; errors are counted by HTTP status code, and failed
connections by the name of aiohttp's or asyncio's exception (``ClientConnectorError``,
``ServerDisconnectedError``, ``TimeoutError``, ...).

The client is kept cheap because it usually shares the machine with the service it measures:
aiohttp (one keep-alive connection per worker) posting a multipart body encoded once per image
before the sweep, so nothing is encoded per request. On a 2-core machine this cut the client's
CPU per request from about 2.6 ms (httpx encoding ``files=`` on every request) to about 0.4 ms,
CPU the service under test gets back."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import mimetypes
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import httpx

from compress.errors import UsageError

from compress.runtime.machine import load_average, machine_info
from compress.runtime.timing import Timer, summarize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGES = 2000


@dataclass(frozen=True)
class Payload:
    """One file to upload, held in memory so disk reads are not timed."""

    name: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class Upload:
    """A payload encoded once as a complete multipart/form-data request body (one file part in
    field ``field``); httpx does the encoding, aiohttp sends the bytes."""

    body: bytes
    headers: dict[str, str]

    @classmethod
    def of(cls, payload: Payload | Sequence[Payload], field: str) -> Upload:
        """One file, or several files in the same field (``/classify_batch``'s ``images``)."""
        payloads = [payload] if isinstance(payload, Payload) else list(payload)
        files = [(field, (p.name, p.data, p.content_type)) for p in payloads]
        request = httpx.Request("POST", "http://localhost/", files=files)
        return cls(request.read(), {"Content-Type": request.headers["Content-Type"]})


def group_payloads(payloads: Sequence[Payload], per_request: int) -> list[list[Payload]]:
    """The images of each request when every request carries ``per_request`` files: taken in
    turn, wrapping around, so every request has exactly that many (as many groups as needed to
    use every image once, at least one)."""
    if per_request < 1:
        raise ValueError("per_request must be >= 1")
    groups = max(1, -(-len(payloads) // per_request))
    return [[payloads[(g * per_request + i) % len(payloads)] for i in range(per_request)] for g in range(groups)]


def is_loopback(host: str) -> bool:
    """True when ``host`` is this machine: a loopback address, ``localhost``, or a name that
    resolves only to loopback addresses."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_target(url: str, endpoint: str, *, allow_remote: bool = False) -> str:
    """The full URL to POST to; a usage error for a malformed URL, or for one that leaves this
    machine without ``allow_remote`` (a load test is not something to point at others by accident)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad URL '{url}': expected http://HOST:PORT, e.g. http://127.0.0.1:3000")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise UsageError(f"bad URL '{url}': the port is not a number in 0-65535") from None
    if parts.query or parts.fragment:
        raise UsageError(f"bad URL '{url}': give the base URL without ?query or #fragment (use --endpoint for the path)")
    if not allow_remote and not is_loopback(parts.hostname):
        raise UsageError(f"{parts.hostname} is not this machine; bench serve targets localhost unless --allow-remote is given")
    if not endpoint.startswith("/"):
        endpoint = "/" + endpoint
    return url.rstrip("/") + endpoint


def load_images(source: Path) -> list[Payload]:
    """Image files under ``source`` (recursively, sorted; at most ``MAX_IMAGES``), or the one
    file ``source`` names."""
    source = Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
    else:
        raise UsageError(f"--images {source}: no such file or folder")
    if not files:
        raise UsageError(f"--images {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return [Payload(p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream") for p in files]


@dataclass
class _Level:
    """Mutable state shared by the workers of one concurrency level."""

    limit: int
    deadline: float
    issued: int = 0
    parsed: int = 0  # successful answers read for their "model" field (the first few only)


_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError)  # refused/reset, timeouts, protocol errors


def _session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    """Up to ``concurrency`` kept-alive connections; ``timeout`` seconds for each whole request
    (connecting, sending, reading the answer). No cookies: every request is the same."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=timeout), cookie_jar=aiohttp.DummyCookieJar())


async def _worker(session: aiohttp.ClientSession, url: str, uploads: Sequence[Upload], state: _Level,
                  records: list[tuple[float, str]], models: Counter, timer: Timer) -> None:
    while state.issued < state.limit and timer() < state.deadline:
        upload = uploads[state.issued % len(uploads)]
        state.issued += 1
        start = timer()
        try:
            async with session.post(url, data=upload.body, headers=upload.headers) as response:
                body = await response.read()
            status, outcome = response.status, str(response.status)
        except _FAILURES as exc:
            status, outcome = 0, type(exc).__name__  # asyncio's timeout is the builtin TimeoutError on Python 3.11+
        records.append((timer() - start, outcome))
        if 200 <= status < 300 and state.parsed < 5:
            state.parsed += 1
            try:
                answer = json.loads(body)
            except ValueError:
                continue
            if isinstance(answer, list) and answer:  # /classify_batch answers one entry per image
                answer = answer[0]
            if isinstance(answer, dict) and "model" in answer:
                models[str(answer["model"])] += 1


async def _level(url: str, uploads: Sequence[Upload], concurrency: int, *, requests: int, duration: float,
                 timeout: float, warmup: int, timer: Timer,
                 server_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    async with _session(concurrency, timeout) as session:
        models: Counter = Counter()
        if warmup:
            state = _Level(warmup, timer() + max(duration, timeout))
            await asyncio.gather(*(_worker(session, url, uploads, state, [], models, timer)
                                   for _ in range(min(concurrency, warmup))))
        records: list[tuple[float, str]] = []
        server = server_cpu() if server_cpu else None
        cpu, started = time.process_time(), timer()
        state = _Level(requests, started + duration)
        await asyncio.gather(*(_worker(session, url, uploads, state, records, models, timer)
                               for _ in range(concurrency)))
        elapsed, cpu = timer() - started, time.process_time() - cpu
        server = server_cpu() - server if server_cpu and server is not None else None
    extra = {} if server is None else {"server_cpu_s": server,
                                       "server_cpu_ms_per_request": 1000 * server / len(records) if records else None}
    return summarize_level(concurrency, records, elapsed, stopped_by="requests" if len(records) >= requests else "duration",
                           client_cpu_s=cpu, models=sorted(models), **extra)


def summarize_level(concurrency: int, records: Sequence[tuple[float, str]], elapsed: float, **extra: Any) -> dict[str, Any]:
    """Counts, rates and latency percentiles of one level. ``latency`` covers successful (2xx)
    answers only, so fast error pages cannot flatter it; ``latency_all`` covers every request."""
    outcomes = Counter(outcome for _, outcome in records)
    ok = [seconds for seconds, outcome in records if outcome.startswith("2") and outcome.isdigit()]
    errors = len(records) - len(ok)
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "error_rate": errors / len(records) if records else 0.0,
        "by_status": dict(sorted((k, v) for k, v in outcomes.items() if k.isdigit())),
        "connection_errors": dict(sorted((k, v) for k, v in outcomes.items() if not k.isdigit())),
        "elapsed_s": elapsed,
        "requests_per_s": len(records) / elapsed if elapsed > 0 else 0.0,
        "ok_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "latency": summarize(ok, 1).to_dict() if ok else None,
        "latency_all": summarize([s for s, _ in records], 1).to_dict() if records else None,
        **extra,
    }


async def _preflight(url: str, upload: Upload, timeout: float) -> None:
    """One request before the sweep: if nothing answers at all, say so (a usage error) instead
    of reporting a sweep made only of connection errors."""
    async with _session(1, timeout) as session:
        try:
            async with session.post(url, data=upload.body, headers=upload.headers) as response:
                await response.read()
        except _FAILURES as exc:
            raise UsageError(f"nothing answers at {url} ({type(exc).__name__}: {exc}); is the service running?") from None


def run_sweep(url: str, payloads: Sequence[Payload], concurrency: Sequence[int], *, requests: int, duration: float,
              timeout: float = 30.0, field: str = "image", warmup: int | None = None, timer: Timer = time.perf_counter,
              preflight: bool = True, server_cpu: Callable[[], float] | None = None,
              files_per_request: int = 1, gpu_monitor: Any = None) -> dict[str, Any]:
    """Every concurrency level in turn; returns the results document (``kind: bench-serve``).
    ``warmup`` untimed requests precede each level (default: one per worker, so connections
    are open and the service has seen the batch shape before timing). Each request body is
    encoded as multipart once, here, not per request; with ``files_per_request`` > 1 every
    request carries that many files in ``field`` (``/classify_batch``), and each level also
    reports images/s. With ``gpu_monitor`` (:class:`bench.gpu_monitor.GpuMonitor`) each level
    also gets the GPU utilisation sampled while it ran."""
    uploads = [Upload.of(group, field) for group in group_payloads(payloads, files_per_request)]
    if preflight:
        asyncio.run(_preflight(url, uploads[0], timeout))
    started = time.time()
    machine = machine_info()
    levels = []
    for level in concurrency:
        level_started = time.time()
        levels.append(asyncio.run(_level(url, uploads, level, requests=requests, duration=duration, timeout=timeout,
                                         warmup=level if warmup is None else warmup, timer=timer,
                                         server_cpu=server_cpu)))
        levels[-1]["images_per_s"] = levels[-1]["ok_per_s"] * files_per_request
        if gpu_monitor is not None:  # the window includes the level's warm-up requests
            levels[-1]["gpu"] = gpu_monitor.window(level_started, time.time())
    return {
        "kind": "bench-serve",
        "url": url,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "settings": {"concurrency": list(concurrency), "requests": requests, "duration": duration, "timeout": timeout,
                     "field": field, "files_per_request": files_per_request,
                     "warmup": "one per worker" if warmup is None else warmup,
                     "client": f"aiohttp {aiohttp.__version__}"},
        "images": {"count": len(payloads), "bytes": sum(len(p.data) for p in payloads),
                   "per_request": files_per_request},
        "machine": machine,
        "load_average_end": load_average(),
        "client_on_same_machine": is_loopback(urlsplit(url).hostname or ""),
        "levels": levels,
    }
