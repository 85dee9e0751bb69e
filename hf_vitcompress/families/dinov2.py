"""DINOv2 family: ``Dinov2Model`` / ``Dinov2ForImageClassification`` / ``Dinov2Backbone``, and the same three
``Dinov2WithRegisters...`` classes (transformers 5.x module names).

Blocks live at ``encoder.layer`` (``dinov2.encoder.layer`` in the classifier); each block has
``attention.{q,k,v}_proj`` / ``o_proj``, then ``layer_scale1``; ``mlp.fc1`` / ``mlp.fc2`` (GELU), or
``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` (the SwiGLU MLP of ViT-g), then ``layer_scale2``.

LayerScale is folded before compression, exactly: ``γ ⊙ (W x + b) = (γ[:, None] W) x + γ b`` moves each
``lambda1`` into ``o_proj`` / ``fc2`` (``down_proj``), and ``lambda1`` becomes 1 (still a parameter, so the model
stays a ``Dinov2Model`` and LayerScale can be trained again). Why: the methods measure a linear's error on its
own output, and LayerScale, which scales that output per channel on its way into the residual stream, was
invisible to them. On the real DINOv2-S at ratio 0.5 the default reached a digits probe of 80.7% with
LayerScale kept and 85.9% on the same weights folded into a ``ViTModel``, in one run of
``benchmarks/dinov2_family.py`` before this fold existed (``benchmarks/dinov2_family_layerscale_kept.json``,
code f51ca5a). Register tokens (``Dinov2WithRegisters``) are tokens like the others for every method.
Position embeddings are always interpolated to the input size by the model itself.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
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

from ..modeling_utils import CompressedConfigMixin, make_compressed_model_class, register_family_classes
from .base import FamilyAdapter

DINOV2_BLOCK_LINEARS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.o_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
    ("mlp.gate_proj", "mlp.up_proj"),  # SwiGLU (use_swiglu_ffn=True): both read the block's normed input
    ("mlp.down_proj",),
)


@strict
class CompressedDinov2Config(CompressedConfigMixin, Dinov2Config):
    """``Dinov2Config`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_dinov2"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


@strict
class CompressedDinov2WithRegistersConfig(CompressedConfigMixin, Dinov2WithRegistersConfig):
    """``Dinov2WithRegistersConfig`` plus the compression config and plan, under its own ``model_type``."""

    model_type = "vitcompress_dinov2_with_registers"

    compression_config: dict | None = None
    compression_plan: dict | None = None
    compression_provenance: dict | None = None


def fold_layer_scale(model: nn.Module) -> None:
    """Move every block's LayerScale into the linear before it, in place (an equal function; see above)."""
    with torch.no_grad():
        for block in model.modules():
            if not hasattr(block, "layer_scale1"):
                continue
            mlp_output = block.mlp.down_proj if hasattr(block.mlp, "down_proj") else block.mlp.fc2
            for scale, linear in ((block.layer_scale1, block.attention.o_proj), (block.layer_scale2, mlp_output)):
                gamma = scale.lambda1.to(linear.weight.dtype)
                linear.weight.mul_(gamma[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(gamma)
                scale.lambda1.fill_(1.0)


def _family(name: str, base_model_type: str, pretrained: type, config_class: type, dense: tuple) -> FamilyAdapter:
    """The adapter for one of the two DINOv2 model types: ``dense`` is its (model, classifier, backbone)."""
    compressed = {cls: make_compressed_model_class(cls, config_class, __name__) for cls in dense}
    model, classifier, backbone = (compressed[cls] for cls in dense)
    register_family_classes(
        config_class,
        {"AutoModel": model, "AutoModelForImageClassification": classifier, "AutoBackbone": backbone},
    )
    return FamilyAdapter(
        name=name,
        base_model_type=base_model_type,
        pretrained_class=pretrained,
        backbone_attr=pretrained.base_model_prefix,
        linear_groups=DINOV2_BLOCK_LINEARS,
        compressed_classes=compressed,
        shared_input_groups=(0,),  # attention.{q,k,v}_proj: Dinov2Attention reads its input only through them
        config_class=config_class,
        block_path="encoder.layer",
        prepare=fold_layer_scale,
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
