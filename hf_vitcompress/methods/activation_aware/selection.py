"""Choosing the factorization by the model's measured output error on held-out images.

A *candidate* is a factorization (input whitening × output weighting) and a rank allocation. Every
factorization costs one SVD per layer; allocations are spectrum-only; so scoring a candidate costs one
install and one forward pass over the held-out images. Each factorization's SVDs are computed once,
all its allocations scored, and only the best candidate's SVDs are kept (peak memory: two
factorizations' factors, not all of them).

The candidates are tried in a fixed order that is the prior (Gram whitening before diagonal before
none, no output weights before Fisher weights, global before uniform allocation), and a later one
replaces the current choice only when its held-out error is lower by more than two standard errors of
the paired per-image difference: with a few held-out images the choice stays with the prior instead of
following noise; with a few dozen, a clearly better factorization wins.

Why not decide by a rule: on DINOv2-S full Gram whitening is essential, on a small MNIST ViT
ASVD-style scaling wins and full whitening over-fits the calibration set, and on MiniLM uniform ranks
beat global allocation. Per-layer errors cannot tell these apart; the held-out output can.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ...budget import ALLOCATORS, DENSE, ParameterBudget, RankCandidate, make_budget
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...calibration.gram import LayerStatistics, PairedStatistics
from ...calibration.sensitivity import OutputSensitivity
from ...calibration.validation import HeldOutReference
from ...configuration import ALLOCATION_CHOICES, LOSS_WEIGHTING_CHOICES, WHITENING_CHOICES, CompressionConfig
from ...plan import count_parameters, set_submodule
from .factorization import WhitenedSVD, output_errors, output_matched_svd, whitened_svd


@dataclass(frozen=True)
class Factorization:
    """How each layer is factorized: the input whitening and whether output channels get Fisher weights."""

    whitening: str
    loss_weighting: str = "none"

    @property
    def label(self) -> str:
        return self.whitening + (" + fisher" if self.loss_weighting == "fisher" else "")


@dataclass
class CandidateScore:
    whitening: str
    loss_weighting: str
    rank_allocation: str
    output_error: float | None  # on the held-out images; None when nothing was measured (one candidate)
    parameters: int
    sequential: bool = False  # fitted block by block to the dense outputs (sequential='auto' tries it last)


@dataclass
class Selection:
    """The chosen candidate's factors and ranks, and the record of everything that was tried."""

    factorization: Factorization
    rank_allocation: str
    svds: dict[str, WhitenedSVD]
    ranks: dict[str, int | None]
    budget: ParameterBudget
    scores: list[CandidateScore]
    metric: str | None
    held_out_images: int
    seconds: float
    errors: torch.Tensor | None = None  # the winner's per-image held-out errors (None when nothing was measured)
    sequential: bool = False  # set when sequential='auto' kept the block-by-block fit

    def record(self) -> dict:
        """Plain data for the plan: what was tried, on what, and what won."""
        return {
            "metric": self.metric,
            "held_out_images": self.held_out_images,
            "chosen": {
                "whitening": self.factorization.whitening,
                "loss_weighting": self.factorization.loss_weighting,
                "rank_allocation": self.rank_allocation,
                "sequential": self.sequential,
            },
            "candidates": [asdict(score) for score in self.scores],
        }


def candidate_grid(config: CompressionConfig) -> list[tuple[Factorization, list[str]]]:
    """The factorizations to try (each with its allocations): every choice the config leaves at ``"auto"``."""

    def options(value: str, choices: tuple[str, ...]) -> list[str]:
        return [c for c in choices if c != "auto"] if value == "auto" else [value]

    allocations = options(config.rank_allocation, ALLOCATION_CHOICES)
    return [
        (Factorization(whitening, weighting), allocations)
        for whitening in options(config.whitening, WHITENING_CHOICES)
        for weighting in options(config.loss_weighting, LOSS_WEIGHTING_CHOICES)
    ]


def needs_selection(config: CompressionConfig) -> bool:
    """Whether anything is chosen by the held-out output error (so held-out images are set aside)."""
    return config.method == "activation_aware" and "auto" in (
        config.whitening,
        config.rank_allocation,
        config.loss_weighting,
        config.sequential,
    )


def needs_sensitivity(config: CompressionConfig) -> bool:
    return config.method == "activation_aware" and config.loss_weighting in ("auto", "fisher")


def factorize_layers(
    model: nn.Module,
    names: Sequence[str],
    statistics: dict[str, LayerStatistics] | None,
    factorization: Factorization,
    config: CompressionConfig,
    sensitivity: OutputSensitivity | None = None,
    release: bool = False,
    paired: PairedStatistics | None = None,
) -> dict[str, WhitenedSVD]:
    """The (weighted, whitened) SVD of each named linear.

    With ``paired`` (the statistics of the named linears' shared input in the compressed and the dense
    model), each layer is fitted to the dense layer's output instead (:func:`output_matched_svd`).

    ``release=True`` removes each layer's statistics from ``statistics`` as soon as its SVD exists, so
    the Gram matrices of all layers and the factors of all layers are never held at the same time
    (together they are most of calibration's peak memory).
    """
    svds = {}
    for name in names:
        layer_statistics = None
        if statistics:
            layer_statistics = statistics.pop(name, None) if release else statistics.get(name)
        weights = None
        if factorization.loss_weighting == "fisher":
            if sensitivity is None or name not in sensitivity.sums:
                raise ValueError(f"loss_weighting='fisher' needs output sensitivities for {name!r}.")
            weights = sensitivity.weights(name)
        if paired is not None:
            module = model.get_submodule(name)
            svds[name] = output_matched_svd(
                module.weight,
                paired,
                whitening=factorization.whitening,
                gram_shrinkage=config.gram_shrinkage,
                damping=config.damping,
                output_weights=weights,
                free_bias=module.bias is not None,
            )
            continue
        svds[name] = whitened_svd(
            model.get_submodule(name).weight,
            layer_statistics,
            whitening=factorization.whitening,
            gram_shrinkage=config.gram_shrinkage,
            damping=config.damping,
            output_weights=weights,
        )
    return svds


def rank_candidate(
    name: str,
    module: nn.Linear,
    svd: WhitenedSVD,
    normalization: str,
    statistics: LayerStatistics | None = None,
    output_weights: torch.Tensor | None = None,
    exact_spectrum: bool = True,
) -> RankCandidate:
    """The layer's error at every rank, for the allocator.

    ``exact_spectrum``: the SVD's discarded energy *is* the (weighted) output error (full Gram whitening,
    no shrinkage). Otherwise, and when ``statistics`` exist, the true output error is computed from the
    Gram (:func:`output_errors`). ``normalization="relative"`` divides by the layer's own output energy.
    """
    if exact_spectrum or statistics is None or statistics.tokens == 0:
        spectrum = svd.spectrum
        kept = torch.cat([spectrum.new_zeros(1), spectrum.cumsum(0)])
        errors = (kept[-1] - kept).clamp_min(0)  # errors[k] = energy discarded at rank k
    else:
        errors = output_errors(svd, statistics.mean_gram(), output_weights)
    if normalization == "relative":
        errors = errors / max(float(errors[0]), 1e-30)
    return RankCandidate(name, module.in_features, module.out_features, errors)


def _rounded(value: float | None) -> float | None:
    """Four significant digits: enough to compare candidates by eye, and the same on every process count."""
    return None if value is None else float(f"{value:.4g}")


def install_all(
    model: nn.Module,
    svds: dict[str, WhitenedSVD],
    ranks: dict[str, int | None],
    install: Callable,
    originals: dict[str, nn.Module] | None = None,
) -> None:
    """Install every layer whose rank is not ``DENSE``; ``originals`` (the dense linears) are put back first
    where ``model`` already holds other factors."""
    for name, rank in ranks.items():
        if rank is not DENSE:
            if originals is not None:
                set_submodule(model, name, originals[name])
            install(model, name, svds[name], rank)


def select_factorization(
    model: nn.Module,
    targets: Sequence[str],
    statistics: dict[str, LayerStatistics] | None,
    sensitivity: OutputSensitivity | None,
    reference: HeldOutReference | None,
    config: CompressionConfig,
    install: Callable[[nn.Module, str, WhitenedSVD, int], nn.Module],
    progress: Callable[[str], None] = lambda _message: None,
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> Selection:
    """Factorize ``targets`` every way the config allows and keep the one the held-out output error prefers.

    ``model`` is left with its dense targets (candidates are installed and removed again); the caller
    installs the winner. With a single candidate nothing is measured.
    """
    start = time.perf_counter()
    grid = candidate_grid(config)
    count = sum(len(allocations) for _, allocations in grid)
    measured = count > 1 or config.sequential == "auto"  # the block-by-block fit is compared with the winner
    if measured and (reference is None or reference.total_images() == 0):
        raise ValueError(
            "Choosing the factorization by measurement needs held-out calibration images, and none were held out "
            "(one image in every validation_interval is). Pass more calibration images, or fix the choice with "
            "whitening=..., rank_allocation=..., loss_weighting=... and sequential=... (none of them 'auto')."
        )
    originals = {name: model.get_submodule(name) for name in targets}
    total = count_parameters(model)
    best: Selection | None = None
    scores: list[CandidateScore] = []
    best_errors: torch.Tensor | None = None
    for factorization, allocations in grid:
        svds = factorize_layers(model, targets, statistics, factorization, config, sensitivity)
        weighted = factorization.loss_weighting == "fisher"
        exact = factorization.whitening == "gram" and config.gram_shrinkage == 0.0
        candidates = [
            rank_candidate(
                name,
                originals[name],
                svds[name],
                "absolute" if weighted else config.error_normalization,  # Fisher units already compare
                statistics.get(name) if statistics else None,
                sensitivity.weights(name) if weighted else None,
                exact_spectrum=exact,
            )
            for name in targets
        ]
        budget = make_budget(total, candidates, config.target_param_ratio)
        for allocation in allocations:
            ranks = ALLOCATORS[allocation](candidates, budget.candidate_budget)
            errors, error = None, None
            if measured:
                install_all(model, svds, ranks, install)
                parameters = count_parameters(model)
                errors = reference.per_image_errors(model)
                error = reference.total(errors)
                for name, module in originals.items():
                    set_submodule(model, name, module)
            else:
                parameters = budget.fixed_parameters + sum(c.cost(ranks[c.name]) for c in candidates)
            scores.append(
                CandidateScore(
                    factorization.whitening, factorization.loss_weighting, allocation, _rounded(error), parameters
                )
            )
            progress(f"{factorization.label}, {allocation}: held-out output error {_rounded(error)}")
            # the grid's order is the prior (Gram whitening and global allocation first): a later candidate
            # wins only by a margin the held-out images can tell from noise
            if best is None or reference.significantly_lower(errors, best_errors):
                best = Selection(factorization, allocation, svds, ranks, budget, [], None, 0, 0.0, errors)
                best_errors = errors
        del svds
    best.scores = scores
    best.metric = (
        None if not measured else ("kl_divergence" if reference.kind == "logits" else "relative_squared_feature_error")
    )
    best.held_out_images = reference.total_images() if reference is not None else 0
    best.seconds = time.perf_counter() - start
    processes.check_same(
        "the chosen factorization",
        (best.factorization.label, best.rank_allocation, sorted((name, rank) for name, rank in best.ranks.items())),
    )
    return best


def judge_sequential(
    model: nn.Module,
    selection: Selection,
    reference: HeldOutReference,
    one_shot: dict[str, WhitenedSVD],
    originals: dict[str, nn.Module],
    install: Callable[[nn.Module, str, WhitenedSVD, int], nn.Module],
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> bool:
    """``sequential='auto'``: keep the block-by-block fit now installed in ``model`` only if its held-out
    output error is lower than the one-shot winner's by more than two standard errors; otherwise install
    the one-shot factors again (``originals``: the dense linears they replace). Recorded as the last
    candidate of ``selection``; returns whether it was kept.

    It is judged end to end because fitting every layer closer to its dense output does not always lower
    the model's output error. What it cannot see is a change of domain: the held-out images come from the
    calibration stream, and on DINOv2-S calibrated on Fashion-MNIST it kept a fit that made the digits
    features worse (benchmarks/RESULTS.md).
    """
    errors = reference.per_image_errors(model)
    kept = reference.significantly_lower(errors, selection.errors)
    winner = (selection.factorization.whitening, selection.factorization.loss_weighting, selection.rank_allocation)
    chosen = next(
        score
        for score in selection.scores
        if not score.sequential and (score.whitening, score.loss_weighting, score.rank_allocation) == winner
    )
    selection.scores.append(
        replace(
            chosen, output_error=_rounded(reference.total(errors)), parameters=count_parameters(model), sequential=True
        )
    )
    if kept:
        selection.sequential, selection.errors = True, errors
    else:
        install_all(model, one_shot, selection.ranks, install, originals)
    processes.check_same("the sequential choice", kept)
    return kept
