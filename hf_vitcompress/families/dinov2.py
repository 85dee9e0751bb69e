"""DINOv2 family: ``Dinov2Model`` / ``Dinov2ForImageClassification`` / ``Dinov2Backbone``, and the same three
``Dinov2WithRegisters...`` classes (transformers 5.x module names).

Blocks live at ``encoder.layer`` (``dinov2.encoder.layer`` in the classifier); each block has
``attention.{q,k,v}_proj`` / ``o_proj``, then ``layer_scale1``; ``mlp.fc1`` / ``mlp.fc2`` (GELU), or
``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` (the SwiGLU MLP of ViT-g), then ``layer_scale2``.

LayerScale is kept as it is, not folded into ``o_proj`` / ``fc2``: the compressed checkpoint holds the dense
``lambda1`` values. Folding it exactly (tried at commit 726bfb9) changed nothing measurable: on the real DINOv2-S
the default gave the same feature error to 6 digits at ratios 0.8 and 0.5 either way (a likely reason, not
isolated: the chosen factorization weights output channels by their gradients, which already carry the scale).
Register tokens (``Dinov2WithRegisters``) are tokens like the others for every method.
Position embeddings are always interpolated to the input size by the model itself.
"""

from __future__ import annotations

from transformers import (
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2PreTrainedModel,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    Dinov2WithRegistersPreTrainedModel,
)

from ..modeling_utils import make_compressed_config_class
from .base import FamilyAdapter, build_family

DINOV2_BLOCK_LINEARS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.o_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
    ("mlp.gate_proj", "mlp.up_proj"),  # SwiGLU (use_swiglu_ffn=True): both read the block's normed input
    ("mlp.down_proj",),
)


CompressedDinov2Config = make_compressed_config_class(Dinov2Config, "vitcompress_dinov2", __name__)
CompressedDinov2WithRegistersConfig = make_compressed_config_class(
    Dinov2WithRegistersConfig, "vitcompress_dinov2_with_registers", __name__
)


def _family(name: str, base_model_type: str, pretrained: type, config_class: type, dense: tuple) -> FamilyAdapter:
    """The adapter for one of the two DINOv2 model types: ``dense`` is its (model, classifier, backbone)."""
    return build_family(
        __name__,
        config_class,
        dict(zip(dense, ("AutoModel", "AutoModelForImageClassification", "AutoBackbone"), strict=True)),
        name=name,
        base_model_type=base_model_type,
        pretrained_class=pretrained,
        backbone_attr=pretrained.base_model_prefix,
        linear_groups=DINOV2_BLOCK_LINEARS,
        shared_input_groups=(0,),  # attention.{q,k,v}_proj: Dinov2Attention reads its input only through them
        block_path="encoder.layer",
    )


DINOV2_FAMILY = _family(
    "dinov2",
    "dinov2",
    Dinov2PreTrainedModel,
    CompressedDinov2Config,
    (Dinov2Model, Dinov2ForImageClassification, Dinov2Backbone),
)
DINOV2_WITH_REGISTERS_FAMILY = _family(
    "dinov2_with_registers",
    "dinov2_with_registers",
    Dinov2WithRegistersPreTrainedModel,
    CompressedDinov2WithRegistersConfig,
    (Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification, Dinov2WithRegistersBackbone),
)
CompressedDinov2Model, CompressedDinov2ForImageClassification, CompressedDinov2Backbone = (
    DINOV2_FAMILY.compressed_classes.values()
)
(
    CompressedDinov2WithRegistersModel,
    CompressedDinov2WithRegistersForImageClassification,
    CompressedDinov2WithRegistersBackbone,
) = DINOV2_WITH_REGISTERS_FAMILY.compressed_classes.values()
