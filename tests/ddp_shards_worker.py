"""Started by tests/test_ddp.py under `torchrun --nproc_per_node 2`: each rank builds the
loaders a run trains with (DataLoaders, class-balanced sampler, --data-on-device loaders), says
which samples it was given, and evaluates a constant model; rank 0 writes what every rank saw
to the JSON file named by argv[2]. Usage: ddp_shards_worker.py DATA OUT.json"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from compress import distributed
from compress.data import Augmentation, load_data, make_loaders
from compress.device_data import device_loaders
from compress.training import evaluate


class ConstantModel(nn.Module):
    """Always predicts class 0."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), self.classes)
        logits[:, 0] = 1.0
        return logits


def main() -> None:
    data, out = sys.argv[1], sys.argv[2]
    cpu = torch.device("cpu")
    world = distributed.setup(cpu)
    bundle = load_data(data, augment=Augmentation(), input_size=16, seed=0)
    shards = {"rank": world.rank, "world_size": world.world_size}
    seen: dict[str, object] = {"rank": world.rank, "world_size": world.world_size, "backend": world.backend}
    for balance in ("none", "sampler"):
        train, val = make_loaders(bundle, batch_size=4, balance=balance, seed=0, workers=0, **shards)
        epochs = []
        for epoch in (0, 1):
            distributed.set_epoch(train, epoch)
            epochs.append(list(train.sampler))
        seen[f"train_{balance}"] = epochs
        seen[f"train_{balance}_batches"] = len(train)
        seen["val"] = list(val.sampler)
    device_train, device_val = device_loaders(bundle, Augmentation(), cpu, batch_size=4, balance="none", seed=0,
                                              workers=0, **shards)
    seen["device_train"] = device_train._order().tolist()
    seen["device_train_batches"] = len(device_train)
    seen["device_val"] = device_val._order().tolist()
    model = ConstantModel(len(bundle.classes))
    seen["accuracy"] = evaluate(model, val, cpu)
    seen["device_accuracy"] = evaluate(model, device_val, cpu)
    everyone: list[object] = [None] * world.world_size
    dist.all_gather_object(everyone, seen)
    if world.is_main:
        with open(out, "w") as handle:
            json.dump({"ranks": everyone, "train": len(bundle.train_labels), "val_labels": bundle.val_labels}, handle)


if __name__ == "__main__":
    main()
