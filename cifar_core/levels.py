"""The challenge's levels as named recipes: `python train.py --level N` trains exactly these.

A level is a TrainConfig plus the checkpoint folder it writes. Levels land with their issues;
asking for one that has not landed yet is a clear error, never a silent default.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .engine import TrainConfig


@dataclass(frozen=True)
class Level:
    number: int
    title: str
    config: TrainConfig
    out: str  # checkpoint folder


LEVELS: dict[int, Level] = {
    3: Level(3, "our CIFAR CNN from scratch (whitening stem, lookahead, label smoothing, flip+translate TTA)",
             TrainConfig(model="cifar_cnn", epochs=10, batch_size=1024, tta=2), "checkpoints/cifar_cnn"),
    # A distillation config: train.py runs the pipeline (student + from-scratch twin under `out`,
    # ONNX/int8 exports, benchmark tables) rather than one training run.
    5: Level(5, "production: the ensemble distilled into cifar_cnn_small, ONNX + int8 exports, latency tables",
             TrainConfig(model="cifar_cnn_small", epochs=8, batch_size=1024, tta=2, distill_alpha=0.7,
                         distill_temperature=4.0), "runs/distill"),
}

PLANNED = {1: "transfer-learning baseline", 2: "augmentation + regularization study",
           4: "ensemble"}


def get_level(number: int) -> Level:
    if number in LEVELS:
        return LEVELS[number]
    if number in PLANNED:
        raise KeyError(f"level {number} ({PLANNED[number]}) has no recipe yet; available: {sorted(LEVELS)}")
    raise KeyError(f"there is no level {number}; the challenge has levels 1-5 (available now: {sorted(LEVELS)})")


def level_config(number: int, **overrides) -> TrainConfig:
    return replace(get_level(number).config, **overrides)
