"""CLIP vision family: ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (transformers 5.x names).

Blocks live at ``encoder.layers`` (``vision_model.encoder.layers`` in ``...WithProjection``); each block has
``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1`` / ``mlp.fc2`` (quick-GELU), between pre-LayerNorms.
``activation_aware`` and ``head_factorization`` handle it (the ``self_attn`` with its ``out_proj`` becomes a
head-factorized attention); ``pruning`` is written for ViT's ``attention`` / ``mlp`` block layout and refuses this
family with a clear error (``FamilyAdapter.methods``). The vision tower inside a full ``CLIPModel`` is not
handled yet (its forward needs text inputs too): compress a ``CLIPVisionModel`` loaded from the same checkpoint.
The projection of ``...WithProjection`` (``visual_projection``) stays dense.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPPreTrainedModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter

# CLIP's and SigLIP's encoder layer (and BERT-style encoders with self_attn / out_proj names)
SELF_ATTENTION_BLOCK_LINEARS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)
FACTORIZATION_ONLY = ("activation_aware", "head_factorization")  # pruning needs ViT's attention/mlp names


@strict
class CompressedCLIPVisionConfig(CompressedConfigMixin, CLIPVisionConfig):
    """``CLIPVisionConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_clip_vision_model"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedCLIPVisionModel = make_compressed_model_class(CLIPVisionModel, CompressedCLIPVisionConfig, __name__)
CompressedCLIPVisionModelWithProjection = make_compressed_model_class(
    CLIPVisionModelWithProjection, CompressedCLIPVisionConfig, __name__
)
# transformers maps clip_vision_model to CLIPVisionModel only: ...WithProjection loads through its own class.
register_family_classes(CompressedCLIPVisionConfig, {"AutoModel": CompressedCLIPVisionModel})

CLIP_VISION_FAMILY = FamilyAdapter(
    name="clip_vision",
    base_model_type="clip_vision_model",
    pretrained_class=CLIPPreTrainedModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    compressed_classes={
        CLIPVisionModel: CompressedCLIPVisionModel,
        CLIPVisionModelWithProjection: CompressedCLIPVisionModelWithProjection,
    },
    shared_input_groups=(0,),  # self_attn.{q,k,v}_proj: CLIPAttention reads its input only through them
    config_class=CompressedCLIPVisionConfig,
    block_path="encoder.layers",  # vision_model.encoder.layers in ...WithProjection (backbone_attr)
    methods=FACTORIZATION_ONLY,
)
