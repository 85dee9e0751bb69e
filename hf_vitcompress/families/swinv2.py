"""Swin-v2 family: ``Swinv2Model`` / ``Swinv2ForImageClassification`` / ``Swinv2Backbone``.

Swin's stages (see :mod:`.swin`), but transformers 5.24 writes Swin-v2 with the classic module names
(``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and
its attention is cosine attention: the scores are cosines of the per-head query and key, times a learned
per-head scale, plus a position bias computed by a small MLP (``continuous_position_bias_mlp``, left dense).

``activation_aware`` handles it (shared q/k/v included), with the patch merging ``reduction`` as one more
target. ``head_factorization`` does not apply: it factorizes the products ``W_Qᵀ W_K`` of dot-product scores,
and cosine scores normalize the query and the key separately, so they are not a function of that product.
``pruning`` is refused as for Swin. With several linears named ``dense`` per block, ``target_modules`` should
name modules by dotted suffix (``intermediate.dense``) rather than by role.
"""

from __future__ import annotations

from transformers import (
    Swinv2Backbone,
    Swinv2Config,
    Swinv2ForImageClassification,
    Swinv2Model,
    Swinv2PreTrainedModel,
)

from ..modeling_utils import make_compressed_config_class
from .base import build_family

SWINV2_BLOCK_LINEARS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)

CompressedSwinv2Config = make_compressed_config_class(Swinv2Config, "vitcompress_swinv2", __name__)

SWINV2_FAMILY = build_family(
    __name__,
    CompressedSwinv2Config,
    {
        Swinv2Model: "AutoModel",
        Swinv2ForImageClassification: "AutoModelForImageClassification",
        Swinv2Backbone: "AutoBackbone",
    },
    name="swinv2",
    base_model_type="swinv2",
    pretrained_class=Swinv2PreTrainedModel,
    backbone_attr="swinv2",
    linear_groups=SWINV2_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.self.{query,key,value}: the self-attention reads its input only so
    block_path="encoder.layers.*.blocks",
    extra_linear_paths=("encoder.layers.*.downsample.reduction",),
    methods=("activation_aware",),
)
CompressedSwinv2Model, CompressedSwinv2ForImageClassification, CompressedSwinv2Backbone = (
    SWINV2_FAMILY.compressed_classes.values()
)
