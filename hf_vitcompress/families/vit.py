"""ViT family: ``ViTModel`` / ``ViTForImageClassification`` (transformers 5.x module names).

Blocks live at ``vit.layers`` (``layers`` on the bare ``ViTModel``); each block has
``attention.{q,k,v,o}_proj`` and ``mlp.fc1`` / ``mlp.fc2``.
"""

from __future__ import annotations

from transformers import ViTConfig, ViTForImageClassification, ViTModel, ViTPreTrainedModel

from ..modeling_utils import make_compressed_config_class
from .base import build_family

TRANSFORMER_BLOCK_LINEARS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.o_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)


CompressedViTConfig = make_compressed_config_class(ViTConfig, "vitcompress_vit", __name__)
VIT_FAMILY = build_family(
    __name__,
    CompressedViTConfig,
    {ViTModel: "AutoModel", ViTForImageClassification: "AutoModelForImageClassification"},
    name="vit",
    base_model_type="vit",
    pretrained_class=ViTPreTrainedModel,
    backbone_attr="vit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: ViTAttention reads its input only through them
)
CompressedViTModel, CompressedViTForImageClassification = VIT_FAMILY.compressed_classes.values()
