"""``make image``: a container image of the service with its models packed inside.

BentoML's own route, as a user would take it by hand: the chosen steps are registered into a
private model store, ``bentoml build`` packs the service with them (``SERVE_MODELS`` resolved
and baked in, see ``serve/service.py``), ``bentoml containerize`` builds the image with BuildKit
(Debian's ``/usr/bin/docker`` with ``DOCKER_BUILDKIT=1``: the first ``docker`` on some PATHs has
no BuildKit builder) on the host network. The user's own model store and Bento store are not
touched, and ``docker run IMAGE`` serves without any store mounted.

The repository's ``bentofile.yaml`` is the one description of the service; each variant is
that file with a few fields set (:func:`variant_bentofile`):

- ``gpu``: as written there, ONNX Runtime with CUDA and cuDNN from pip wheels (no CUDA base
  image: the host needs only the NVIDIA driver and container toolkit);
- ``cpu``: plain ``onnxruntime`` instead, so no CUDA wheels (and never torch, which nothing in
  the service imports);
- both: ``docker.base_image`` (``resnet-classifier-base:bookworm`` from ``make base-image`` by
  default) and ``docker.dockerfile_template`` (``deploy/Dockerfile.template``). With those two,
  BentoML renders its plain base template, which installs no system packages: its Debian
  templates would add build-essential and git (hundreds of MB that serving never uses).

BentoML pins itself in the Bento's requirements (``bentoml==`` the version that builds), so the
image runs the BentoML of this checkout's environment; bentofile.yaml therefore lists no
bentoml pin of its own (two pins disagreed as soon as the environment moved on)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE = "resnet-classifier"
DEFAULT_BASE_IMAGE = "resnet-classifier-base:bookworm"
DOCKERFILE_TEMPLATE = "deploy/Dockerfile.template"
VARIANTS = ("cpu", "gpu")
VARIANT_ENVS = {"cpu": {"SERVE_PROVIDER": "cpu"}, "gpu": {}}
"""Baked into each variant: a CPU image has no CUDA provider to try (and warn about)."""
GPU_RUNTIME = "onnxruntime-gpu"
CPU_RUNTIME = "onnxruntime"
DOCKER = "/usr/bin/docker"
"""Debian's docker CLI: it builds with BuildKit itself (``DOCKER_BUILDKIT=1``), no buildx plugin needed."""


class ImageError(RuntimeError):
    """The image cannot be built as asked; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """One step of one run to pack (``step=None``: the run's recommended step)."""

    run: Path
    step: int | None = None


def parse_sources(spec: str, step: int | None = None) -> list[ModelSource]:
    """``RUN`` of ``make image``: ``DIR``, ``DIR:STEP``, or several comma-separated for an
    ensemble; ``STEP`` applies to a single ``DIR`` given without one."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ImageError("RUN is empty: give a run directory (RUN=runs/digits), DIR:STEP, or several for an ensemble")
    if step is not None and len(parts) > 1:
        raise ImageError("STEP applies to one run; for an ensemble give each member as DIR:STEP in RUN")
    sources = []
    for part in parts:
        path, _, explicit = part.rpartition(":") if ":" in part else (part, "", "")
        if explicit and not explicit.isdigit():
            raise ImageError(f"RUN entry {part!r}: the step after ':' must be a number")
        chosen = int(explicit) if explicit else step
        run = Path(path or part)
        if not (run / "manifest.json").is_file():
            raise ImageError(f"{run}: not a run directory (no manifest.json); make one with `compress run`")
        sources.append(ModelSource(run, chosen))
    return sources


def _runtime_name(requirement: str) -> str:
    """``onnxruntime-gpu[cuda,cudnn]==1.2`` -> ``onnxruntime-gpu``."""
    for stop in "[=<>~! ;":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()


def variant_bentofile(bentofile: dict[str, Any], variant: str, base_image: str,
                      envs: dict[str, str] | None = None) -> dict[str, Any]:
    """``bentofile`` (the parsed bentofile.yaml) for one image variant: the ONNX Runtime
    package for that variant, the base image, the project's Dockerfile template, and extra
    environment (``envs``) baked into the image."""
    if variant not in VARIANTS:
        raise ImageError(f"VARIANT={variant!r} must be one of {', '.join(VARIANTS)}")
    packages = list(bentofile["python"]["packages"])
    runtime = [p for p in packages if _runtime_name(p) == GPU_RUNTIME]
    if len(runtime) != 1:
        raise ImageError(f"bentofile.yaml must list {GPU_RUNTIME} once among python.packages (found {runtime})")
    if any(_runtime_name(p) == "bentoml" for p in packages):
        raise ImageError("bentofile.yaml pins bentoml: remove it (BentoML pins the version that builds the Bento)")
    if variant == "cpu":
        version = runtime[0].split("==", 1)[1] if "==" in runtime[0] else ""
        packages[packages.index(runtime[0])] = f"{CPU_RUNTIME}=={version}" if version else CPU_RUNTIME
    docker = {key: value for key, value in bentofile.get("docker", {}).items()
              if key not in ("distro", "python_version", "cuda_version", "system_packages")}  # ignored with a base image
    docker.update(base_image=base_image, dockerfile_template=DOCKERFILE_TEMPLATE)
    out = {**bentofile, "python": {**bentofile["python"], "packages": packages}, "docker": docker}
    out["labels"] = {**bentofile.get("labels", {}), "variant": variant}
    envs = {**(VARIANT_ENVS[variant]), **(envs or {})}
    if envs:
        out["envs"] = [*bentofile.get("envs", []), *({"name": k, "value": v} for k, v in envs.items())]
    return out


def _run(command: Sequence[str], env: dict[str, str], what: str, cwd: Path = REPO) -> str:
    result = subprocess.run(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"{what} failed (exit {result.returncode}):\n{result.stdout[-4000:]}")
    return result.stdout


def build_env(home: Path) -> dict[str, str]:
    """The environment of the ``bentoml`` commands: the private store, BuildKit, Debian's docker first."""
    path = os.pathsep.join([str(Path(sys.executable).parent), str(Path(DOCKER).parent), os.environ.get("PATH", "")])
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "DOCKER_BUILDKIT": "1",
            "PATH": path}


def image_id(image: str) -> str | None:
    out = subprocess.run([DOCKER, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def drop_if_untagged(old_id: str | None, image: str) -> None:
    """The image ``image`` named before this build, once the name moved on and nothing else
    names it: rebuilds on a shared engine must not pile up untagged copies (gigabytes for the
    GPU variant). Docker refuses while a container uses it, which is fine."""
    if old_id and old_id != image_id(image):
        tags = subprocess.run([DOCKER, "image", "inspect", "--format", "{{len .RepoTags}}", old_id],
                              capture_output=True, text=True, check=False).stdout.strip()
        if tags == "0":
            subprocess.run([DOCKER, "image", "rm", old_id], capture_output=True, check=False)


def image_size(image: str) -> int:
    out = subprocess.run([DOCKER, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True,
                         check=False)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def build_image(sources: Sequence[ModelSource], *, variant: str, base_image: str = DEFAULT_BASE_IMAGE,
                image: str | None = None, voting: str | None = None, keep: Path | None = None) -> str:
    """Register, build and containerize; returns the image name (``resnet-classifier:VARIANT``)."""
    import yaml

    from compress.registry import register

    image = image or f"{IMAGE}:{variant}"
    if not Path(DOCKER).is_file():
        raise ImageError(f"{DOCKER} is missing: install Debian's docker.io (deploy/docker-engine.sh does)")
    if subprocess.run([DOCKER, "image", "inspect", base_image], capture_output=True, check=False).returncode != 0:
        raise ImageError(f"base image {base_image} is not in the local Docker engine: build it with `make base-image` "
                         f"or pass BASE_IMAGE=NAME (any image with Python 3.11 and pip)")
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    home = Path(tempfile.mkdtemp(prefix="resnet-image-")) if keep is None else keep
    try:
        tags = [register(source.run, step=source.step, bentoml_home=home) for source in sources]
        previous = image_id(image)
        envs = {"SERVE_VOTING": voting} if voting else None
        variant_file = home / "bentofile.yaml"
        variant_file.write_text(yaml.safe_dump(variant_bentofile(bentofile, variant, base_image, envs), sort_keys=False))
        env = {**build_env(home), "SERVE_MODELS": ",".join(tags)}
        out = _run([str(Path(sys.executable).with_name("bentoml")), "build", "-f", str(variant_file), "--output", "tag",
                    str(REPO)], env, "bentoml build")
        bento = out.strip().splitlines()[-1].removeprefix("__tag__:")
        # BentoML 1.4 reads the Bento's Dockerfile template from the build context it copies
        # into a temporary folder, and refuses it unless that folder is under the current
        # directory: so containerize runs in the private home, with its temporary folders there.
        scratch = home / "tmp"
        scratch.mkdir(exist_ok=True)
        _run([str(Path(sys.executable).with_name("bentoml")), "containerize", bento, "--backend", "docker",
              "--image-tag", image, "--opt", "network=host",
              "--opt", f"label=org.opencontainers.image.title={IMAGE}",
              "--opt", f"label=resnet-classifier.variant={variant}",
              "--opt", f"label=resnet-classifier.models={','.join(tags)}",
              "--opt", f"label=resnet-classifier.bento={bento}"],
             {**env, "TMPDIR": str(scratch)}, "bentoml containerize", cwd=home)
        drop_if_untagged(previous, image)
        return image
    finally:
        if keep is None:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make image", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory, DIR:STEP, or several comma-separated (ensemble)")
    parser.add_argument("--step", type=int, default=None, help="the step of a single run (default: recommended)")
    parser.add_argument("--variant", default="cpu", help="cpu or gpu")
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE)
    parser.add_argument("--image", default=None, help=f"image name (default {IMAGE}:VARIANT)")
    parser.add_argument("--voting", default=None, choices=("soft", "hard"), help="an ensemble's voting, baked in")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it (debugging)")
    args = parser.parse_args(argv)
    from compress.errors import UsageError

    started = time.monotonic()
    try:
        if args.variant not in VARIANTS:
            raise ImageError(f"VARIANT={args.variant!r} must be one of {', '.join(VARIANTS)}")
        image = build_image(parse_sources(args.run, args.step), variant=args.variant, base_image=args.base_image,
                            image=args.image, voting=args.voting, keep=args.keep)
    except (ImageError, UsageError) as exc:
        print(f"make image: {exc}", file=sys.stderr)
        return 2
    print(f"make image: built {image} ({image_size(image) / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
