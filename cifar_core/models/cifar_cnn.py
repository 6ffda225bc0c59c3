"""Our CIFAR CNN: a patch-whitening stem and three conv groups, built for fast CPU training.

Design choices (each public knowledge from the CIFAR speed-run literature):
- A frozen 2x2 patch-whitening first layer, initialized from the training images' patch
  covariance: the network starts from decorrelated inputs and learns faster.
- Conv weights start as identity (dirac) on the channels they can: early training behaves
  like a shallower net, which suits short schedules.
- BatchNorm with a fixed scale (only the shift learns): the conv weights are then scale-
  invariant, so a large learning rate plus weight decay acts as an adaptive step size.
- The logits are scaled down (1/9) so the large learning rate does not blow up the head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import CIFAR_MEAN, CIFAR_STD, ModelSpec, register_model


class FixedScaleBatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FixedScaleBatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = FixedScaleBatchNorm(c_out)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class CifarCNN(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), logit_scale: float = 1 / 9):
        super().__init__()
        whiten_width = 2 * 3 * 2 * 2  # +/- each eigenvector of the 12-dim 2x2x3 patch space
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        chans = [whiten_width, *widths]
        self.layers = nn.Sequential(*[ConvGroup(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        self._init_identity()

    def _init_identity(self):
        # Default init elsewhere; the first c_in output channels of each conv pass their input through.
        for m in self.layers.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels >= m.in_channels:
                nn.init.dirac_(m.weight.data[:m.in_channels])

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening stem from normalized training images (N x 3 x 32 x 32)."""
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H', W', 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * 2 * 2).double()  # rows: (c, h, w)
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        filters = eigvecs.T.reshape(12, 3, 2, 2)  # out, c, h, w
        filters = filters / torch.sqrt(eigvals + eps).view(-1, 1, 1, 1)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())
        self.whiten.bias.zero_()

    def stem_bias_trains(self) -> bool:
        return self.whiten.bias.requires_grad

    def freeze_stem_bias(self) -> None:
        """Stop training the stem's bias: nothing before layer 1 then needs a gradient, so backward
        skips the first conv's input gradient, the widest map of the net."""
        self.whiten.bias.requires_grad_(False)

    def features(self, x):
        return self.layers(self.act(self.whiten(x)))

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.head(x) * self.logit_scale


def _register(name: str, widths: tuple, description: str):
    @register_model(ModelSpec(
        name=name, input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, cam_layer="layers.-1",
        family="custom", description=description, kwargs={"widths": list(widths)}))
    def build(num_classes: int = 10, pretrained=False, widths=widths, **kw):
        if pretrained:
            raise ValueError(f"{name} is trained from scratch; it has no pretrained weights")
        return CifarCNN(num_classes=num_classes, widths=tuple(widths), **kw)
    return build


_register("cifar_cnn", (64, 256, 256), "our CIFAR CNN: whitening stem + 3 conv groups (64/256/256)")
_register("cifar_cnn_small", (32, 64, 128), "a narrow cifar_cnn (32/64/128) for edge and quick tests")
