"""Model registry. Importing this package registers every model."""
from .registry import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, create_model,
                       get_spec, list_models, register_model, resolve_module)
from . import cifar_cnn, timm_models  # noqa: F401  (registration side effects)

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model", "resolve_module",
           "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
