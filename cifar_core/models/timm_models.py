"""timm backbones, registered with the input size, normalization and Grad-CAM layer they need.

The input sizes here are the ImageNet ones (the original challenge upsampled CIFAR to 224);
CIFAR-sized variants are registered beside them as they are measured.
"""
from __future__ import annotations

from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register_model
from .pretrained import timm_pretrained

TIMM_MODELS = [
    ModelSpec("resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, cam_layer="layer4",
              description="ResNet-50 (timm), ImageNet input size"),
    ModelSpec("efficientnet_b0", 224, IMAGENET_MEAN, IMAGENET_STD, cam_layer="conv_head",
              description="EfficientNet-B0 (timm), ImageNet input size"),
    ModelSpec("tf_efficientnet_lite0", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cam_layer="conv_head",
              description="EfficientNet-Lite0 (TF port in timm), ImageNet input size"),
    ModelSpec("vit_tiny_patch16_224", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cam_layer="blocks.-1.norm1",
              reshape="vit", description="ViT-Tiny/16 (timm, augreg weights use mean=std=0.5)"),
]


def _register(spec: ModelSpec):
    @register_model(spec)
    def build(num_classes: int = 10, pretrained=False, **kwargs):
        import timm
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **kwargs)
        if pretrained:
            timm_pretrained(model, spec.name, source=pretrained)
        return model
    return build


for _spec in TIMM_MODELS:
    _register(_spec)
