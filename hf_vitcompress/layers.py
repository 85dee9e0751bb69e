"""Modules that replace the dense linears of a compressed model."""

from __future__ import annotations

import torch
from torch import nn

from .kernels.lowrank import _fused_can_run, fused_lowrank_op

IMPLEMENTATIONS = ("factorized", "fused")
"""How a :class:`LowRankLinear` runs: two ``nn.Linear`` GEMMs, or the fused Triton kernel where it can run.
(A layer that runs fastest dense is merged back into an ``nn.Linear`` by :func:`hf_vitcompress.tune`.)"""


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``r`` factorization of an ``nn.Linear(in_features, out_features)``.

    The two factors are plain ``nn.Linear`` children so that anything that targets linears (PEFT
    LoRA, quantizers, ``Trainer``'s optimizer grouping) works on them unchanged. The bias lives on
    ``up`` because it is added to the output. The child names ``lowrank_down`` / ``lowrank_up`` are
    chosen so that no transformers 5.x weight-renaming pattern (``query``, ``dense``, ``output``,
    ...) matches them: a saved checkpoint reloads with the same key names.

    ``implementation="fused"`` (chosen by :func:`hf_vitcompress.tune` where it measured faster) runs
    the Triton kernel for inference on a GPU. It falls back to the two GEMMs whenever the kernel cannot
    serve the call exactly as they would: gradients needed, autocast on, an input dtype other than the
    weights', no Triton or no GPU, ``torch.export`` / ONNX export or tracing (a compiled model keeps the kernel as
    the custom op ``torch.ops.hf_vitcompress.fused_lowrank_linear``), or children that other tools wrapped or hooked
    (PEFT, quantizers, Accelerate's offloading hooks, MAC counters), which must see their forward calls.
    """

    _implementation = "factorized"  # class default: modules pickled before the attribute existed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        implementation: str = "factorized",
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
        self.implementation = implementation

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {value!r}.")
        self._implementation = value

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
        if self.implementation == "fused" and self.kernel_serves(hidden_states):
            weights = (self.lowrank_down.weight, self.lowrank_up.weight, self.lowrank_up.bias)
            return fused_lowrank_op(hidden_states, *weights)
        return self.lowrank_up(self.lowrank_down(hidden_states))

    def kernel_serves(self, hidden_states: torch.Tensor) -> bool:
        """Whether a ``fused`` layer would run the kernel for this input (else: the two GEMMs).

        The one rule for both ``forward`` and :func:`hf_vitcompress.tune`, so that a timing labelled
        ``fused`` is always a timing of the kernel."""
        return self._fused_serves(hidden_states) and _fused_can_run(hidden_states, self.rank)

    def _fused_serves(self, hidden_states: torch.Tensor) -> bool:
        """Whether the kernel gives what the two child ``forward`` calls would, with nobody missing them."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(hidden_states.device.type):
            return False
        # torch.compile keeps the kernel (a custom op with a fake implementation); an exported graph (ONNX,
        # torch.export) must hold only standard operators, so it gets the two GEMMs
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return False
        if hidden_states.dtype != self.lowrank_down.weight.dtype:
            return False
        if _global_hooks():
            return False
        return all(
            type(child) is nn.Linear
            and not (child._forward_hooks or child._forward_pre_hooks)
            and not hasattr(child, "_hf_hook")  # Accelerate's hooks replace forward instead of registering
            and getattr(vars(child).get("forward", nn.Linear.forward), "__func__", nn.Linear.forward)
            is nn.Linear.forward
            for child in (self.lowrank_down, self.lowrank_up)
        )

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
        linear.requires_grad_(self.lowrank_up.weight.requires_grad)  # frozen factors merge into a frozen linear
        return linear

    def extra_repr(self) -> str:
        fused = ", implementation=fused" if self.implementation == "fused" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}{fused}"
        )


def _global_hooks() -> bool:
    """Hooks registered for every module (``register_module_forward_hook`` and friends)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class SkippedBlock(nn.Module):
    """What a pruned-away encoder block becomes: the residual stream passes through unchanged.

    Takes whatever a transformer block takes (``hidden_states`` first) and returns ``hidden_states``, or, for a
    family whose blocks return more (``extra_outputs``: Swin's layers return their attention weights too, which
    the stage unpacks), ``(hidden_states, None, ...)``: a skipped block computes no attention. It has no weights,
    so the checkpoint simply holds none for that block.
    """

    def __init__(self, extra_outputs: int = 0) -> None:
        super().__init__()
        self.extra_outputs = extra_outputs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
        if self.extra_outputs:
            return (hidden_states, *([None] * self.extra_outputs))
        return hidden_states

    def extra_repr(self) -> str:
        return f"extra_outputs={self.extra_outputs}" if self.extra_outputs else ""


def low_rank_parameter_count(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of a ``LowRankLinear``: ``rank * (in + out)`` plus the bias."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def break_even_rank(in_features: int, out_features: int) -> int:
    """Largest rank whose factor pair has strictly fewer weights than the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)
