"""``bench container IMAGE``: what an operator sees of the service's image, measured.

- size: the image and its largest layers (``docker history``);
- start: ``docker run`` as its two halves, ``docker create`` (the storage driver lays out the
  container's filesystem: a full copy of the image with vfs, next to nothing with overlay2) and
  ``docker start`` to the first 200 of ``/readyz`` (models loaded and warmed up), a few times,
  each container with a read-only root and only ``/tmp`` writable, as the Kubernetes manifests
  run it;
- drain: ``docker stop`` (SIGTERM) while requests are in flight (each has sent half its body
  when the signal goes, the rest after ``hold`` seconds): the seconds until the container has
  exited, its exit code, and whether every request in flight got its 200 answer.

The same helpers (:class:`Container`, :class:`SlowUpload`) drive the container tests
(tests/test_container.py). Containers use the host network (this kind of host runs dockerd with
no bridge) on a free port; traffic goes to 127.0.0.1 only, and every wait is bounded."""
from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DOCKER = "/usr/bin/docker"
"""Debian's docker CLI (the first ``docker`` on some PATHs is another build)."""


def docker_unavailable_reason() -> str | None:
    """Why no container can be run here, or None when a Docker engine answers."""
    if not Path(DOCKER).is_file():
        return f"{DOCKER} is missing (Debian's docker.io; deploy/docker-engine.sh installs and starts it)"
    try:
        result = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                                timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 20 s"
    if result.returncode != 0:
        return f"no Docker engine answers ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'docker info failed'}); start one with deploy/docker-engine.sh"
    return None


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Container:
    """One ``docker run -d`` of an image on the host network, serving on ``port``."""

    image: str
    port: int
    name: str
    started: float = field(default=0.0)
    create_s: float = field(default=0.0)

    @classmethod
    def run(cls, image: str, *, port: int | None = None, read_only: bool = True, env: dict[str, str] | None = None,
            options: tuple[str, ...] = ()) -> Container:
        port = port or free_port()
        container = cls(image, port, f"resnet-classifier-bench-{uuid.uuid4().hex[:10]}")
        flags = ["--read-only", "--tmpfs", "/tmp"] if read_only else []
        environment = [f"--env={key}={value}" for key, value in {"PORT": str(port), **(env or {})}.items()]
        creating = time.monotonic()
        docker("create", "--name", container.name, "--network", "host", *flags, *environment, *options, image,
               timeout=600)
        container.started = time.monotonic()
        container.create_s = container.started - creating
        docker("start", container.name)
        return container

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return docker("inspect", "--format", "{{.State.Running}}", self.name, check=False).strip() == "true"

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from ``docker start`` to the first 200 of /readyz; raises with the logs when
        the container exits or the time runs out."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            if not self.running():
                raise RuntimeError(f"{self.image} exited before it was ready:\n{self.logs()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.image} not ready after {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def exec(self, *command: str) -> str:
        return docker("exec", self.name, *command)

    def logs(self) -> str:
        result = subprocess.run([DOCKER, "logs", self.name], capture_output=True, text=True, timeout=30, check=False)
        return result.stdout + result.stderr

    def health(self) -> str:
        return docker("inspect", "--format", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", self.name).strip()

    def signal_stop(self, grace: int = 60) -> subprocess.Popen[bytes]:
        """``docker stop`` (SIGTERM, SIGKILL after ``grace`` s) in the background."""
        return subprocess.Popen([DOCKER, "stop", "-t", str(grace), self.name], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def exit_code(self) -> int:
        return int(docker("inspect", "--format", "{{.State.ExitCode}}", self.name).strip())

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


class SlowUpload:
    """A ``POST /classify`` whose body is sent in two halves: in flight from :meth:`start`
    until :meth:`finish` has sent the rest and read the answer (one connection, raw HTTP/1.1,
    so nothing buffers the body)."""

    BOUNDARY = "resnet-classifier-slow-upload"

    def __init__(self, port: int, image: bytes, filename: str = "image.png") -> None:
        head = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        self.body = head + image + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        self.port = port
        self.sock: socket.socket | None = None

    def start(self) -> SlowUpload:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        request = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                   f"Content-Type: multipart/form-data; boundary={self.BOUNDARY}\r\n"
                   f"Content-Length: {len(self.body)}\r\n\r\n").encode()
        self.sock.sendall(request + self.body[:len(self.body) // 2])
        return self

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        """Send the rest; (status, JSON answer), or (0, None) when the connection was dropped."""
        assert self.sock is not None, "start() first"
        try:
            self.sock.sendall(self.body[len(self.body) // 2:])
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return 0, None
                raw += chunk
            head, _, rest = raw.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            status = int(head.split(b" ", 2)[1])
            return status, json.loads(rest[:length]) if length else None
        except OSError:
            return 0, None
        finally:
            self.sock.close()


def drain(container: Container, image: bytes, *, in_flight: int = 4, hold: float = 2.0,
          grace: int = 60) -> dict[str, Any]:
    """SIGTERM with ``in_flight`` requests half sent; each sends the rest ``hold`` s later.
    Returns the answers, the seconds from SIGTERM to exit and the exit code."""
    uploads = [SlowUpload(container.port, image).start() for _ in range(in_flight)]
    time.sleep(0.2)  # the requests have reached the service
    stopping = time.monotonic()
    stopper = container.signal_stop(grace)
    time.sleep(hold)
    answers = [upload.finish() for upload in uploads]
    stopper.wait(timeout=grace + 30)
    seconds = time.monotonic() - stopping
    return {"in_flight": in_flight, "hold_s": hold, "stop_s": seconds, "exit_code": container.exit_code(),
            "statuses": [status for status, _ in answers], "answers": [answer for _, answer in answers]}


def _instruction(created_by: str) -> str:
    """A layer's instruction without the build arguments BuildKit prefixes to a RUN."""
    text = " ".join(created_by.split())
    if "/bin/sh -c " in text:
        text = "RUN " + text.split("/bin/sh -c ", 1)[1]
    return text[:160] or "(the base image)"


def image_facts(image: str, top: int = 4) -> dict[str, Any]:
    """The image's size and its largest layers, with the instruction that made each."""
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).strip())
    rows = docker("history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    layers = [{"bytes": int(bytes_), "created_by": _instruction(created)}
              for bytes_, _, created in (row.partition("\t") for row in rows.splitlines()) if bytes_.isdigit()]
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image) or "null") or {}
    return {"image": image, "bytes": size, "layers": sorted(layers, key=lambda layer: -layer["bytes"])[:top],
            "labels": {k: v for k, v in labels.items() if k.startswith("resnet-classifier.")}}


def measure(image: str, *, image_bytes: bytes, starts: int = 3, in_flight: int = 4, hold: float = 2.0) -> dict[str, Any]:
    """Size, ``starts`` times to ready, and one drain (see the module docstring)."""
    from compress.runtime.machine import load_average, machine_info

    create_s, start_s, idle_stop_s = [], [], []
    for _ in range(starts):
        container = Container.run(image)
        try:
            start_s.append(container.wait_ready())
            create_s.append(container.create_s)
            stopped = time.monotonic()
            container.signal_stop().wait(timeout=90)
            idle_stop_s.append(time.monotonic() - stopped)
        finally:
            container.remove()
    container = Container.run(image)
    try:
        container.wait_ready()
        drained = drain(container, image_bytes, in_flight=in_flight, hold=hold)
    finally:
        container.remove()
    drained.pop("answers")
    return {"kind": "bench-container", "facts": image_facts(image), "create_s": create_s, "start_to_ready_s": start_s,
            "idle_stop_s": idle_stop_s, "drain": drained, "machine": machine_info(), "load_average": load_average(),
            "docker": docker("version", "--format", "{{.Server.Version}}").strip(),
            "storage_driver": docker("info", "--format", "{{.Driver}}").strip()}


def report_markdown(doc: dict[str, Any]) -> str:
    facts, drained = doc["facts"], doc["drain"]
    starts = ", ".join(f"{s:.2f}" for s in doc["start_to_ready_s"])
    creates = ", ".join(f"{s:.2f}" for s in doc["create_s"])
    layers = "\n".join(f"| {layer['bytes'] / 1e6:,.1f} | `{layer['created_by'][:110]}` |" for layer in facts["layers"])
    answered = sum(1 for status in drained["statuses"] if status == 200)
    return (f"# bench container {facts['image']}\n\n"
            f"- image: {facts['bytes'] / 1e6:,.0f} MB ({doc['storage_driver']} storage, Docker {doc['docker']})\n"
            f"- `docker create` (read-only root, /tmp a tmpfs): {creates} s\n"
            f"- `docker start` to the first 200 of /readyz: {starts} s\n"
            f"- `docker stop` with nothing in flight: {', '.join(f'{s:.2f}' for s in doc['idle_stop_s'])} s\n"
            f"- `docker stop` with {drained['in_flight']} requests in flight (the rest of each body sent "
            f"{drained['hold_s']:.1f} s after SIGTERM): exited {drained['exit_code']} after {drained['stop_s']:.2f} s, "
            f"{answered}/{drained['in_flight']} answered 200\n"
            f"- load average before: {doc['load_average']}\n\n"
            f"| layer MB | made by |\n|---:|---|\n{layers}\n")


def write_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    from compress.rundir import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results": out_dir / "results.json", "report": out_dir / "report.md"}
    atomic_write_json(files["results"], doc)
    atomic_write_text(files["report"], report_markdown(doc))
    return files
