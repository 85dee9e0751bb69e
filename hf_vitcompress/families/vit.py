"""ViT family: ``ViTModel`` / ``ViTForImageClassification`` (transformers 5.x module names).

Blocks live at ``vit.layers`` (``layers`` on the bare ``ViTModel``); each block has
``attention.{q,k,v,o}_proj`` and ``mlp.fc1`` / ``mlp.fc2``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig, ViTForImageClassification, ViTModel, ViTPreTrainedModel

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter

TRANSFORMER_BLOCK_LINEARS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.o_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)


@strict
class CompressedViTConfig(CompressedConfigMixin, ViTConfig):
    """``ViTConfig`` plus what compression asked for and decided; its own ``model_type`` so that a
    transformers without the plugin refuses the checkpoint instead of building a dense ViT."""

    model_type = "vitcompress_vit"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedViTModel = make_compressed_model_class(ViTModel, CompressedViTConfig, __name__)
CompressedViTForImageClassification = make_compressed_model_class(
    ViTForImageClassification, CompressedViTConfig, __name__
)
_AUTO_CLASSES = {
    "AutoModel": CompressedViTModel,
    "AutoModelForImageClassification": CompressedViTForImageClassification,
}
register_family_classes(CompressedViTConfig, _AUTO_CLASSES)

VIT_FAMILY = FamilyAdapter(
    name="vit",
    base_model_type="vit",
    pretrained_class=ViTPreTrainedModel,
    backbone_attr="vit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    compressed_classes={ViTModel: CompressedViTModel, ViTForImageClassification: CompressedViTForImageClassification},
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: ViTAttention reads its input only through them
    config_class=CompressedViTConfig,
)
