"""Model family adapters. One file per family; ``FAMILIES`` is the registry."""

from __future__ import annotations

from torch import nn

from .base import FamilyAdapter
from .beit import BEIT_FAMILY
from .clip import CLIP_FAMILY, CLIP_VISION_FAMILY
from .data2vec_vision import DATA2VEC_VISION_FAMILY
from .deit import DEIT_FAMILY
from .dinov2 import DINOV2_FAMILY, DINOV2_WITH_REGISTERS_FAMILY
from .siglip import SIGLIP_FAMILY, SIGLIP_VISION_FAMILY
from .swin import SWIN_FAMILY
from .swinv2 import SWINV2_FAMILY
from .vit import VIT_FAMILY

FAMILIES: tuple[FamilyAdapter, ...] = (
    VIT_FAMILY,
    DEIT_FAMILY,
    DINOV2_FAMILY,
    DINOV2_WITH_REGISTERS_FAMILY,
    CLIP_FAMILY,  # before the vision towers' families, which would take any CLIP / SigLIP model
    SIGLIP_FAMILY,
    CLIP_VISION_FAMILY,
    SIGLIP_VISION_FAMILY,
    BEIT_FAMILY,
    DATA2VEC_VISION_FAMILY,
    SWIN_FAMILY,
    SWINV2_FAMILY,
)


def family_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model``, or a clear error listing what is supported."""
    for family in FAMILIES:
        if family.handles(model):
            return family
    names = ", ".join(cls.__name__ for family in FAMILIES for cls in family.compressed_classes)
    raise TypeError(
        f"hf_vitcompress has no adapter for {type(model).__name__}. Supported models: {names}. "
        "Other families (timm, SigLIP 2) need an adapter in hf_vitcompress/families/."
    )


__all__ = ["FAMILIES", "FamilyAdapter", "family_for"]
