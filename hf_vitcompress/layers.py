"""Modules that replace the dense linears of a compressed model."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``r`` factorization of an ``nn.Linear(in_features, out_features)``.

    The two factors are plain ``nn.Linear`` children so that anything that targets linears (PEFT
    LoRA, quantizers, ``Trainer``'s optimizer grouping) works on them unchanged. The bias lives on
    ``up`` because it is added to the output. The child names ``lowrank_down`` / ``lowrank_up`` are
    chosen so that no transformers 5.x weight-renaming pattern (``query``, ``dense``, ``output``,
    ...) matches them: a saved checkpoint reloads with the same key names.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, {min(in_features, out_features)}] for a {in_features}->{out_features} linear, got {rank}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.lowrank_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lowrank_up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, up_weight: torch.Tensor, down_weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from ``up_weight [out, r]`` and ``down_weight [r, in]`` (so that ``W ≈ up_weight @ down_weight``)."""
        out_features, rank = up_weight.shape
        in_features = down_weight.shape[1]
        module = cls(
            in_features, out_features, rank, bias=bias is not None, device=up_weight.device, dtype=up_weight.dtype
        )
        with torch.no_grad():
            module.lowrank_up.weight.copy_(up_weight)
            module.lowrank_down.weight.copy_(down_weight)
            if bias is not None:
                module.lowrank_up.bias.copy_(bias)
        return module

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lowrank_up.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lowrank_up(self.lowrank_down(hidden_states))

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix this module applies."""
        return self.lowrank_up.weight @ self.lowrank_down.weight

    def merge(self) -> nn.Linear:
        """Return an equivalent dense ``nn.Linear`` (for layers where dense is faster, or for export)."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class SkippedBlock(nn.Module):
    """What a pruned-away encoder block becomes: the residual stream passes through unchanged.

    Takes whatever a transformer block takes (``hidden_states`` first) and returns ``hidden_states``;
    it has no weights, so the checkpoint simply holds none for that block.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def low_rank_parameter_count(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of a ``LowRankLinear``: ``rank * (in + out)`` plus the bias."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def break_even_rank(in_features: int, out_features: int) -> int:
    """Largest rank whose factor pair has strictly fewer weights than the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)
