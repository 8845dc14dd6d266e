"""Running under ``torchrun``: DistributedDataParallel training, with rank 0 alone writing.

Shaped after torchvision's ``references/classification`` (``utils.init_distributed_mode``):
torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each process takes the CUDA device
``cuda:LOCAL_RANK`` (NCCL) or runs on the CPU (gloo). What this module adds for a product:

- one rule for who writes: rank 0 alone checks and writes the run directory, prunes, exports
  and measures (:func:`main_process_only`); the other ranks wait, then take rank 0's manifest
  and read the files it wrote (so ``RUN_DIR`` must be on a filesystem every node sees);
- no rank is left waiting on one that failed: after every rank-0-only section all ranks
  compare notes (:func:`settle`), the rank that failed raises its error (one line on stderr)
  and the others exit with the same code, quietly; every collective has a timeout
  (``COMPRESS_DIST_TIMEOUT`` seconds, default 3600: the others wait that long for rank 0's
  export and latency measurements at most);
- samplers that shard the training set (padded to equal lengths, as DDP needs every rank to
  run the same number of steps) and the validation set (not padded, so accuracy summed over
  ranks counts every image exactly once).

Without torchrun (or with one process) every function here is a no-op and the single-process
code paths run unchanged."""
from __future__ import annotations

import atexit
import datetime
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from .errors import UsageError

T = TypeVar("T")
TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # nccl | gloo; None in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world: World | None = None  # set by setup()
_control: Any = None  # a gloo group for the coordination messages (None: the default group is gloo)
_inside_main_only = False


def launched() -> bool:
    """Started by torchrun (or a similar launcher) with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def world() -> World:
    """The set-up world, or what the launcher's environment says before :func:`setup`."""
    if _world is not None:
        return _world
    return World(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0),
                 local_world_size=_env_int("LOCAL_WORLD_SIZE", 1))


def active() -> bool:
    """More than one process and the process group is up: collectives are needed. False inside
    a rank-0-only section, where rank 0 works as a single process would (whole validation set,
    no DDP) while the others wait."""
    return _world is not None and _world.world_size > 1 and dist.is_initialized() and not _inside_main_only


def is_main() -> bool:
    return world().is_main


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def local_device(device: torch.device) -> torch.device:
    """``cuda`` means this process's own GPU under torchrun: ``cuda:LOCAL_RANK``."""
    if device.type != "cuda" or not launched():
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(f"LOCAL_RANK {local_rank} but this node has {count} CUDA device(s): "
                         f"use --nproc_per_node {count} or fewer")
    return torch.device("cuda", local_rank)


def setup(device: torch.device) -> World:
    """Join the process group torchrun prepared: NCCL for a CUDA device, gloo for the CPU.
    Once per process; a no-op without torchrun."""
    global _world, _control
    if _world is not None:
        return _world
    if not launched():
        _world = World()
        return _world
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout(), device_id=device if device.type == "cuda" else None)
    if backend != "gloo":  # long waits for rank 0 and pickled messages go over gloo, on the CPU
        _control = dist.new_group(backend="gloo", timeout=timeout())
    _world = World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0),
                   local_world_size=_env_int("LOCAL_WORLD_SIZE", 1), backend=backend)
    atexit.register(_teardown)
    return _world


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def describe(batch_size: int) -> dict[str, Any]:
    """What the manifest records about a training stage's processes and batch sizes."""
    w = world() if active() else World()
    return {"world_size": w.world_size, "backend": w.backend, "batch_size_per_rank": batch_size,
            "global_batch_size": batch_size * w.world_size}


# --- coordination -------------------------------------------------------------------------------
class PeerFailed(SystemExit):
    """Another rank failed and said so: leave with its exit code, without a message of our own
    (the failing rank printed the one line)."""


def _exit_code(error: BaseException) -> int:
    if isinstance(error, UsageError):
        return 2
    if isinstance(error, SystemExit) and isinstance(error.code, int):
        return error.code
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def settle(error: BaseException | None) -> None:
    """Every rank says how its part went; if one failed, all stop: the failing rank raises its
    error and the others raise :class:`PeerFailed`. Also a barrier. Single process: raise ``error``."""
    if not active():
        if error is not None:
            raise error
        return
    codes: list[int | None] = [None] * _world.world_size  # type: ignore[union-attr]
    dist.all_gather_object(codes, None if error is None else _exit_code(error), group=_control)
    if error is not None:
        raise error
    failed = [code for code in codes if code is not None]
    if failed:
        raise PeerFailed(failed[0])


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=_control)
    return holder[0]


def run_on_main(action: Callable[[], T]) -> T | None:
    """``action()`` on rank 0 while the others wait; its error stops every rank. Returns its
    result on rank 0 and None elsewhere."""
    if not active():
        return action()
    result, error = None, None
    if is_main():
        try:
            result = action()
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            error = exc
    settle(error)
    return result


def run_local_main_first(action: Callable[[], T]) -> T:
    """``action()`` on each node's first process, then on the others: a download into the
    node's cache happens once, the others find the file."""
    if not active():
        return action()
    first = _world.local_rank == 0  # type: ignore[union-attr]
    result: Any = None
    for turn in (True, False):
        error = None
        if first == turn:
            try:
                result = action()
            except BaseException as exc:  # noqa: BLE001
                error = exc
        settle(error)
    return result


def usage_error_everywhere(message: str) -> NoReturn:
    """Raise a usage error that every rank meets at the same point (their manifests agree):
    rank 0 prints it, the others exit with the same code quietly, instead of N copies."""
    settle(UsageError(message) if is_main() else None)
    raise UsageError(message)  # single process (settle raised already under torchrun)


def main_process_only(stage: Callable[..., T]) -> Callable[..., T]:
    """Decorate a stage ``stage(run, ...)`` that rank 0 alone performs (it writes files and the
    manifest). Under torchrun the other ranks wait for it, then take rank 0's manifest and return
    value, so every rank goes on with the same bookkeeping; an error on rank 0 stops them all."""

    @functools.wraps(stage)
    def wrapper(run: Any, *args: Any, **kwargs: Any) -> T:
        if not active():  # single process, or nested in another such stage
            return stage(run, *args, **kwargs)

        def on_main() -> T:
            global _inside_main_only
            _inside_main_only = True
            try:
                return stage(run, *args, **kwargs)
            finally:
                _inside_main_only = False

        result = run_on_main(on_main)
        result, run.manifest = broadcast_object((result, run.manifest))
        return result  # type: ignore[return-value]

    return wrapper


# --- training -----------------------------------------------------------------------------------
def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (which registers the parameters that require grad
    now: wrap again when that set changes, e.g. after head-only epochs)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums over ranks (counts stay exact in float64)."""
    if not active():
        return list(values)
    if _world.backend == "nccl" and device.type != "cuda":  # type: ignore[union-attr]
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP syncs them at the
    start of each forward, so after an epoch each rank holds its own last update."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def epoch_seed(seed: int, epoch: int) -> int:
    """Augmentation draws of one rank in one epoch: different on every rank, the same after a resume."""
    w = world()
    return seed + 1_000_003 * (epoch * w.world_size + w.rank + 1)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a sharding sampler which epoch starts (its shuffle is seeded by it)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# --- samplers -----------------------------------------------------------------------------------
def shard(order: torch.Tensor, rank: int, world_size: int, *, pad: bool) -> torch.Tensor:
    """This rank's part of ``order``: every ``world_size``-th item from ``rank``. ``pad`` repeats
    items from the start so every rank gets the same count (training); else the shards are
    disjoint and cover ``order`` exactly once (evaluation)."""
    if pad and len(order) % world_size:
        extra = world_size - len(order) % world_size
        order = torch.cat([order, order.repeat(math.ceil(extra / max(len(order), 1)))[:extra]])
    return order[rank::world_size]


class ShardSampler(Sampler[int]):
    """Evaluation: indices ``rank, rank + world_size, ...`` in order, no padding (unlike
    ``DistributedSampler``, whose duplicated samples would be counted twice)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DistributedWeightedSampler(Sampler[int]):
    """Class-balanced draws (with replacement, by ``weights``) shared out between ranks: every
    rank draws the same epoch-seeded sequence and keeps its shard."""

    def __init__(self, weights: torch.Tensor, rank: int, world_size: int, seed: int = 0) -> None:
        self.weights = weights.double()
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.per_rank = math.ceil(len(weights) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def shard_samplers(train_size: int, val_size: int, *, rank: int, world_size: int, seed: int,
                   weights: torch.Tensor | None = None) -> tuple[Sampler[int], Sampler[int]]:
    """Training sampler (shuffled, or class-balanced with ``weights``) and evaluation sampler of one rank."""
    train: Sampler[int]
    if weights is not None:
        train = DistributedWeightedSampler(weights, rank, world_size, seed=seed)
    else:
        train = DistributedSampler(range(train_size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return train, ShardSampler(val_size, rank, world_size)
