"""One shared down-projection for the linears that read the same input (an attention's q, k and v).

An attention's ``q_proj``, ``k_proj`` and ``v_proj`` all multiply the same hidden states. Factorizing the
three separately stores three down-projections of that input; stacking them, ``[W_q; W_k; W_v] ≈ U D``,
stores one ``r × d`` down-projection ``D`` and three up-projections ``U_q, U_k, U_v`` (``d × r`` each),
and computes ``D x`` once per token. At equal weights a shared rank ``1.5 r`` replaces three rank-``r``
pairs, and on DINOv2-S and all-MiniLM-L6-v2 it measured 0.70-0.86x the summed q/k/v output error
(``benchmarks/qkv_shared_rank.py``).

The module is the model's own attention, kept whole (its attention kernels, masks, relative-position terms,
``output_attentions`` recording): a subclass that applies ``shared_down`` to the input and hands the
result to the original ``forward``, whose projections are now the up-projections (``r → out``, with the
original biases). That is exact for any attention whose ``forward`` reads its input only through those
projections and the input's leading shape, as ViT's and BERT's do; the family adapter names such groups.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch
from torch import nn

SHARED_DOWN = "shared_down"  # the child's name: matches no transformers weight-renaming pattern


class SharedInputMixin:
    """``forward(x, ...) = Base.forward(shared_down(x), ...)``: the base's projections read ``shared_down(x)``."""

    shared_input_projections: tuple[str, ...] = ()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.shared_down(hidden_states), *args, **kwargs)

    @property
    def shared_rank(self) -> int:
        return self.shared_down.out_features

    def extra_repr(self) -> str:
        return f"shared_rank={self.shared_rank}, projections={list(self.shared_input_projections)}"

    def __reduce_ex__(self, protocol):
        # Pickled by its base class, not by name: the subclass is made at run time, so a fresh process that
        # unpickles (torch.load of a whole model, DataLoader workers) has no ``SharedInput<Base>`` until
        # :func:`shared_input_class` makes it again.
        base = next(c for c in type(self).__mro__ if not issubclass(c, SharedInputMixin))
        return (_new_shared_input, (base,), self.__getstate__())


_CLASSES: dict[type, type] = {}


def shared_input_class(base: type) -> type:
    """The shared-input subclass of an attention class (one per class). Also set on this module so that the class
    itself can be named; instances pickle by their base class (``SharedInputMixin.__reduce_ex__``)."""
    if issubclass(base, SharedInputMixin):
        return base
    if base not in _CLASSES:
        name = f"SharedInput{base.__name__}"
        cls = type(name, (SharedInputMixin, base), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)
        _CLASSES[base] = cls
    return _CLASSES[base]


def _new_shared_input(base: type) -> nn.Module:
    """An empty instance of ``base``'s shared-input class, for unpickling (the state is set after)."""
    cls = shared_input_class(base)
    return cls.__new__(cls)


def _shallow_copy(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` object sharing ``module``'s children and tensors, with dicts of its own (so that swapping a
    child of one leaves the other as it was)."""
    copied = copy.copy(module)
    for key, value in vars(module).items():  # _modules, _parameters, hooks...
        if isinstance(value, dict):
            copied.__dict__[key] = type(value)(value)
    # A forward set on the instance (Accelerate's hooks, nn.Module.compile) is bound to the *original* module and
    # would run it instead of the copy's class forward; the copy runs its own class's forward.
    for key in ("forward", "_compiled_call_impl"):
        copied.__dict__.pop(key, None)
    copied.__class__ = cls
    return copied


def shareable_projections(module: nn.Module, projections: Sequence[str]) -> list[nn.Linear]:
    """The named child linears of ``module``, checked to read one input width (else a ``ValueError``)."""
    linears = [getattr(module, name, None) for name in projections]
    if len(projections) < 2 or not all(type(linear) is nn.Linear for linear in linears):
        raise ValueError(
            f"A shared down-projection needs at least two plain nn.Linear children of a {type(module).__name__}; "
            f"got {dict(zip(projections, (type(linear).__name__ for linear in linears), strict=True))}."
        )
    if len({linear.in_features for linear in linears}) != 1:
        raise ValueError(f"The projections {list(projections)} do not read inputs of one width.")
    if len({linear.bias is not None for linear in linears}) != 1:
        raise ValueError(f"The projections {list(projections)} do not all have a bias, or all lack one.")
    return linears


def projection_shape(linears: Sequence[nn.Linear]) -> tuple[int, int, bool]:
    """``(in_features, out_features in all, bias)`` of a group of projections: what a plan entry records."""
    return linears[0].in_features, sum(linear.out_features for linear in linears), linears[0].bias is not None


def share_input(
    module: nn.Module,
    projections: Sequence[str],
    rank: int,
    down_weight: torch.Tensor | None = None,
    up_weights: Sequence[torch.Tensor] | None = None,
    biases: Sequence[torch.Tensor | None] | None = None,
) -> nn.Module:
    """A copy of ``module`` whose ``projections`` read one rank-``rank`` down-projection of its input.

    ``module`` itself is left as it was (its children are shared with the copy, except the projections),
    so that a caller can put it back. Without weights the new linears are uninitialized (``from_pretrained``
    loads them); with them, ``down_weight [rank, in]``, ``up_weights[i] [out_i, rank]`` and ``biases[i]``
    (``None`` where the projection has no bias).
    """
    linears = shareable_projections(module, projections)
    in_features = linears[0].in_features
    if not 1 <= rank <= in_features:
        raise ValueError(
            f"A shared down-projection of width {in_features} needs a rank in [1, {in_features}], got {rank}."
        )
    shared = _shallow_copy(module, shared_input_class(type(module)))
    shared.shared_input_projections = tuple(projections)
    factory = {"device": linears[0].weight.device, "dtype": linears[0].weight.dtype}
    shared.shared_down = nn.Linear(in_features, rank, bias=False, **factory)
    for index, (name, linear) in enumerate(zip(projections, linears, strict=True)):
        up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **factory)
        setattr(shared, name, up)
        if up_weights is not None:
            with torch.no_grad():
                up.weight.copy_(up_weights[index])
                if up.bias is not None:
                    up.bias.copy_(linear.bias if biases is None else biases[index])
    if down_weight is not None:
        with torch.no_grad():
            shared.shared_down.weight.copy_(down_weight)
    return shared


def merge_shared_input(module: nn.Module) -> nn.Module:
    """The module's original (dense) class with each projection the merged ``up @ shared_down`` linear: the
    same function, the architecture before compression (a latency/FLOPs baseline, or a form for export)."""
    if not isinstance(module, SharedInputMixin):
        raise TypeError(f"{type(module).__name__} has no shared down-projection to merge.")
    base = next(cls for cls in type(module).__mro__ if not issubclass(cls, SharedInputMixin))
    dense = _shallow_copy(module, base)
    down = module.shared_down
    del dense._modules[SHARED_DOWN]
    dense.__dict__.pop("shared_input_projections", None)
    for name in module.shared_input_projections:
        up = getattr(module, name)
        linear = nn.Linear(
            down.in_features, up.out_features, bias=up.bias is not None, device=up.weight.device, dtype=up.weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(up.weight @ down.weight)
            if up.bias is not None:
                linear.bias.copy_(up.bias)
        linear.requires_grad_(up.weight.requires_grad)
        setattr(dense, name, linear)
    return dense
