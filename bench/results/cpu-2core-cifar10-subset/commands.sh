#!/bin/bash
# How bench/results/cpu-2core-cifar10-subset was made (2-core CPU, 2026-11-23).
cd "$(dirname "$0")/../../.."  # the repository root
# the subset: first 1000 train / 300 test images per class of ../shared/datasets/cifar10-jpg.tar.xz
mkdir -p /tmp/cifar && tar xJf ../shared/datasets/cifar10-jpg.tar.xz -C /tmp/cifar
for split in train test; do
  n=$([ $split = train ] && echo 1000 || echo 300)
  for c in $(ls /tmp/cifar/train); do
    mkdir -p /tmp/c10sub/$split/$c
    ls /tmp/cifar/$split/$c | sort | head -$n | while read f; do ln -sf /tmp/cifar/$split/$c/$f /tmp/c10sub/$split/$c/$f; done
  done
done
COMMON="--data /tmp/c10sub --arch resnet20 --batch-size 128 --data-on-device on --prune-steps 3 --target-macs 0.4 --retrain-epochs 6 --latency-batch 32"
.venv/bin/compress run --out /tmp/exp/c10-global $COMMON --epochs 30 --scope global
.venv/bin/compress run --out /tmp/exp/c10-block $COMMON --model /tmp/exp/c10-global/steps/step_00/model.pt --scope block
.venv/bin/compress run --out /tmp/exp/c10-global-kd $COMMON --model /tmp/exp/c10-global/steps/step_00/model.pt --scope global --distill-weight 0.5
