"""Activation-aware mixed-rank factorization (seed: Azizi, Nazemi, Pedram 2024, arXiv 2402.06004).

Pipeline, each step optional where the config says so:

1. one streaming pass over the calibration set: the input Gram of every target linear (dense model);
2. per layer, a whitened SVD, which gives the output error of every candidate rank;
3. one global rank allocation to the whole-model parameter budget (``budget.py``);
4. installing the factor pairs, either all at once from the dense statistics, or block by block
   (``sequential=True``: each layer re-calibrated on the compressed model's own activations), with
   the error-compensation residual trained per layer group (``compensation_rank > 0``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import ALLOCATORS, DENSE, RankCandidate, make_budget
from ...calibration.blocks import BlockInputs, capture_block_inputs, capture_module_input
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...calibration.gram import LayerStatistics, record_linear_inputs, sum_over_processes
from ...configuration import CompressionConfig
from ...layers import LowRankLinear
from ...plan import CompressionPlan, LayerPlan, count_parameters, set_submodule
from .compensation import CompensationResult, train_compensation
from .factorization import WhitenedSVD, whitened_svd


@dataclass
class CompressionReport:
    """What happened, for logs and tests (not saved: the plan is what is saved)."""

    solvers: dict[str, str] = field(default_factory=dict)
    compensation: list[CompensationResult] = field(default_factory=list)


def _forward(model: nn.Module, batch: torch.Tensor | dict) -> None:
    """Vision models get ``pixel_values``; a dict batch is passed as keyword arguments (any encoder)."""
    if isinstance(batch, dict):
        model(**batch)
    else:
        model(pixel_values=batch)


def needs_calibration(config: CompressionConfig) -> bool:
    """Whether ``config`` needs calibration images (every method answers here, so ``compress`` asks once)."""
    if config.method == "pruning":
        return config.pruning_importance == "taylor"
    return config.whitening != "none" or config.sequential or config.compensation_rank > 0


def _factorize(
    model: nn.Module,
    names: Sequence[str],
    statistics: dict[str, LayerStatistics] | None,
    config: CompressionConfig,
    release: bool = False,
) -> dict[str, WhitenedSVD]:
    """The whitened SVD of each named linear.

    ``release=True`` removes each layer's statistics from ``statistics`` as soon as its SVD exists, so
    the Gram matrices of all layers and the factors of all layers are never held at the same time
    (together they are most of calibration's peak memory).
    """
    svds = {}
    for name in names:
        layer_statistics = None
        if statistics:
            layer_statistics = statistics.pop(name, None) if release else statistics.get(name)
        svds[name] = whitened_svd(
            model.get_submodule(name).weight,
            layer_statistics,
            whitening=config.whitening,
            gram_shrinkage=config.gram_shrinkage,
            damping=config.damping,
        )
        del layer_statistics
    return svds


def _candidate(name: str, module: nn.Linear, svd: WhitenedSVD, normalization: str) -> RankCandidate:
    spectrum = svd.spectrum
    kept = torch.cat([spectrum.new_zeros(1), spectrum.cumsum(0)])
    errors = (kept[-1] - kept).clamp_min(0)  # errors[k] = energy discarded at rank k
    if normalization == "relative":
        errors = errors / max(float(kept[-1]), 1e-30)
    return RankCandidate(name, module.in_features, module.out_features, errors)


def _install(model: nn.Module, name: str, svd: WhitenedSVD, rank: int) -> LowRankLinear:
    dense = model.get_submodule(name)
    up, down = svd.factors(rank)
    layer = LowRankLinear.from_factors(
        up.to(dense.weight.dtype), down.to(dense.weight.dtype), None if dense.bias is None else dense.bias.detach()
    )
    layer.to(dense.weight.device)
    set_submodule(model, name, layer)
    return layer


def compress_activation_aware(
    model: nn.Module,
    dense_model: nn.Module,
    block_groups: list[list[list[str]]],
    extra_targets: list[str],
    config: CompressionConfig,
    batches: Iterator[torch.Tensor | dict] | None,
    blocks: tuple[nn.ModuleList, nn.ModuleList],
    progress: bool = True,
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> tuple[CompressionPlan, CompressionReport]:
    """Factorize ``model``'s targets in place (``model`` is a private copy of ``dense_model``).

    ``block_groups[b][g]`` lists the target linears of group ``g`` of block ``b``; ``blocks`` is
    ``(dense_blocks, working_blocks)``; ``batches`` yields ``pixel_values`` tensors (or dicts of
    forward keyword arguments). Nothing here is vision-specific: :func:`hf_vitcompress.compress`
    supplies the family's layout. Returns the plan and a report.

    With several ``processes``, ``batches`` is this process's share: every statistic is summed over
    processes and the compensation residuals are trained data-parallel, so all processes end equal.
    """
    report = CompressionReport()
    targets = [name for block in block_groups for group in block for name in group] + list(extra_targets)
    block_wise = config.sequential or config.compensation_rank > 0

    # 1. dense statistics (also keep the first block's inputs when going block by block)
    statistics: dict[str, LayerStatistics] | None = None
    first_inputs = BlockInputs()
    if batches is not None:
        statistics = {}
        model.eval()
        with (
            processes.together("the calibration pass"),
            torch.no_grad(),
            record_linear_inputs(model, targets, statistics),
        ):
            if block_wise:
                with capture_block_inputs(blocks[1][0], first_inputs):
                    for batch in tqdm(batches, desc="calibration", disable=not progress, unit="batch"):
                        _forward(model, batch)
            else:
                for batch in tqdm(batches, desc="calibration", disable=not progress, unit="batch"):
                    _forward(model, batch)
        sum_over_processes(statistics, processes, model)

    # 2-3. spectra and one global allocation
    svds = _factorize(
        model, tqdm(targets, desc="factorization", disable=not progress, unit="layer"), statistics, config, release=True
    )
    candidates = [
        _candidate(name, model.get_submodule(name), svds[name], config.error_normalization) for name in targets
    ]
    budget = make_budget(count_parameters(model), candidates, config.target_param_ratio)
    ranks = ALLOCATORS[config.rank_allocation](candidates, budget.candidate_budget)
    processes.check_same("the rank allocation", {name: None if rank is DENSE else rank for name, rank in ranks.items()})
    report.solvers = {name: svd.solver for name, svd in svds.items()}

    # 4. install
    if not block_wise:
        for name in targets:
            if ranks[name] is not DENSE:
                _install(model, name, svds[name], ranks[name])
    else:
        dense_inputs, working_inputs = first_inputs, first_inputs.clone()
        dense_blocks, working_blocks = blocks
        for index, groups in enumerate(tqdm(block_groups, desc="blocks", disable=not progress, unit="block")):
            for group in groups:
                chosen = [name for name in group if ranks[name] is not DENSE]
                if not chosen:
                    continue
                if config.sequential:
                    group_statistics: dict[str, LayerStatistics] = {}
                    with (
                        processes.together("sequential calibration"),
                        torch.no_grad(),
                        record_linear_inputs(model, chosen[:1], group_statistics),
                    ):
                        working_inputs.through(working_blocks[index])
                    sum_over_processes(group_statistics, processes, model)
                    shared = group_statistics[chosen[0]]  # the group's linears read the same input
                    svds.update(_factorize(model, chosen, dict.fromkeys(chosen, shared), config))
                installed = {name: _install(model, name, svds[name], ranks[name]) for name in chosen}
                if config.compensation_rank > 0 and config.compensation_epochs > 0:
                    report.compensation += train_compensation(
                        {name: (dense_model.get_submodule(name).weight.detach(), installed[name]) for name in chosen},
                        _InputPairs(
                            dense_blocks[index],
                            working_blocks[index],
                            dense_model.get_submodule(chosen[0]),
                            model.get_submodule(chosen[0]),
                            dense_inputs,
                            working_inputs,
                        ),
                        residual_rank=config.compensation_rank,
                        epochs=config.compensation_epochs,
                        lr=config.compensation_lr,
                        seed=config.seed + index,
                        processes=processes,
                    )
            dense_inputs = dense_inputs.through(dense_blocks[index])
            working_inputs = working_inputs.through(working_blocks[index])
        for name in extra_targets:  # outside the blocks: one-shot from the dense statistics
            if ranks[name] is not DENSE:
                _install(model, name, svds[name], ranks[name])

    plan = CompressionPlan(
        layers={
            name: LayerPlan("low_rank", module.in_features, module.out_features, module.bias is not None, module.rank)
            for name in targets
            if isinstance(module := model.get_submodule(name), LowRankLinear)
        },
        dense_parameters=budget.dense_parameters,
        parameters=count_parameters(model),
    )
    return plan, report


@dataclass
class _InputPairs:
    """This process's calibration batches of one linear as ``(dense input, compressed input)`` rows, each
    computed on demand by running the block (nothing beyond the block inputs is kept)."""

    dense_block: nn.Module
    working_block: nn.Module
    dense_linear: nn.Module
    working_linear: nn.Module
    dense_inputs: BlockInputs
    working_inputs: BlockInputs

    def __len__(self) -> int:
        return len(self.dense_inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense, working = self.dense_inputs, self.working_inputs
        with torch.no_grad():
            with capture_module_input(self.dense_linear) as dense_seen:
                self.dense_block(dense.hidden[i], *dense.args[i], **dense.kwargs[i])
            with capture_module_input(self.working_linear) as working_seen:
                self.working_block(working.hidden[i], *working.args[i], **working.kwargs[i])
        width = dense_seen[0].shape[-1]
        return dense_seen[0].reshape(-1, width), working_seen[0].reshape(-1, width)
