"""Physically remove what a pruning state says is gone: smaller tensors, not masks.

* An attention that lost heads or value dims becomes a
  :class:`~hf_vitcompress.attention.HeadFactorizedAttention` holding the kept rows of ``q_proj`` /
  ``k_proj`` / ``v_proj`` and the kept columns of ``o_proj`` (removed heads at rank 0, kept heads at full
  query/key rank, the kept value dims as value/output rank, so every kept head has the same narrower
  value width, with no padding between heads; fused kernels pad it to the query/key width, which the
  budget counts, see :mod:`.structure`). Exact: the key bias only shifts every score of a query by the
  same amount (softmax ignores it) and the kept value bias folds into the output bias because
  attention weights sum to one.
* An MLP that lost neurons keeps the matching rows of ``fc1`` and columns of ``fc2`` (SwiGLU: rows of ``gate_proj``
  and ``up_proj``, columns of ``down_proj``), as plain ``nn.Linear``.
* A skipped block becomes a :class:`~hf_vitcompress.layers.SkippedBlock`.

The per-layer head counts and widths go into the plan, so ``from_pretrained`` rebuilds the same shapes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...attention import HeadFactorizedAttention, attention_heads, attention_projection_names, head_factorized_like
from ...families import family_for
from ...layers import SkippedBlock
from ...plan import CompressionPlan, LayerPlan, count_parameters, set_submodule
from .structure import BlockPruning, PrunableModel, block_attention, mlp_layout


@torch.no_grad()
def pruned_attention(attention: nn.Module, block: BlockPruning) -> tuple[HeadFactorizedAttention, LayerPlan]:
    heads, head_dim = attention_heads(attention), attention.head_dim
    q, k, v, o = (getattr(attention, name) for name in attention_projection_names(attention))
    hidden = q.in_features
    qk_rows = torch.tensor([h * head_dim + i for h in block.heads for i in range(head_dim)], device=q.weight.device)
    vo_rows = torch.tensor(
        [h * head_dim + i for h, dims in zip(block.heads, block.value_dims, strict=True) for i in dims],
        device=q.weight.device,
    )
    qk_ranks = [head_dim if h in block.heads else 0 for h in range(heads)]
    vo_ranks = [block.value_dim if h in block.heads else 0 for h in range(heads)]
    out_bias = o.bias is not None or v.bias is not None
    module = head_factorized_like(
        attention, head_dim, qk_ranks, vo_ranks, qk_bias=q.bias is not None, out_bias=out_bias
    )
    module.qk_left.weight.copy_(q.weight[qk_rows])
    if q.bias is not None:
        module.qk_left.bias.copy_(q.bias[qk_rows])
    module.qk_right.weight.copy_(k.weight[qk_rows])
    module.vo_down.weight.copy_(v.weight[vo_rows])
    module.vo_up.weight.copy_(o.weight[:, vo_rows])
    if out_bias:
        bias = o.bias.clone() if o.bias is not None else o.weight.new_zeros(o.out_features)
        if v.bias is not None:
            bias += o.weight[:, vo_rows] @ v.bias[vo_rows]
        module.vo_up.bias.copy_(bias)
    module.train(attention.training)
    plan = LayerPlan(
        "head_factorized",
        hidden,
        hidden,
        out_bias,
        head_dim=head_dim,
        qk_ranks=qk_ranks,
        vo_ranks=vo_ranks,
        qk_bias=q.bias is not None,
    )
    return module, plan


@torch.no_grad()
def _sliced(linear: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype
    )
    sliced.weight.copy_(weight)
    if linear.bias is not None:
        sliced.bias.copy_(linear.bias if rows is None else linear.bias[rows])
    return sliced


def apply_pruning(model: nn.Module, structure: PrunableModel, state: list[BlockPruning]) -> dict[str, LayerPlan]:
    """Slice ``model`` in place as ``state`` says; return the plan entries of what changed."""
    structure.check_state(state)
    extra_outputs = family_for(model).block_extra_outputs
    layers: dict[str, LayerPlan] = {}
    for name, shape, block in zip(structure.block_names, structure.blocks, state, strict=True):
        if block.skipped:
            set_submodule(model, name, SkippedBlock(extra_outputs))
            layers[name] = LayerPlan("skipped_block", shape.hidden, shape.hidden, False)
            continue
        attribute, attention = block_attention(model.get_submodule(name))
        if len(block.heads) < shape.heads or block.value_dim < shape.head_dim:
            module, layers[f"{name}.{attribute}"] = pruned_attention(attention, block)
            set_submodule(model, f"{name}.{attribute}", module)
        if len(block.neurons) < shape.neurons:
            mlp = model.get_submodule(f"{name}.mlp")
            inputs, output = mlp_layout(mlp)
            kept = torch.tensor(block.neurons, device=getattr(mlp, output).weight.device)
            for role, rows, columns in (*((n, kept, None) for n in inputs), (output, None, kept)):
                sliced = _sliced(getattr(mlp, role), rows, columns)
                set_submodule(model, f"{name}.mlp.{role}", sliced)
                layers[f"{name}.mlp.{role}"] = LayerPlan(
                    "pruned_linear", sliced.in_features, sliced.out_features, sliced.bias is not None
                )
    return layers


def export_pruned(
    model: nn.Module,
    structure: PrunableModel,
    state: list[BlockPruning],
    config,
    report=None,
    calibration_images: int = 0,
    provenance: dict | None = None,
) -> nn.Module:
    """A compressed copy of the dense ``model`` (not modified) with ``state``'s structures removed."""
    from ...compress import finish_compressed

    working = copy.deepcopy(model)
    dense_parameters = count_parameters(model)
    layers = apply_pruning(working, structure, state)
    plan = CompressionPlan(layers=layers, dense_parameters=dense_parameters, parameters=count_parameters(working))
    pruned = finish_compressed(working, model, config, plan, report, calibration_images)
    # "macs" is what the budget was met with (a fused attention kernel, the costliest implementation);
    # eager attention runs the narrowed value heads unpadded and costs "macs_eager".
    pruned.config.compression_provenance.update(
        {
            "dense_macs": structure.dense_macs,
            "macs": structure.macs(state),
            "macs_eager": structure.macs(state, padded=False),
            **(provenance or {}),
        }
    )
    return pruned
