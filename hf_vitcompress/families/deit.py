"""DeiT family: ``DeiTModel`` / ``DeiTForImageClassification`` / ``...WithTeacher``.

Same block layout as ViT (``deit.layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``); the
distilled variant carries a second (distillation) token, which changes nothing here.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    DeiTPreTrainedModel,
)

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter
from .vit import TRANSFORMER_BLOCK_LINEARS


@strict
class CompressedDeiTConfig(CompressedConfigMixin, DeiTConfig):
    """``DeiTConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_deit"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedDeiTModel = make_compressed_model_class(DeiTModel, CompressedDeiTConfig, __name__)
CompressedDeiTForImageClassification = make_compressed_model_class(
    DeiTForImageClassification, CompressedDeiTConfig, __name__
)
CompressedDeiTForImageClassificationWithTeacher = make_compressed_model_class(
    DeiTForImageClassificationWithTeacher, CompressedDeiTConfig, __name__
)
# Every distilled checkpoint (``facebook/deit-*-distilled-*``) is a ``...WithTeacher``. As transformers does for ``deit``
# (its image-classification mapping lists both classes), both are registered for AutoModelForImageClassification
# and transformers builds the one named in the checkpoint's ``architectures`` (the plain classifier when none
# matches), so a compressed distilled model reloads with its two heads, also from checkpoints of earlier releases.
_AUTO_CLASSES = {
    "AutoModel": CompressedDeiTModel,
    "AutoModelForImageClassification": (
        CompressedDeiTForImageClassification,
        CompressedDeiTForImageClassificationWithTeacher,
    ),
}
register_family_classes(CompressedDeiTConfig, _AUTO_CLASSES)

DEIT_FAMILY = FamilyAdapter(
    name="deit",
    base_model_type="deit",
    pretrained_class=DeiTPreTrainedModel,
    backbone_attr="deit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    compressed_classes={
        DeiTModel: CompressedDeiTModel,
        DeiTForImageClassification: CompressedDeiTForImageClassification,
        DeiTForImageClassificationWithTeacher: CompressedDeiTForImageClassificationWithTeacher,
    },
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: ViTAttention reads its input only through them
    config_class=CompressedDeiTConfig,
)
