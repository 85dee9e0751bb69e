"""Data2Vec-vision family: ``Data2VecVisionModel`` / ``Data2VecVisionForImageClassification``.

BEiT's architecture, but transformers 5.24 still writes it with the classic module names: blocks at
``encoder.layer`` (``data2vec_vision.encoder.layer`` in the classifier), ``attention.attention.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense`` and ``output.dense``, the relative position bias added inside
the self-attention. ``activation_aware`` handles it (with shared q/k/v); the head methods need the 5.x
``q_proj``/``k_proj``/``v_proj``/``o_proj`` attention and refuse it with a clear error (``FamilyAdapter.methods``).
With three linears named ``dense`` per block, ``target_modules`` should name modules by dotted suffix
(``intermediate.dense``) rather than by role.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    Data2VecVisionPreTrainedModel,
)

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter

CLASSIC_BLOCK_LINEARS = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


@strict
class CompressedData2VecVisionConfig(CompressedConfigMixin, Data2VecVisionConfig):
    """``Data2VecVisionConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_data2vec_vision"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedData2VecVisionModel = make_compressed_model_class(
    Data2VecVisionModel, CompressedData2VecVisionConfig, __name__
)
CompressedData2VecVisionForImageClassification = make_compressed_model_class(
    Data2VecVisionForImageClassification, CompressedData2VecVisionConfig, __name__
)
register_family_classes(
    CompressedData2VecVisionConfig,
    {
        "AutoModel": CompressedData2VecVisionModel,
        "AutoModelForImageClassification": CompressedData2VecVisionForImageClassification,
    },
)

DATA2VEC_VISION_FAMILY = FamilyAdapter(
    name="data2vec_vision",
    base_model_type="data2vec-vision",
    pretrained_class=Data2VecVisionPreTrainedModel,
    backbone_attr="data2vec_vision",
    linear_groups=CLASSIC_BLOCK_LINEARS,
    compressed_classes={
        Data2VecVisionModel: CompressedData2VecVisionModel,
        Data2VecVisionForImageClassification: CompressedData2VecVisionForImageClassification,
    },
    shared_input_groups=(0,),  # attention.attention.{query,key,value}: the self-attention reads its input only so
    config_class=CompressedData2VecVisionConfig,
    block_path="encoder.layer",
    methods=("activation_aware",),
)
