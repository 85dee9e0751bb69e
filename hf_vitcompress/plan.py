"""The compression *plan*: what a method decided for each module, as plain data.

The plan is the one object every part agrees on. It lives in the compressed model's config
(``config.compression_plan``) and is all that is needed to rebuild the architecture before the
weights load: loaders read only the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .layers import LowRankLinear, low_rank_parameter_count

PLAN_VERSION = 1


class PlanMismatchError(ValueError):
    """The plan does not match the model (or the checkpoint) it is applied to."""


@dataclass
class LayerPlan:
    """What became of one ``nn.Linear``. ``kind="low_rank"``: a :class:`LowRankLinear` of ``rank``."""

    kind: str
    in_features: int
    out_features: int
    bias: bool
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind != "low_rank":
            raise PlanMismatchError(
                f"Unknown layer plan kind {self.kind!r}; this version of hf_vitcompress knows 'low_rank'."
            )
        if self.rank is None or not 1 <= self.rank <= min(self.in_features, self.out_features):
            raise PlanMismatchError(f"Invalid rank {self.rank} for a {self.in_features}->{self.out_features} linear.")

    @property
    def num_parameters(self) -> int:
        return low_rank_parameter_count(self.in_features, self.out_features, self.rank, self.bias)


@dataclass
class CompressionPlan:
    """Per-module decisions plus the parameter accounting that justified them."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    dense_parameters: int = 0
    parameters: int = 0
    version: int = PLAN_VERSION

    @property
    def param_ratio(self) -> float:
        return self.parameters / self.dense_parameters if self.dense_parameters else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "dense_parameters": self.dense_parameters,
            "parameters": self.parameters,
            "layers": {name: asdict(layer) for name, layer in self.layers.items()},
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


def apply_plan_structure(model: nn.Module, plan: CompressionPlan) -> None:
    """Swap every planned ``nn.Linear`` for an (uninitialized) module of the planned shape.

    Used by ``from_pretrained`` before weights load. Fails loudly when the plan names a module the
    model does not have or whose shape differs, since loading would otherwise half-succeed.
    """
    for name, layer in plan.layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as error:
            raise PlanMismatchError(f"The compression plan names {name!r}, which this model does not have.") from error
        if not isinstance(current, nn.Linear):
            raise PlanMismatchError(
                f"The compression plan names {name!r}, a {type(current).__name__}, not an nn.Linear."
            )
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
        )
        set_submodule(model, name, replacement)
