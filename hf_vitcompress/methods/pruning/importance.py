"""How much each prunable group matters: magnitude or Taylor scores, per head, value dim and MLP neuron.

A group's weights are the rows/columns that go with it (see :mod:`.structure`). Scores are additive
estimates of what removing the group costs, so a group of groups (a head, a block) scores the sum:

* ``magnitude``: the group's squared weight norm (biases included);
* ``taylor``: ``(Σ_w ∂L/∂w · w)²`` summed over batches, the first-order estimate of the loss change when
  the group is zeroed (Molchanov et al., 2019). The loss is the cross-entropy against the labels when
  the batches given to :func:`taylor_scores` carry them, else against the dense model's own predictions.
  ``compress()`` passes its calibration images, which carry no labels, so it uses the predictions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ...attention import attention_heads
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from .structure import PrunableModel, PruningError, attention_layout, block_attention, mlp_layout


@dataclass
class GroupScores:
    """``heads[b][h]``, ``value_dims[b][h][i]`` and ``neurons[b][j]``: importance of each group of block ``b``."""

    heads: list[torch.Tensor]
    value_dims: list[torch.Tensor]
    neurons: list[torch.Tensor]


def _block_parts(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    block = model.get_submodule(name)
    return block_attention(block)[1], block.mlp


def _head_terms(attention: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (q/k part, v/o part per dim) sums of ``tensors`` (elementwise terms already computed)."""
    heads, head_dim = attention_heads(attention), attention.head_dim
    q, k, v, o = attention_layout(attention)
    qk = sum(tensors[f"{p}.weight"].view(heads, head_dim, -1).sum(dim=(1, 2)) for p in (q, k))
    for p in (q, k):
        if f"{p}.bias" in tensors:
            qk = qk + tensors[f"{p}.bias"].view(heads, head_dim).sum(1)
    vo = tensors[f"{v}.weight"].view(heads, head_dim, -1).sum(2) + tensors[f"{o}.weight"].t().reshape(
        heads, head_dim, -1
    ).sum(2)
    if f"{v}.bias" in tensors:
        vo = vo + tensors[f"{v}.bias"].view(heads, head_dim)
    return qk, vo


def _neuron_terms(mlp: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs, output = mlp_layout(mlp)
    terms = tensors[f"{output}.weight"].sum(0)
    for name in inputs:  # a neuron is a row of each input linear (fc1; SwiGLU's gate_proj and up_proj)
        terms = terms + tensors[f"{name}.weight"].sum(1)
        if f"{name}.bias" in tensors:
            terms = terms + tensors[f"{name}.bias"]
    return terms


def _parameters(attention: nn.Module, mlp: nn.Module) -> dict[str, nn.Parameter]:
    found = {f"{n}": p for n, p in attention.named_parameters() if n.split(".")[0] in attention_layout(attention)}
    inputs, output = mlp_layout(mlp)
    found.update({n: p for n, p in mlp.named_parameters() if n.split(".")[0] in (*inputs, output)})
    return found


@torch.no_grad()
def magnitude_scores(model: nn.Module, structure: PrunableModel, include_query_key: bool = True) -> GroupScores:
    """Squared weight norms per group. ``include_query_key=False`` scores a head by its value/output weights
    only: what UVC's search ranks and shrinks (a head without them contributes nothing, whatever its q/k)."""
    heads, dims, neurons = [], [], []
    for name in structure.block_names:
        attention, mlp = _block_parts(model, name)
        squares = {n: p.detach().double() ** 2 for n, p in _parameters(attention, mlp).items()}
        qk, vo = _head_terms(attention, squares)
        heads.append(qk * include_query_key + vo.sum(1))
        dims.append(vo)
        neurons.append(_neuron_terms(mlp, squares))
    return GroupScores(heads, dims, neurons)


def taylor_scores(
    model: nn.Module,
    structure: PrunableModel,
    batches: Iterable[dict | torch.Tensor],
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> GroupScores:
    """Accumulate ``(Σ gradient·weight)²`` per group over ``batches`` (``pixel_values`` [+ ``labels``]).

    Per-batch terms are summed, so with several ``processes`` (each given its share of the batches)
    the sums are added up over processes and every process gets the same scores.
    """
    parts = [_block_parts(model, name) for name in structure.block_names]
    parameters = [_parameters(*p) for p in parts]
    heads = [torch.zeros(s.heads, dtype=torch.float64) for s in structure.blocks]
    dims = [torch.zeros(s.heads, s.head_dim, dtype=torch.float64) for s in structure.blocks]
    neurons = [torch.zeros(s.neurons, dtype=torch.float64) for s in structure.blocks]
    was_training = model.training
    model.eval()
    seen = 0
    with processes.together("the Taylor importance pass"):
        try:
            for batch in batches:
                pixels = batch if isinstance(batch, torch.Tensor) else batch["pixel_values"]
                pixels = pixels.to(dtype=next(model.parameters()).dtype)  # the float32 copy of a half model
                labels = None if isinstance(batch, torch.Tensor) else batch.get("labels")
                model.zero_grad(set_to_none=True)
                logits = model(pixel_values=pixels).logits.float()  # the loss in float32 for half-precision models
                if labels is None:
                    labels = logits.detach().argmax(-1)
                nn.functional.cross_entropy(logits, labels.to(logits.device)).backward()
                with torch.no_grad():
                    for b, ((attention, mlp), found) in enumerate(zip(parts, parameters, strict=True)):
                        # float64 before the product: a half-precision grad·w rounds away small groups' scores
                        products = {
                            n: p.grad.double() * p.detach().double() for n, p in found.items() if p.grad is not None
                        }
                        qk, vo = _head_terms(attention, products)
                        heads[b] += (qk + vo.sum(1)).cpu() ** 2
                        dims[b] += vo.cpu() ** 2
                        neurons[b] += _neuron_terms(mlp, products).cpu() ** 2
                seen += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    if processes.is_distributed:
        shapes = [(s.heads, s.head_dim, s.neurons) for s in structure.blocks]
        processes.check_same("the pruned model", [str(next(model.parameters()).dtype), shapes])
        processes.sum_([*heads, *dims, *neurons])
        seen = int(processes.sum_numbers([seen])[0])
    if not seen:
        raise PruningError("Taylor importance needs data: the calibration data held no batches.")
    return GroupScores(heads, dims, neurons)
