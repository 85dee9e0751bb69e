"""BEiT family: ``BeitModel`` / ``BeitForImageClassification`` (transformers 5.x names). Data2Vec-vision is the
same architecture, but transformers 5.24 writes it with the classic module names: :mod:`.data2vec_vision`.

Same block layout as ViT (``beit.layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1`` / ``mlp.fc2``), with LayerScale
(``lambda_1`` / ``lambda_2``, kept as they are) and a relative position bias per layer that the block adds to the
attention scores through ``attention_mask`` (one ``[heads, tokens, tokens]`` table per layer), so a
head-factorized attention receives it like the dense one and keeps the rows of the heads it keeps.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig, BeitForImageClassification, BeitModel, BeitPreTrainedModel

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter
from .vit import TRANSFORMER_BLOCK_LINEARS


@strict
class CompressedBeitConfig(CompressedConfigMixin, BeitConfig):
    """``BeitConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_beit"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


CompressedBeitModel = make_compressed_model_class(BeitModel, CompressedBeitConfig, __name__)
CompressedBeitForImageClassification = make_compressed_model_class(
    BeitForImageClassification, CompressedBeitConfig, __name__
)
register_family_classes(
    CompressedBeitConfig,
    {"AutoModel": CompressedBeitModel, "AutoModelForImageClassification": CompressedBeitForImageClassification},
)

BEIT_FAMILY = FamilyAdapter(
    name="beit",
    base_model_type="beit",
    pretrained_class=BeitPreTrainedModel,
    backbone_attr="beit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    compressed_classes={
        BeitModel: CompressedBeitModel,
        BeitForImageClassification: CompressedBeitForImageClassification,
    },
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: BeitAttention reads its input only through them
    config_class=CompressedBeitConfig,
)
