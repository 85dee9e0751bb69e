"""Swin family: ``SwinModel`` / ``SwinForImageClassification`` / ``SwinBackbone`` (transformers 5.x names).

Blocks come in stages: ``encoder.layers.N.blocks.M`` (``swin.encoder...`` in the classifier and the backbone),
each with ``attention.{q,k,v}_proj`` / ``o_proj`` over windows of tokens and ``mlp.fc1`` / ``mlp.fc2``; widths
double from stage to stage. Between stages a patch merging (``encoder.layers.N.downsample.reduction``, a
``4C → 2C`` linear without bias) halves the token grid: it is compressed by default too, as one more linear.

All three methods handle it. The attention owns its per-head relative position bias
(``attention.relative_position_bias``): a head-factorized or pruned attention keeps that module, under the same
checkpoint name, and adds the kept heads' rows to the scores with the shifted-window mask, as the dense one does.
Pruning's FLOPs model counts each block at its own width and token count, and its attention per window (both
measured, ``PrunableModel.of``); a skipped block returns ``(hidden_states, None)``, as a ``SwinLayer`` returns its
attention weights beside its output (``block_extra_outputs``), and a stage whose blocks are all skipped still
merges its patches.
transformers' ``SwinLayer`` clamps its ``shift_size`` and ``window_size`` to the first input grid no larger than a
window and keeps them (a dense model run once at such a size computes differently at larger sizes afterwards):
``compress`` restores them, on the model it was given and on the result, to what they were before its forwards.
(transformers 5.24's dense Swin also fails outright when a stage's grid is smaller than its window, e.g. 28 px
inputs with ``window_size=7``: its bias table is built for the full window; compressed models share the limit.)
Not handled:

- block-by-block calibration (``sequential``, ``compensation_rank``): the stages are not one chain of blocks
  (the patch merging changes width and token count), so ``compress`` refuses them for this family.
"""

from __future__ import annotations

from transformers import SwinBackbone, SwinConfig, SwinForImageClassification, SwinModel, SwinPreTrainedModel

from ..modeling_utils import make_compressed_config_class
from .base import build_family
from .vit import TRANSFORMER_BLOCK_LINEARS

CompressedSwinConfig = make_compressed_config_class(SwinConfig, "vitcompress_swin", __name__)

SWIN_FAMILY = build_family(
    __name__,
    CompressedSwinConfig,
    {
        SwinModel: "AutoModel",
        SwinForImageClassification: "AutoModelForImageClassification",
        SwinBackbone: "AutoBackbone",
    },
    name="swin",
    base_model_type="swin",
    pretrained_class=SwinPreTrainedModel,
    backbone_attr="swin",
    linear_groups=TRANSFORMER_BLOCK_LINEARS,
    shared_input_groups=(0,),  # attention.{q,k,v}_proj: SwinAttention reads its input only through them
    block_path="encoder.layers.*.blocks",
    extra_linear_paths=("encoder.layers.*.downsample.reduction",),
    forward_state=("shift_size", "window_size"),
    block_extra_outputs=1,  # a SwinLayer returns (hidden_states, attention weights)
)
CompressedSwinModel, CompressedSwinForImageClassification, CompressedSwinBackbone = (
    SWIN_FAMILY.compressed_classes.values()
)
