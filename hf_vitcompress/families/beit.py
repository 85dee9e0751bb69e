"""BEiT family: ``BeitModel`` / ``BeitForImageClassification`` (transformers 5.x names). Data2Vec-vision is the
same architecture, but transformers 5.24 writes it with the classic module names: :mod:`.data2vec_vision`.

Same block layout as ViT (``beit.layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1`` / ``mlp.fc2``), with LayerScale
(``lambda_1`` / ``lambda_2``, kept as they are) and a relative position bias per layer that the block adds to the
attention scores through ``attention_mask`` (one ``[heads, tokens, tokens]`` table per layer), so a
head-factorized attention receives it like the dense one and keeps the rows of the heads it keeps.
"""

from __future__ import annotations

from transformers import BeitConfig, BeitForImageClassification, BeitModel, BeitPreTrainedModel

from ..modeling_utils import make_compressed_config_class
from .base import build_family
from .vit import TRANSFORMER_BLOCK_LINEARS

CompressedBeitConfig = make_compressed_config_class(BeitConfig, "vitcompress_beit", __name__)
BEIT_FAMILY = build_family(
    __name__,
    CompressedBeitConfig,
    {BeitModel: "AutoModel", BeitForImageClassification: "AutoModelForImageClassification"},
    name="beit",
    base_model_type="beit",
    pretrained_class=BeitPreTrainedModel,
    backbone_attr="beit",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: BeitAttention reads its input only through them
)
CompressedBeitModel, CompressedBeitForImageClassification = BEIT_FAMILY.compressed_classes.values()
