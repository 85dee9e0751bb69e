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

from transformers import (
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    Data2VecVisionPreTrainedModel,
)

from ..modeling_utils import make_compressed_config_class
from .base import build_family

CLASSIC_BLOCK_LINEARS = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


CompressedData2VecVisionConfig = make_compressed_config_class(
    Data2VecVisionConfig, "vitcompress_data2vec_vision", __name__
)
DATA2VEC_VISION_FAMILY = build_family(
    __name__,
    CompressedData2VecVisionConfig,
    {Data2VecVisionModel: "AutoModel", Data2VecVisionForImageClassification: "AutoModelForImageClassification"},
    name="data2vec_vision",
    base_model_type="data2vec-vision",
    pretrained_class=Data2VecVisionPreTrainedModel,
    backbone_attr="data2vec_vision",
    linear_groups=CLASSIC_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.attention.{query,key,value}: the self-attention reads its input only so
    block_path="encoder.layer",
    methods=("activation_aware",),
)
CompressedData2VecVisionModel, CompressedData2VecVisionForImageClassification = (
    DATA2VEC_VISION_FAMILY.compressed_classes.values()
)
