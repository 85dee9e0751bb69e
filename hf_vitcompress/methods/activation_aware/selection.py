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
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ...budget import (
    ALLOCATORS,
    DENSE,
    SHARED,
    JointCandidate,
    ParameterBudget,
    RankCandidate,
    allocated_parameters,
    make_budget,
)
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...calibration.gram import LayerStatistics, PairedStatistics
from ...calibration.sensitivity import OutputSensitivity
from ...calibration.validation import HeldOutReference
from ...configuration import ALLOCATION_CHOICES, LOSS_WEIGHTING_CHOICES, WHITENING_CHOICES, CompressionConfig
from ...plan import count_parameters, set_submodule
from ...shared_input import shareable_projections
from .factorization import WhitenedSVD, output_errors, output_matched_svd, whitened_svd


@dataclass(frozen=True)
class SharedGroup:
    """Linears of one module that read the same input (an attention's q, k, v) and may share one
    down-projection (:mod:`hf_vitcompress.shared_input`); ``parent`` is that module's name, and the name
    under which the allocation and the factors of the shared form are kept."""

    parent: str
    members: tuple[str, ...]

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name.rsplit(".", 1)[1] for name in self.members)


def shared_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> list[SharedGroup]:
    """The groups (full linear names) that can share a down-projection: two or more plain linears of one parent
    module, of one input width, biased alike."""
    found = []
    for group in groups:
        parents = {name.rsplit(".", 1)[0] for name in group}
        if len(group) < 2 or len(parents) != 1:
            continue
        shared = SharedGroup(parents.pop(), tuple(group))
        try:
            shareable_projections(model.get_submodule(shared.parent), shared.projections)
        except ValueError:
            continue
        found.append(shared)
    return found


def dense_modules(model: nn.Module, targets: Sequence[str], groups: Sequence[SharedGroup] = ()) -> dict[str, nn.Module]:
    """The modules compression may replace, to put back later: the parents of shared groups first (putting one
    back undoes its shared form), then the linears."""
    names = [group.parent for group in groups] + list(targets)
    return {name: model.get_submodule(name) for name in names}


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        set_submodule(model, name, module)


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
    shared_qkv: int = 0  # how many q/k/v groups the allocation gave one shared down-projection


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
    # the output weights each shared group's stacked factorization used (sequential calibration refits with them)
    shared_weights: dict[str, torch.Tensor | None] = field(default_factory=dict)

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
                "shared_qkv": sum(name in self.ranks for name in self.shared_weights),
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
        config.shared_qkv,
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


def layer_errors(
    svd: WhitenedSVD,
    statistics: LayerStatistics | None = None,
    output_weights: torch.Tensor | None = None,
    exact_spectrum: bool = True,
) -> torch.Tensor:
    """``errors[k]``: the layer's (weighted) mean output error per token at rank ``k``; ``errors[0]`` is its
    output energy.

    ``exact_spectrum``: the SVD's discarded energy *is* that error (full Gram whitening, no shrinkage).
    Otherwise, and when ``statistics`` exist, the true output error is computed from the Gram
    (:func:`output_errors`)."""
    if exact_spectrum or statistics is None or statistics.tokens == 0:
        spectrum = svd.spectrum
        kept = torch.cat([spectrum.new_zeros(1), spectrum.cumsum(0)])
        return (kept[-1] - kept).clamp_min(0)  # errors[k] = energy discarded at rank k
    return output_errors(svd, statistics.mean_gram(), output_weights)


def rank_candidate(
    name: str,
    module: nn.Linear,
    svd: WhitenedSVD,
    normalization: str,
    statistics: LayerStatistics | None = None,
    output_weights: torch.Tensor | None = None,
    exact_spectrum: bool = True,
) -> RankCandidate:
    """The layer's error at every rank (:func:`layer_errors`), for the allocator;
    ``normalization="relative"`` divides by the layer's own output energy."""
    errors = layer_errors(svd, statistics, output_weights, exact_spectrum)
    if normalization == "relative":
        errors = relative_errors(errors)
    return RankCandidate(name, module.in_features, module.out_features, errors)


def relative_errors(errors: torch.Tensor) -> torch.Tensor:
    """A layer's errors divided by its own output energy (``errors[0]``)."""
    return errors / max(float(errors[0]), 1e-30)


def factorize_shared(
    model: nn.Module,
    group: SharedGroup,
    statistics: dict[str, LayerStatistics] | None,
    factorization: Factorization,
    config: CompressionConfig,
    output_weights: torch.Tensor | None,
    paired: PairedStatistics | None = None,
) -> WhitenedSVD:
    """The factorization of the group's stacked weights ``[W_q; W_k; W_v]`` (one shared down-projection), with
    ``output_weights`` over the stacked outputs, so that its errors are in the units of the members' own
    (Fisher weights, or each member's rows divided by its output energy for relative errors). Fitted to the
    dense outputs when ``paired`` is given, as :func:`factorize_layers` does. ``model``'s members must still
    be the dense linears."""
    linears = [model.get_submodule(name) for name in group.members]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    options = {
        "whitening": factorization.whitening,
        "gram_shrinkage": config.gram_shrinkage,
        "damping": config.damping,
        "output_weights": output_weights,
    }
    if paired is not None:
        svd = output_matched_svd(weight, paired, free_bias=linears[0].bias is not None, **options)
    else:
        svd = whitened_svd(weight, statistics.get(group.members[0]) if statistics else None, **options)
    svd.split = tuple((name, linear.out_features) for name, linear in zip(group.projections, linears, strict=True))
    return svd


def shared_candidates(
    model: nn.Module,
    groups: Sequence[SharedGroup],
    candidates: dict[str, RankCandidate],
    energies: dict[str, float],
    statistics: dict[str, LayerStatistics] | None,
    factorization: Factorization,
    config: CompressionConfig,
    sensitivity: OutputSensitivity | None,
    exact_spectrum: bool,
) -> tuple[list[JointCandidate], dict[str, WhitenedSVD], dict[str, torch.Tensor | None]]:
    """Each shared group's joint candidate (errors in the units of its members' candidates), its factors, and
    the output weights they were computed with."""
    joints, svds, weights = [], {}, {}
    for group in groups:
        if factorization.loss_weighting == "fisher":
            output_weights = torch.cat([sensitivity.weights(name) for name in group.members])
        elif config.error_normalization == "relative":
            output_weights = torch.cat(
                [
                    torch.full((candidates[name].out_features,), 1.0 / max(energies[name], 1e-30), dtype=torch.float64)
                    for name in group.members
                ]
            )
        else:
            output_weights = None
        svd = factorize_shared(model, group, statistics, factorization, config, output_weights)
        layer_statistics = statistics.get(group.members[0]) if statistics else None
        errors = layer_errors(svd, layer_statistics, output_weights, exact_spectrum)
        members = [candidates[name] for name in group.members]
        out_features = sum(member.out_features for member in members)
        joint = RankCandidate(
            group.parent,
            members[0].in_features,
            out_features,
            errors,
            dense_parameters=sum(m.dense_cost for m in members),
        )
        joints.append(JointCandidate(joint, group.members))
        svds[group.parent], weights[group.parent] = svd, output_weights
    return joints, svds, weights


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
    """Install every layer whose rank is not ``DENSE`` (and every shared group that was allocated a rank, under its
    parent's name); ``originals`` (:func:`dense_modules`) are put back first where ``model`` already holds other
    factors."""
    shared_first = sorted(ranks, key=lambda name: name not in svds or svds[name].split is None)
    for name in shared_first:  # a parent first, so that its linears installed later land in its shared form
        rank = ranks[name]
        if rank is not DENSE and rank != SHARED:  # a shared member is installed with its group's parent
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
    groups: Sequence[SharedGroup] = (),
) -> Selection:
    """Factorize ``targets`` every way the config allows and keep the one the held-out output error prefers.

    ``groups`` may share a down-projection: with ``shared_qkv=True`` every global allocation may give each
    one a shared projection instead of three pairs; with ``'auto'`` the winner is tried once more that way
    and kept only if its held-out error is lower by two standard errors.

    ``model`` is left with its dense targets (candidates are installed and removed again); the caller
    installs the winner. With a single candidate nothing is measured.
    """
    start = time.perf_counter()
    grid = candidate_grid(config)
    groups = list(groups)
    count = sum(len(allocations) for _, allocations in grid)
    # the block-by-block fit and the shared projections are compared with the winner
    measured = count > 1 or config.sequential == "auto" or (config.shared_qkv == "auto" and bool(groups))
    if measured and (reference is None or reference.total_images() == 0):
        raise ValueError(
            "Choosing the factorization by measurement needs held-out calibration images, and none were held out "
            "(one image in every validation_interval is). Pass more calibration images, or fix the choice with "
            "whitening=..., rank_allocation=..., loss_weighting=..., sequential=... and shared_qkv=... (none of them "
            "'auto')."
        )
    originals = dense_modules(model, targets, groups)
    total = count_parameters(model)
    best: Selection | None = None
    scores: list[CandidateScore] = []

    def score(factorization, allocation, svds, ranks, budget, candidates, joints, weights) -> None:
        nonlocal best
        errors, error = None, None
        if measured:
            install_all(model, svds, ranks, install)
            parameters = count_parameters(model)
            errors = reference.per_image_errors(model)
            error = reference.total(errors)
            restore(model, originals)
        else:
            parameters = budget.fixed_parameters + allocated_parameters(candidates, joints, ranks)
        shared = sum(joint.candidate.name in ranks for joint in joints)
        scores.append(
            CandidateScore(
                factorization.whitening,
                factorization.loss_weighting,
                allocation,
                _rounded(error),
                parameters,
                shared_qkv=shared,
            )
        )
        label = f"{factorization.label}, {allocation}" + (f", {shared} shared q/k/v" if shared else "")
        progress(f"{label}: held-out output error {_rounded(error)}")
        # the grid's order is the prior (Gram whitening and global allocation first): a later candidate
        # wins only by a margin the held-out images can tell from noise
        if best is None or reference.significantly_lower(errors, best.errors):
            best = Selection(factorization, allocation, svds, ranks, budget, [], None, 0, 0.0, errors, False, weights)

    def factorize(factorization: Factorization, with_groups: bool, svds: dict[str, WhitenedSVD] | None = None):
        if svds is None:
            svds = factorize_layers(model, targets, statistics, factorization, config, sensitivity)
        weighted = factorization.loss_weighting == "fisher"
        exact = factorization.whitening == "gram" and config.gram_shrinkage == 0.0
        raw = {
            name: layer_errors(
                svds[name],
                statistics.get(name) if statistics else None,
                sensitivity.weights(name) if weighted else None,
                exact,
            )
            for name in targets
        }
        relative = not weighted and config.error_normalization == "relative"  # Fisher units already compare
        candidates = {
            name: RankCandidate(
                name,
                originals[name].in_features,
                originals[name].out_features,
                relative_errors(raw[name]) if relative else raw[name],
            )
            for name in targets
        }
        joints, weights = [], {}
        if with_groups and groups:
            energies = {name: float(errors[0]) for name, errors in raw.items()}
            joints, joint_svds, weights = shared_candidates(
                model, groups, candidates, energies, statistics, factorization, config, sensitivity, exact
            )
            svds.update(joint_svds)
        candidates = list(candidates.values())
        return svds, candidates, joints, weights, make_budget(total, candidates, config.target_param_ratio)

    for factorization, allocations in grid:
        svds, candidates, joints, weights, budget = factorize(factorization, config.shared_qkv is True)
        for allocation in allocations:
            ranks = ALLOCATORS[allocation](candidates, budget.candidate_budget, joints)
            score(factorization, allocation, svds, ranks, budget, candidates, joints, weights)
        del svds
    if config.shared_qkv == "auto" and groups and best.rank_allocation == "global":
        # the winner once more with shared projections allowed: worth a held-out pass only if some were taken
        svds, candidates, joints, weights, budget = factorize(best.factorization, True, dict(best.svds))
        ranks = ALLOCATORS["global"](candidates, budget.candidate_budget, joints)
        if any(joint.candidate.name in ranks for joint in joints):
            score(best.factorization, "global", svds, ranks, budget, candidates, joints, weights)
        del svds
    best.scores = scores
    best.metric = (
        None if not measured else ("kl_divergence" if reference.kind == "logits" else "relative_squared_feature_error")
    )
    best.held_out_images = reference.total_images() if reference is not None else 0
    best.seconds = time.perf_counter() - start
    processes.check_same(
        "the chosen factorization",
        (
            best.factorization.label,
            best.rank_allocation,
            sorted((name, str(rank)) for name, rank in best.ranks.items()),
        ),
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
    shared = sum(name in selection.ranks for name in selection.shared_weights)
    winner = (
        selection.factorization.whitening,
        selection.factorization.loss_weighting,
        selection.rank_allocation,
        shared,
    )
    chosen = next(
        score
        for score in selection.scores
        if not score.sequential
        and (score.whitening, score.loss_weighting, score.rank_allocation, score.shared_qkv) == winner
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
