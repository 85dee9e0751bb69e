"""SigLIP vision family: ``SiglipVisionModel`` (transformers 5.x names).

The same encoder layer as CLIP's (``encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``,
tanh-GELU), ``activation_aware`` and ``head_factorization``, not ``pruning`` (see :mod:`.clip`). The attention-pooling head
(``head``: an ``nn.MultiheadAttention`` and an MLP) stays dense: its ``nn.MultiheadAttention`` packs
q/k/v in one ``in_proj_weight``, which no method here factorizes; ``target_modules`` may still name
``head.mlp.fc1`` / ``fc2``. SigLIP 2 (NaFlex inputs with ``spatial_shapes``) is not handled.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import SiglipPreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter
from .clip import FACTORIZATION_ONLY, SELF_ATTENTION_BLOCK_LINEARS


@strict
class CompressedSiglipVisionConfig(CompressedConfigMixin, SiglipVisionConfig):
    """``SiglipVisionConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_siglip_vision_model"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedSiglipVisionModel = make_compressed_model_class(SiglipVisionModel, CompressedSiglipVisionConfig, __name__)
register_family_classes(CompressedSiglipVisionConfig, {"AutoModel": CompressedSiglipVisionModel})

SIGLIP_VISION_FAMILY = FamilyAdapter(
    name="siglip_vision",
    base_model_type="siglip_vision_model",
    pretrained_class=SiglipPreTrainedModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    compressed_classes={SiglipVisionModel: CompressedSiglipVisionModel},
    shared_input_groups=(0,),  # self_attn.{q,k,v}_proj: SiglipAttention reads its input only through them
    config_class=CompressedSiglipVisionConfig,
    block_path="encoder.layers",  # vision_model.encoder.layers in ...WithProjection (backbone_attr)
    methods=FACTORIZATION_ONLY,
)
