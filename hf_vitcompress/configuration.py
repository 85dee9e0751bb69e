"""`CompressionConfig`: what the user asks for, as plain serializable data."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_METHODS = ("activation_aware", "head_factorization")
WHITENING_CHOICES = ("gram", "diagonal", "none")
ALLOCATION_CHOICES = ("global", "uniform")
NORMALIZATION_CHOICES = ("relative", "absolute")


@dataclass
class CompressionConfig:
    """What to compress and how hard. Validated on construction; round-trips through dict and JSON.

    The *plan* (what the method decided per module) is separate: see :class:`~hf_vitcompress.CompressionPlan`.
    The defaults of the activation-aware options are the combination that won the measurements in
    ``benchmarks/RESULTS.md`` (see ``benchmarks/lowrank_quality.py``).
    """

    method: str = field(default="activation_aware", metadata={"help": f"One of {SUPPORTED_METHODS}."})
    target_param_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the *whole model's* parameters to keep, in (0, 1]. Met exactly (to one rank step)."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Which linears to compress. None: every encoder block's attention and MLP linears. Entries are "
            "role names (q_proj, k_proj, v_proj, o_proj, fc1, fc2), or module names / dotted suffixes of "
            "other nn.Linear modules of the model (e.g. 'classifier')."
        },
    )
    calibration_samples: int = field(default=512, metadata={"help": "Number of calibration images used (at most)."})
    whitening: str = field(
        default="gram",
        metadata={
            "help": "'gram': full activation whitening (Cholesky of XᵀX); 'diagonal': ASVD-style per-channel "
            "scaling; 'none': plain weight SVD."
        },
    )
    gram_shrinkage: float = field(
        default=0.0,
        metadata={"help": "Shrink the Gram toward its diagonal: (1-a)·XᵀX + a·diag(XᵀX), a in [0, 1]."},
    )
    damping: float = field(
        default=1e-6,
        metadata={"help": "Ridge added to the Gram, relative to its mean diagonal (keeps Cholesky stable)."},
    )
    rank_allocation: str = field(
        default="global",
        metadata={
            "help": "'global': mixed ranks chosen across all layers to minimize error; 'uniform': same relative rank."
        },
    )
    error_normalization: str = field(
        default="relative",
        metadata={
            "help": "How layer errors are compared in global allocation: 'relative' (discarded energy / layer output "
            "energy) or 'absolute' (mean squared output error per token)."
        },
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "Factorize block by block, each layer calibrated on inputs from the already compressed layers."
        },
    )
    compensation_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank of the trained error-compensation residual per layer, part of the layer's rank (0 disables "
            "the stage; it then keeps only Gram matrices in memory instead of one block's activations). Default: 8 "
            "for activation_aware, 0 for head_factorization (which does not support it yet)."
        },
    )
    compensation_epochs: int = field(default=4, metadata={"help": "Passes over the calibration set per layer group."})
    compensation_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the compensation residual."})
    seed: int = field(default=0, metadata={"help": "Seed for anything random (compensation mini-batch order)."})

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(
                f"Unknown compression method {self.method!r}. Supported methods: {', '.join(SUPPORTED_METHODS)}."
            )
        if self.compensation_rank is None:
            self.compensation_rank = 8 if self.method == "activation_aware" else 0
        if self.method == "head_factorization":
            unsupported = {
                "sequential=True": self.sequential,
                f"compensation_rank={self.compensation_rank}": self.compensation_rank > 0,
                f"whitening={self.whitening!r}": self.whitening == "diagonal",
                f"rank_allocation={self.rank_allocation!r}": self.rank_allocation != "global",
            }
            chosen = [name for name, used in unsupported.items() if used]
            if chosen:
                raise ValueError(
                    f"method='head_factorization' does not support {', '.join(chosen)} yet (it factorizes one-shot "
                    "with whitening 'gram' or 'none' and global rank allocation)."
                )
        if isinstance(self.target_param_ratio, bool) or not isinstance(self.target_param_ratio, (int, float)):
            raise TypeError(f"target_param_ratio must be a number in (0, 1], got {self.target_param_ratio!r}.")
        self.target_param_ratio = float(self.target_param_ratio)
        if not 0.0 < self.target_param_ratio <= 1.0:
            raise ValueError(
                f"target_param_ratio must be in (0, 1] (the fraction of parameters to keep), got {self.target_param_ratio}."
            )
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            bad = [name for name in self.target_modules if not isinstance(name, str) or not name.strip()]
            if bad or not self.target_modules:
                raise ValueError(
                    f"target_modules must be a non-empty list of module names, got {self.target_modules!r}."
                )
        _check_choice("whitening", self.whitening, WHITENING_CHOICES)
        _check_choice("rank_allocation", self.rank_allocation, ALLOCATION_CHOICES)
        _check_choice("error_normalization", self.error_normalization, NORMALIZATION_CHOICES)
        if not 0.0 <= self.gram_shrinkage <= 1.0:
            raise ValueError(f"gram_shrinkage must be in [0, 1], got {self.gram_shrinkage}.")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}.")
        for name in ("calibration_samples",):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.compensation_rank < 0 or self.compensation_epochs < 0 or self.compensation_lr <= 0:
            raise ValueError(
                "compensation_rank and compensation_epochs must be >= 0 and compensation_lr > 0, got "
                f"{self.compensation_rank}, {self.compensation_epochs}, {self.compensation_lr}."
            )

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown CompressionConfig field(s): {', '.join(unknown)}. Known fields: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CompressionConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
