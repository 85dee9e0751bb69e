"""Per-head Grams of the attention-mixed tokens ``A_h·x``: the metric of a head's value·output product.

Head ``h`` of an attention outputs ``A_h x N_h`` with ``N_h = W_V^hᵀ W_O^hᵀ``: the product acts on the
tokens *after* the head's attention has mixed them, not on ``x``. So the output error of a truncated
``N_h`` is ``E‖(A_h x) ΔN_h‖² = ‖S_hᵀ ΔN_h‖²_F`` with ``S_h S_hᵀ = E[(A_h x)ᵀ (A_h x)]``, and only with
this Gram does a head's discarded energy equal its output error. Whitening with the Gram of ``x``
instead misweighs heads against each other and against the MLP (measured 0.27-0.51x, varying by head,
on the shipped model).

One forward pre-hook per attention recomputes the head's attention probabilities from its own
``q_proj`` / ``k_proj`` (eager maths, in float32, whatever kernel the model runs) and adds each head's
``(A_h x)ᵀ (A_h x)`` in float64. Cost per head: ``T²·d + T·d²`` multiply-adds per image, about one more
forward pass of the attentions.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import attention_heads, with_own_position_bias
from .distributed import CalibrationProcesses


@dataclass
class HeadMixingStatistics:
    """Σ over calibration tokens of ``(A_h x)ᵀ (A_h x)`` for every head ``h`` (``[heads, d, d]``, float64)."""

    grams: torch.Tensor
    tokens: int = 0

    def mean_gram(self, head: int) -> torch.Tensor:
        return self.grams[head] / max(self.tokens, 1)


@torch.no_grad()
def _update(attention: nn.Module, into: HeadMixingStatistics, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
    heads, head_dim = attention_heads(attention), attention.head_dim
    batch, tokens, width = hidden.shape
    scaling = getattr(attention, "scaling", head_dim**-0.5)
    query = attention.q_proj(hidden).float().view(batch, tokens, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).float().view(batch, tokens, heads, head_dim).transpose(1, 2)
    scores = query @ key.transpose(-1, -2) * scaling
    mask = with_own_position_bias(attention, mask, batch)  # Swin's bias lives in the attention, not in the mask
    if mask is not None:
        scores = scores + mask.float()
    probabilities = scores.softmax(-1)  # [batch, heads, tokens, tokens]
    mixed = (probabilities @ hidden.float()[:, None]).double()  # [batch, heads, tokens, width]
    into.grams += torch.einsum("bhtd,bhte->hde", mixed, mixed)
    into.tokens += batch * tokens


@contextmanager
def record_head_mixing(model: nn.Module, attention_names: Iterable[str], statistics: dict[str, HeadMixingStatistics]):
    """While active, every forward of the named attentions adds its heads' mixed-token Grams to ``statistics``."""
    handles = []
    try:
        for name in attention_names:
            attention = model.get_submodule(name)
            width = attention.q_proj.in_features
            device = attention.q_proj.weight.device
            statistics.setdefault(
                name,
                HeadMixingStatistics(
                    torch.zeros(attention_heads(attention), width, width, dtype=torch.float64, device=device)
                ),
            )

            def hook(module, args, kwargs, _name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                _update(module, statistics[_name], hidden, mask if isinstance(mask, torch.Tensor) else None)

            handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def sum_head_mixing_over_processes(
    statistics: dict[str, HeadMixingStatistics], processes: CalibrationProcesses
) -> None:
    """Add every process's partial sums up, in place (the same names on every process)."""
    if not processes.is_distributed:
        return
    names = sorted(statistics)
    processes.sum_([statistics[name].grams for name in names])
    for name, tokens in zip(names, processes.sum_numbers([statistics[n].tokens for n in names]), strict=True):
        statistics[name].tokens = int(tokens)
