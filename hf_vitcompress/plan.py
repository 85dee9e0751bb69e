"""The compression *plan*: what a method decided for each module, as plain data.

The plan is the one object every part agrees on. It lives in the compressed model's config
(``config.compression_plan``) and is all that is needed to rebuild the architecture before the
weights load: loaders read only the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from .attention import (
    HeadFactorizedAttention,
    attention_heads,
    attention_projection_names,
    head_factorized_like,
    head_factorized_parameter_count,
)
from .layers import IMPLEMENTATIONS, LowRankLinear, SkippedBlock, low_rank_parameter_count
from .shared_input import projection_shape, share_input, shareable_projections

PLAN_VERSION = 3  # the newest plan this release reads
# 1: the first format. 2: low-rank layers may record an ``implementation`` and the plan its ``tuning``.
# 3: ``shared_input`` entries. A plan is written with the lowest version that holds what it uses, so
# checkpoints that use none of it stay readable by older releases.


class PlanMismatchError(ValueError):
    """The plan does not match the model (or the checkpoint) it is applied to."""


LAYER_KINDS = ("low_rank", "head_factorized", "pruned_linear", "skipped_block", "shared_input")


@dataclass
class LayerPlan:
    """What became of one module.

    * ``kind="low_rank"``: an ``nn.Linear`` became a :class:`LowRankLinear` of ``rank`` (run as its
      ``implementation``, when :func:`hf_vitcompress.tune` measured that the fused kernel is faster).
    * ``kind="head_factorized"``: an attention module became a
      :class:`~hf_vitcompress.attention.HeadFactorizedAttention` with per-head ``qk_ranks`` and
      ``vo_ranks`` (``in_features = out_features`` = hidden size, ``bias`` = output bias,
      ``qk_bias`` = query bias). Structured pruning records pruned attentions this way too (kept heads at
      full query/key rank, removed heads at rank 0, value dims as ``vo_ranks``).
    * ``kind="pruned_linear"``: an ``nn.Linear`` kept some of its rows / columns; ``in_features`` /
      ``out_features`` are the new, smaller, sizes.
    * ``kind="skipped_block"``: a whole encoder block became a :class:`~hf_vitcompress.layers.SkippedBlock`.
    * ``kind="shared_input"``: the ``projections`` of an attention (its q/k/v linears, ``in_features`` wide,
      ``out_features`` outputs in all, biased or not together) read one rank-``rank`` down-projection of its
      input (:mod:`hf_vitcompress.shared_input`).
    """

    kind: str
    in_features: int
    out_features: int
    bias: bool
    rank: int | None = None
    head_dim: int | None = None
    qk_ranks: list[int] | None = None
    vo_ranks: list[int] | None = None
    qk_bias: bool | None = None
    implementation: str | None = None
    projections: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise PlanMismatchError(
                f"Unknown layer plan kind {self.kind!r}; this version of hf_vitcompress knows {LAYER_KINDS}. "
                "Upgrade hf_vitcompress."
            )
        if self.kind in ("pruned_linear", "skipped_block"):
            if min(self.in_features, self.out_features) < 1:
                raise PlanMismatchError(f"Invalid {self.kind} shape {self.in_features}->{self.out_features}.")
            return
        if self.kind == "shared_input":
            if not self.projections or len(self.projections) < 2 or not 1 <= (self.rank or 0) <= self.in_features:
                raise PlanMismatchError(
                    f"Invalid shared_input entry (rank {self.rank}, projections {self.projections}) for width "
                    f"{self.in_features}."
                )
            return
        if self.kind == "low_rank":
            if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
                raise PlanMismatchError(
                    f"Unknown implementation {self.implementation!r}; this version of hf_vitcompress knows "
                    f"{IMPLEMENTATIONS}. Upgrade hf_vitcompress."
                )
            if self.rank is None or not 1 <= self.rank <= min(self.in_features, self.out_features):
                raise PlanMismatchError(
                    f"Invalid rank {self.rank} for a {self.in_features}->{self.out_features} linear."
                )
            return
        ranks_ok = (
            self.head_dim
            and self.qk_ranks is not None
            and self.vo_ranks is not None
            and len(self.qk_ranks) == len(self.vo_ranks) > 0
            and all(0 <= r <= self.head_dim for r in [*self.qk_ranks, *self.vo_ranks])
            and any(self.vo_ranks)
        )
        if not ranks_ok:
            raise PlanMismatchError(
                f"Invalid head ranks (head_dim={self.head_dim}, qk_ranks={self.qk_ranks}, vo_ranks={self.vo_ranks})."
            )

    @property
    def num_parameters(self) -> int:
        if self.kind == "head_factorized":
            return head_factorized_parameter_count(
                self.in_features, self.qk_ranks, self.vo_ranks, bool(self.qk_bias), self.bias
            )
        if self.kind == "pruned_linear":
            return self.in_features * self.out_features + self.out_features * self.bias
        if self.kind == "skipped_block":
            return 0
        return low_rank_parameter_count(self.in_features, self.out_features, self.rank, self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class CompressionPlan:
    """Per-module decisions plus the parameter accounting that justified them."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    dense_parameters: int = 0
    parameters: int = 0
    version: int = PLAN_VERSION
    tuning: dict[str, Any] | None = None  # what hf_vitcompress.tune measured and decided, on which device
    # how the factorization was chosen when the config left it to measurement: every candidate's held-out
    # output error and the winner (read by people and model cards, never needed to rebuild the model)
    selection: dict[str, Any] | None = None

    @property
    def shared_blocks(self) -> int:
        """How many attentions read one shared q/k/v down-projection (``shared_input`` entries)."""
        return sum(layer.kind == "shared_input" for layer in self.layers.values())

    @property
    def param_ratio(self) -> float:
        return self.parameters / self.dense_parameters if self.dense_parameters else 1.0

    def to_dict(self) -> dict[str, Any]:
        layers = self.layers.values()
        if any(layer.kind == "shared_input" for layer in layers):
            version = 3
        elif self.tuning is not None or any(layer.implementation for layer in layers):
            version = 2
        else:
            version = 1
        return {
            "version": version,
            "dense_parameters": self.dense_parameters,
            "parameters": self.parameters,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            **({"tuning": self.tuning} if self.tuning is not None else {}),
            **({"selection": self.selection} if self.selection is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict) or "layers" not in data:
            raise PlanMismatchError(f"Not a compression plan: {data!r:.200}")
        version = data.get("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise PlanMismatchError(
                f"This checkpoint's plan has version {version}; this hf_vitcompress understands up to {PLAN_VERSION}. "
                "Upgrade hf_vitcompress."
            )
        return cls(
            layers={name: LayerPlan(**layer) for name, layer in data["layers"].items()},
            dense_parameters=int(data.get("dense_parameters", 0)),
            parameters=int(data.get("parameters", 0)),
            version=version,
            tuning=data.get("tuning"),
            selection=data.get("selection"),
        )


def count_parameters(model: nn.Module) -> int:
    """Real parameter count (shared tensors counted once), as the saved checkpoint holds them."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _head_factorized_for(name: str, current: nn.Module, layer: LayerPlan) -> HeadFactorizedAttention:
    try:
        projections = [getattr(current, attr) for attr in attention_projection_names(current)]
    except ValueError:
        raise PlanMismatchError(
            f"The compression plan factorizes the heads of {name!r}, a {type(current).__name__} without "
            "q_proj/k_proj/v_proj/o_proj (or out_proj) linears."
        ) from None
    heads, head_dim = attention_heads(current), getattr(current, "head_dim", None)
    if (projections[0].in_features, heads, head_dim) != (layer.in_features, len(layer.qk_ranks), layer.head_dim):
        raise PlanMismatchError(
            f"The compression plan expects {name!r} to have width {layer.in_features} and {len(layer.qk_ranks)} heads "
            f"of {layer.head_dim}; the model has width {projections[0].in_features} and {heads} heads of {head_dim}."
        )
    return head_factorized_like(
        current, layer.head_dim, layer.qk_ranks, layer.vo_ranks, qk_bias=bool(layer.qk_bias), out_bias=layer.bias
    )


def _shared_input_for(name: str, current: nn.Module, layer: LayerPlan) -> nn.Module:
    try:
        linears = shareable_projections(current, layer.projections)
    except ValueError as error:
        raise PlanMismatchError(f"The compression plan shares the input of {name!r}: {error}") from error
    shape = projection_shape(linears)
    if shape != (layer.in_features, layer.out_features, layer.bias):
        raise PlanMismatchError(
            f"The compression plan expects {name!r}'s {layer.projections} to read width {layer.in_features} and "
            f"give {layer.out_features} outputs (bias={layer.bias}); the model's read {shape[0]} and give {shape[1]} "
            f"(bias={shape[2]})."
        )
    return share_input(current, layer.projections, layer.rank)


def rekey_plan(plan: CompressionPlan, model: nn.Module) -> CompressionPlan:
    """``plan`` with its module names as ``model`` names them.

    A plan names modules as the compressed model did: ``vit.layers.0.attention`` for a classifier,
    ``layers.0.attention`` for a bare ``ViTModel``. transformers loads a checkpoint into the other kind of
    model by adding or removing ``base_model_prefix`` on the weight names; the plan follows the same rule,
    so that a compressed classifier loads as a backbone (``AutoModel``) and a compressed backbone under a
    head. Entries for a part of the model that this kind of model does not have at all (a classifier when
    loading the backbone, the other head class's classifiers, a pooler built without) are dropped: their
    weights are then unexpected keys, which transformers reports as usual. Every other entry is kept, even
    one that names a missing module, for :func:`apply_plan_structure` to refuse. Plans of older checkpoints
    (always named after the compressed model) load unchanged.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return plan
    backbone = getattr(model, prefix, None)
    has_head = isinstance(backbone, nn.Module) and backbone is not model

    def has_root(module: nn.Module, name: str) -> bool:  # None children (no pooler) do not count
        return isinstance(getattr(module, name.split(".", 1)[0], None), nn.Module)

    layers: dict[str, LayerPlan] = {}
    for name, layer in plan.layers.items():
        prefixed = name.startswith(prefix + ".")
        if has_head:
            if prefixed or has_root(model, name):
                target = name
            elif has_root(backbone, name):
                target = f"{prefix}.{name}"
            else:
                continue
        else:
            target = name[len(prefix) + 1 :] if prefixed else name
            if not has_root(model, target):
                continue
        layers[target] = layer
    if list(layers) == list(plan.layers):
        return plan
    return replace(plan, layers=layers)


def apply_plan_structure(model: nn.Module, plan: CompressionPlan) -> None:
    """Swap every planned module (a linear, or an attention) for an uninitialized one of the planned shape.

    Used by ``from_pretrained`` before weights load. Fails loudly when the plan names a module the
    model does not have or whose shape differs, since loading would otherwise half-succeed.
    """
    for name, layer in plan.layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as error:
            raise PlanMismatchError(f"The compression plan names {name!r}, which this model does not have.") from error
        if layer.kind == "head_factorized":
            set_submodule(model, name, _head_factorized_for(name, current, layer))
            continue
        if layer.kind == "skipped_block":
            from .families import family_for  # families build on this module

            set_submodule(model, name, SkippedBlock(family_for(model).block_extra_outputs))
            continue
        if layer.kind == "shared_input":
            set_submodule(model, name, _shared_input_for(name, current, layer))
            continue
        if not isinstance(current, nn.Linear):
            raise PlanMismatchError(
                f"The compression plan names {name!r}, a {type(current).__name__}, not an nn.Linear."
            )
        if layer.kind == "pruned_linear":
            fits = (
                current.in_features >= layer.in_features
                and current.out_features >= layer.out_features
                and (current.bias is not None) == layer.bias
            )
            if not fits:
                raise PlanMismatchError(
                    f"The compression plan prunes {name!r} to {layer.in_features}->{layer.out_features} (bias={layer.bias}); "
                    f"the model has {current.in_features}->{current.out_features} (bias={current.bias is not None})."
                )
            factory = {"device": current.weight.device, "dtype": current.weight.dtype}
            set_submodule(model, name, nn.Linear(layer.in_features, layer.out_features, bias=layer.bias, **factory))
            continue
        if (current.in_features, current.out_features, current.bias is not None) != (
            layer.in_features,
            layer.out_features,
            layer.bias,
        ):
            raise PlanMismatchError(
                f"The compression plan expects {name!r} to be a {layer.in_features}->{layer.out_features} linear "
                f"(bias={layer.bias}); the model has {current.in_features}->{current.out_features} (bias={current.bias is not None})."
            )
        replacement = LowRankLinear(
            layer.in_features,
            layer.out_features,
            layer.rank,
            bias=layer.bias,
            device=current.weight.device,
            dtype=current.weight.dtype,
            implementation=layer.implementation or "factorized",
        )
        set_submodule(model, name, replacement)
