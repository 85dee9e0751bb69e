"""CLIP vision family: ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (transformers 5.x names).

Blocks live at ``encoder.layers`` (``vision_model.encoder.layers`` in ``...WithProjection``); each block has
``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1`` / ``mlp.fc2`` (quick-GELU), between pre-LayerNorms.
All three methods handle it: ``head_factorization`` makes the ``self_attn`` with its ``out_proj`` one
head-factorized attention, and ``pruning`` removes heads, value dims and MLP neurons from ``self_attn`` and ``mlp``
(and whole blocks) as in ViT. The projection of ``...WithProjection`` (``visual_projection``) stays dense.

A full ``CLIPModel`` (``CLIP_FAMILY``) has its image tower compressed: ``vision_model`` with ``visual_projection``
is compressed as one ``CLIPVisionModelWithProjection`` (calibrated on images alone, measured on the image
embeddings), and the result, a ``CompressedCLIPModel``, still runs zero-shot classification and retrieval with
the text tower as it was (:func:`hf_vitcompress.compress.compress_image_tower`).
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPPreTrainedModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from ..modeling_utils import make_compressed_config_class
from .base import build_family

# CLIP's and SigLIP's encoder layer (and BERT-style encoders with self_attn / out_proj names)
SELF_ATTENTION_BLOCK_LINEARS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)


CompressedCLIPVisionConfig = make_compressed_config_class(CLIPVisionConfig, "vitcompress_clip_vision_model", __name__)
CLIP_VISION_FAMILY = build_family(
    __name__,
    CompressedCLIPVisionConfig,
    # transformers maps clip_vision_model to CLIPVisionModel only: ...WithProjection loads through its own class.
    {CLIPVisionModel: "AutoModel", CLIPVisionModelWithProjection: None},
    name="clip_vision",
    base_model_type="clip_vision_model",
    pretrained_class=CLIPPreTrainedModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    shared_input_groups=(0,),  # self_attn.{q,k,v}_proj: CLIPAttention reads its input only through them
    block_path="encoder.layers",  # vision_model.encoder.layers in ...WithProjection (backbone_attr)
)
CompressedCLIPVisionModel, CompressedCLIPVisionModelWithProjection = CLIP_VISION_FAMILY.compressed_classes.values()


def clip_image_tower(model: CLIPModel) -> CLIPVisionModelWithProjection:
    """The image tower of a ``CLIPModel`` as a ``CLIPVisionModelWithProjection`` made of the model's own
    ``vision_model`` and ``visual_projection`` (its ``image_embeds`` are ``get_image_features``)."""
    with torch.device("meta"):  # only the shell: both children are the model's
        tower = CLIPVisionModelWithProjection(model.config.vision_config)
    tower.vision_model, tower.visual_projection = model.vision_model, model.visual_projection
    tower.name_or_path = model.name_or_path
    return tower


CompressedCLIPConfig = make_compressed_config_class(CLIPConfig, "vitcompress_clip", __name__)
CLIP_FAMILY = build_family(
    __name__,
    CompressedCLIPConfig,
    {CLIPModel: "AutoModel"},
    name="clip",
    base_model_type="clip",
    pretrained_class=CLIPModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    block_path="encoder.layers",
    image_tower=clip_image_tower,
    image_tower_parts=(("vision_model", "vision_model"), ("visual_projection", "visual_projection")),
)
(CompressedCLIPModel,) = CLIP_FAMILY.compressed_classes.values()
