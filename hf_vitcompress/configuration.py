"""`CompressionConfig`: what the user asks for, as plain serializable data."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_METHODS = ("activation_aware", "head_factorization", "pruning")
IMPORTANCE_CHOICES = ("magnitude", "taylor")
WHITENING_CHOICES = ("auto", "gram", "diagonal", "none")
ALLOCATION_CHOICES = ("auto", "global", "uniform")
LOSS_WEIGHTING_CHOICES = ("auto", "none", "fisher")
NORMALIZATION_CHOICES = ("relative", "absolute")


@dataclass
class CompressionConfig:
    """What to compress and how hard. Validated on construction; round-trips through dict and JSON.

    The *plan* (what the method decided per module) is separate: see :class:`~hf_vitcompress.CompressionPlan`.
    The activation-aware defaults leave the factorization to measurement: with ``whitening``,
    ``rank_allocation`` and ``loss_weighting`` at ``"auto"``, every combination is tried and the one with
    the lowest output error on held-out calibration images is kept (``compression_plan["selection"]``
    records every candidate's score), because the best fixed setting differs between real models
    (``benchmarks/lowrank_quality.py``, ``benchmarks/RESULTS.md``).
    """

    method: str = field(default="activation_aware", metadata={"help": f"One of {SUPPORTED_METHODS}."})
    target_param_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the *whole model's* parameters to keep, in (0, 1]. Met exactly (to one rank step). "
            "Default 0.5 for the factorization methods; method='pruning' is budgeted by target_flops_ratio instead."
        },
    )
    target_flops_ratio: float | None = field(
        default=None,
        metadata={
            "help": "method='pruning' only: fraction of the dense model's multiply-accumulates per image to keep, in "
            "(0, 1] (every linear, the patch embedding and both attention matmuls counted). The exported model meets it "
            "from below, to one MLP neuron."
        },
    )
    skip_blocks: bool = field(
        default=False,
        metadata={"help": "method='pruning' only: whole encoder blocks may be skipped (learned block gates)."},
    )
    pruning_importance: str = field(
        default="magnitude",
        metadata={
            "help": "method='pruning', one-shot (compress()): how groups are ranked, 'magnitude' (squared weight norm "
            "of the group) or 'taylor' ((Σ gradient·weight)² over the calibration data)."
        },
    )
    pruning_warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "PruningTrainer: fraction of the training steps spent distilling before the search starts."},
    )
    pruning_search_ratio: float = field(
        default=0.4,
        metadata={
            "help": "PruningTrainer: fraction of the training steps of primal-dual search; the rest is post-training "
            "with the structure fixed (projected onto the budget when the search ends)."
        },
    )
    pruning_count_lr: float = field(
        default=0.05,
        metadata={"help": "PruningTrainer: step size of the pruned-fraction variables (per layer and group kind)."},
    )
    pruning_dual_lr: float = field(
        default=0.1,
        metadata={"help": "PruningTrainer: dual-ascent step size of the FLOPs multiplier."},
    )
    pruning_proximal_lr: float = field(
        default=0.01,
        metadata={
            "help": "PruningTrainer: dual-ascent step size of the group-sparsity multiplier, whose proximal step "
            "shrinks the groups currently selected for pruning toward zero."
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
        default="auto",
        metadata={
            "help": "'gram': full activation whitening (Cholesky of XᵀX); 'diagonal': ASVD-style per-channel "
            "scaling; 'none': plain weight SVD; 'auto': each is tried and the lowest held-out output error wins "
            "(head_factorization: 'auto' means 'gram')."
        },
    )
    loss_weighting: str = field(
        default="auto",
        metadata={
            "help": "method='activation_aware': 'fisher' weights each output channel's error by how much it "
            "reaches the model's output (a Fisher diagonal from label-free backward passes, "
            "sensitivity_samples images), which also makes global allocation loss-aware; 'none' does not; "
            "'auto' tries both."
        },
    )
    sensitivity_samples: int = field(
        default=128,
        metadata={"help": "Calibration images given a backward pass for the Fisher output weights."},
    )
    validation_interval: int = field(
        default=8,
        metadata={
            "help": "When anything is 'auto': one calibration image in every validation_interval is held out of "
            "the statistics and the candidates are scored by the model's output error on those images (KL of "
            "the logits for a classifier, relative error of last_hidden_state for a backbone)."
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
        default="auto",
        metadata={
            "help": "'global': mixed ranks chosen across all layers to minimize the summed error (the true output "
            "error of each layer, from its Gram; Fisher-weighted with loss_weighting='fisher'); 'uniform': the "
            "same relative rank everywhere; 'auto': both are tried (head_factorization: 'auto' means 'global')."
        },
    )
    error_normalization: str = field(
        default="relative",
        metadata={
            "help": "How layer errors are compared in global allocation without Fisher weights: 'relative' (output "
            "error / layer output energy) or 'absolute' (mean squared output error per token). Fisher-weighted "
            "errors are already in units of the model's output error and are compared as they are."
        },
    )
    sequential: bool | str = field(
        default=False,
        metadata={
            "help": "True: factorize block by block, each layer fitted to the dense layer's output on the inputs the "
            "already compressed layers produce (the least-squares map, then its whitened SVD, and a corrected bias); "
            "'auto': do that and keep it only where the held-out output error drops. Default False: it fits the "
            "calibration distribution closer, which helped all-MiniLM-L6-v2 and the Fashion-MNIST ViT (measured on "
            "that distribution) and made DINOv2-S worse on another domain than it was calibrated on, where 'auto' "
            "kept it too, for twice the compression time (benchmarks/RESULTS.md)."
        },
    )
    shared_qkv: bool | str | None = field(
        default=None,
        metadata={
            "help": "True: global allocation may give each block's q/k/v one shared down-projection (one r x d matrix "
            "computed once, and three up-projections) instead of three factor pairs, wherever that lowers the summed "
            "error at equal weights; 'auto': the chosen factorization is tried that way too and kept only where the "
            "held-out output error drops; False: never. Default (None): True for method='activation_aware' without "
            "compensation (it lowered the error of DINOv2-S, all-MiniLM-L6-v2 and the ViTs trained here at most "
            "ratios, benchmarks/RESULTS.md), False otherwise."
        },
    )
    compensation_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank of the trained error-compensation residual per layer, part of the layer's rank (0 disables "
            "the stage; it then keeps only Gram matrices in memory instead of one block's activations). Default 0: on "
            "all-MiniLM-L6-v2 it added at most 0.005 of embedding cosine on top of the default for 4-6x the "
            "compression time (benchmarks/lowrank_quality.py, benchmarks/RESULTS.md)."
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
        if self.method == "pruning":
            if self.target_param_ratio is not None:
                raise ValueError(
                    "method='pruning' is budgeted in FLOPs: set target_flops_ratio (e.g. 0.5), not target_param_ratio."
                )
            if self.target_flops_ratio is None:
                raise ValueError("method='pruning' needs target_flops_ratio, the fraction of FLOPs to keep (e.g. 0.5).")
            _check_ratio("target_flops_ratio", self.target_flops_ratio)
            self.target_flops_ratio = float(self.target_flops_ratio)
            _check_choice("pruning_importance", self.pruning_importance, IMPORTANCE_CHOICES)
            stages = (self.pruning_warmup_ratio, self.pruning_search_ratio)
            if min(stages) < 0 or sum(stages) > 1:
                raise ValueError(
                    "pruning_warmup_ratio and pruning_search_ratio must be >= 0 and sum to at most 1, got "
                    f"{self.pruning_warmup_ratio} and {self.pruning_search_ratio}."
                )
            if min(self.pruning_count_lr, self.pruning_dual_lr, self.pruning_proximal_lr) < 0:
                raise ValueError("pruning_count_lr, pruning_dual_lr and pruning_proximal_lr must be >= 0.")
        else:
            if self.target_flops_ratio is not None or self.skip_blocks:
                raise ValueError(
                    f"target_flops_ratio and skip_blocks belong to method='pruning'; method={self.method!r} is budgeted "
                    "by target_param_ratio."
                )
            if self.target_param_ratio is None:
                self.target_param_ratio = 0.5
        if self.compensation_rank is None:
            self.compensation_rank = 0
        if self.shared_qkv is None:  # the default: wherever it can apply
            self.shared_qkv = self.method == "activation_aware" and self.compensation_rank == 0
        if self.method == "head_factorization":
            # one-shot Gram-whitened with global allocation is what it supports; "auto" means exactly that
            self.whitening = "gram" if self.whitening == "auto" else self.whitening
            self.rank_allocation = "global" if self.rank_allocation == "auto" else self.rank_allocation
            self.loss_weighting = "none" if self.loss_weighting == "auto" else self.loss_weighting
            self.sequential = False if self.sequential == "auto" else self.sequential
            unsupported = {
                "sequential=True": self.sequential is True,
                f"compensation_rank={self.compensation_rank}": self.compensation_rank > 0,
                f"whitening={self.whitening!r}": self.whitening == "diagonal",
                f"rank_allocation={self.rank_allocation!r}": self.rank_allocation != "global",
                f"loss_weighting={self.loss_weighting!r}": self.loss_weighting != "none",
            }
            chosen = [name for name, used in unsupported.items() if used]
            if chosen:
                raise ValueError(
                    f"method='head_factorization' does not support {', '.join(chosen)} yet (it factorizes one-shot "
                    "with whitening 'gram' or 'none', global rank allocation and no loss weighting)."
                )
        if self.target_param_ratio is not None:
            _check_ratio("target_param_ratio", self.target_param_ratio)
            self.target_param_ratio = float(self.target_param_ratio)
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
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTING_CHOICES)
        for name in ("sequential", "shared_qkv"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}.")
        if self.shared_qkv and (self.method != "activation_aware" or self.compensation_rank > 0):
            if self.shared_qkv is True and self.method != "activation_aware":
                raise ValueError(
                    f"shared_qkv=True belongs to method='activation_aware'; {self.method} keeps q/k/v separate."
                )
            if self.shared_qkv is True:
                raise ValueError(
                    "shared_qkv=True cannot be combined with compensation_rank > 0 (the compensation residual is "
                    "trained per linear); set one of them off."
                )
            self.shared_qkv = False  # 'auto' where it cannot apply: the per-layer form
        if not 0.0 <= self.gram_shrinkage <= 1.0:
            raise ValueError(f"gram_shrinkage must be in [0, 1], got {self.gram_shrinkage}.")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}.")
        for name in ("calibration_samples", "sensitivity_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if isinstance(self.validation_interval, bool) or int(self.validation_interval) < 2:
            raise ValueError(
                f"validation_interval must be an integer >= 2 (one image in that many is held out), got "
                f"{self.validation_interval!r}."
            )
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


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}.")
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction to keep), got {value}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
