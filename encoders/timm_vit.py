"""Former home of the timm adapter, kept so `from mmsae.encoders.timm_vit import TimmEncoder` still works."""

from mmsae.encoders.timm import TimmEncoder, imagenet_class_names

__all__ = ["TimmEncoder", "imagenet_class_names"]
