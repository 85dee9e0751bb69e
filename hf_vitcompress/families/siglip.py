"""SigLIP vision family: ``SiglipVisionModel`` (transformers 5.x names).

The same encoder layer as CLIP's (``encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``,
tanh-GELU), with all three methods (see :mod:`.clip`). The attention-pooling head
(``head``: an ``nn.MultiheadAttention`` and an MLP) stays dense: its ``nn.MultiheadAttention`` packs
q/k/v in one ``in_proj_weight``, which no method here factorizes; ``target_modules`` may still name
``head.mlp.fc1`` / ``fc2``. SigLIP 2 (NaFlex inputs with ``spatial_shapes``) is not handled.

A full ``SiglipModel`` (``SIGLIP_FAMILY``) has its image tower (``vision_model``, a ``SiglipVisionModel``)
compressed as above and its text tower kept, so zero-shot classification still runs
(:func:`hf_vitcompress.compress.compress_image_tower`).
"""

from __future__ import annotations

from transformers import SiglipConfig, SiglipModel, SiglipPreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from ..modeling_utils import make_compressed_config_class
from .base import build_family
from .clip import SELF_ATTENTION_BLOCK_LINEARS

CompressedSiglipVisionConfig = make_compressed_config_class(
    SiglipVisionConfig, "vitcompress_siglip_vision_model", __name__
)
SIGLIP_VISION_FAMILY = build_family(
    __name__,
    CompressedSiglipVisionConfig,
    {SiglipVisionModel: "AutoModel"},
    name="siglip_vision",
    base_model_type="siglip_vision_model",
    pretrained_class=SiglipPreTrainedModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    shared_input_groups=(0,),  # self_attn.{q,k,v}_proj: SiglipAttention reads its input only through them
    block_path="encoder.layers",
)
(CompressedSiglipVisionModel,) = SIGLIP_VISION_FAMILY.compressed_classes.values()

CompressedSiglipConfig = make_compressed_config_class(SiglipConfig, "vitcompress_siglip", __name__)
SIGLIP_FAMILY = build_family(
    __name__,
    CompressedSiglipConfig,
    {SiglipModel: "AutoModel"},
    name="siglip",
    base_model_type="siglip",
    pretrained_class=SiglipModel,
    backbone_attr="vision_model",
    linear_groups=SELF_ATTENTION_BLOCK_LINEARS,
    block_path="encoder.layers",
    image_tower=lambda model: model.vision_model,  # a SiglipVisionModel already
    image_tower_parts=(("vision_model", ""),),
)
(CompressedSiglipModel,) = SIGLIP_FAMILY.compressed_classes.values()
