"""DeiT family: ``DeiTModel`` / ``DeiTForImageClassification`` / ``...WithTeacher``.

Same block layout as ViT (``deit.layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``); the
distilled variant carries a second (distillation) token, which changes nothing here.
"""

from __future__ import annotations

from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    DeiTPreTrainedModel,
)

from ..modeling_utils import make_compressed_config_class
from .base import build_family
from .vit import TRANSFORMER_BLOCK_LINEARS

CompressedDeiTConfig = make_compressed_config_class(DeiTConfig, "vitcompress_deit", __name__)
# Every distilled checkpoint (``facebook/deit-*-distilled-*``) is a ``...WithTeacher``. As transformers does for ``deit``
# (its image-classification mapping lists both classes), both are registered for AutoModelForImageClassification
# and transformers builds the one named in the checkpoint's ``architectures`` (the plain classifier when none
# matches), so a compressed distilled model reloads with its two heads, also from checkpoints of earlier releases.
DEIT_FAMILY = build_family(
    __name__,
    CompressedDeiTConfig,
    {
        DeiTModel: "AutoModel",
        DeiTForImageClassification: "AutoModelForImageClassification",
        DeiTForImageClassificationWithTeacher: "AutoModelForImageClassification",
    },
    name="deit",
    base_model_type="deit",
    pretrained_class=DeiTPreTrainedModel,
    backbone_attr="deit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: ViTAttention reads its input only through them
)
CompressedDeiTModel, CompressedDeiTForImageClassification, CompressedDeiTForImageClassificationWithTeacher = (
    DEIT_FAMILY.compressed_classes.values()
)
