"""Activation-aware mixed-rank factorization (seed: Azizi, Nazemi, Pedram 2024, arXiv 2402.06004).

Pipeline, each step optional where the config says so:

1. one streaming pass over the calibration set: the input Gram of every target linear (dense model);
2. per layer, a whitened SVD, which gives the output error of every candidate rank;
3. one global rank allocation to the whole-model parameter budget (``budget.py``);
4. installing the factor pairs, either all at once from the dense statistics, or block by block
   (``sequential=True``: each layer fitted to the dense layer's output on the compressed model's own
   activations; ``'auto'``: kept only if the held-out output error drops), with the error-compensation
   residual trained per layer group (``compensation_rank > 0``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import DENSE, SHARED
from ...calibration.blocks import BlockInputs, capture_block_inputs, capture_module_input
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...calibration.gram import LayerStatistics, PairedStatistics, record_linear_inputs, sum_over_processes
from ...calibration.sensitivity import OutputSensitivity, accumulate_sensitivity
from ...calibration.validation import CalibrationSplit, HeldOutReference, forward_batch, split_for_validation
from ...configuration import CompressionConfig
from ...layers import LowRankLinear
from ...plan import CompressionPlan, LayerPlan, count_parameters, set_submodule
from ...shared_input import SharedInputMixin, projection_shape, share_input
from .compensation import CompensationResult, train_compensation
from .factorization import WhitenedSVD
from .selection import (
    dense_modules,
    factorize_layers,
    factorize_shared,
    install_all,
    judge_sequential,
    needs_selection,
    needs_sensitivity,
    select_factorization,
    shared_groups,
)


@dataclass
class CompressionReport:
    """What happened, for logs and tests (not saved: the plan is what is saved)."""

    solvers: dict[str, str] = field(default_factory=dict)
    compensation: list[CompensationResult] = field(default_factory=list)
    selection: dict | None = None  # every candidate's held-out score and the winner (also in the plan)
    selection_seconds: float = 0.0  # what choosing cost: the SVDs of every factorization and the held-out passes
    sequential_seconds: float = 0.0  # the block-by-block stage (sequential calibration and compensation)


def needs_calibration(config: CompressionConfig) -> bool:
    """Whether ``config`` needs calibration images (every method answers here, so ``compress`` asks once)."""
    if config.method == "pruning":
        return config.pruning_importance == "taylor"
    return (
        config.whitening != "none"
        or needs_selection(config)
        or needs_sensitivity(config)
        or config.sequential
        or config.compensation_rank > 0
    )


def benefits_from_calibration(config: CompressionConfig) -> bool:
    """Whether calibration images, when given, change the result even though ``config`` does not need them:
    global allocation of a plain SVD then compares true output errors (from each layer's Gram) instead of
    weight spectra."""
    return needs_calibration(config) or (config.method == "activation_aware" and config.rank_allocation == "global")


def index_calibration_stream(batches, config: CompressionConfig) -> Iterator[CalibrationSplit]:
    """The calibration stream as :class:`CalibrationSplit` items with their stream positions, the held-out
    images cut out when the factorization is chosen by measurement. ``compress`` calls this before the
    stream is shared between processes, so every process count holds out (and weighs) the same images."""
    return split_for_validation(batches, config.validation_interval if needs_selection(config) else None)


def _install(model: nn.Module, name: str, svd: WhitenedSVD, rank: int) -> nn.Module:
    """Put the rank-``rank`` factors of ``svd`` in place of ``name``: a :class:`LowRankLinear`, or for a stacked
    factorization (``svd.split``) the shared-input form of the parent module ``name``."""
    if svd.split is not None:
        return _install_shared(model, name, svd, rank)
    dense = model.get_submodule(name)
    up, down = svd.factors(rank)
    bias = None if dense.bias is None else dense.bias.detach()
    shift = svd.bias_shift(rank) if bias is not None else None
    if shift is not None:  # an output-matched pair (sequential): its bias restores the dense mean output
        bias = (bias.to(torch.float64) + shift.to(bias.device)).to(bias.dtype)
    layer = LowRankLinear.from_factors(up.to(dense.weight.dtype), down.to(dense.weight.dtype), bias)
    layer.to(dense.weight.device)
    set_submodule(model, name, layer)
    return layer


def _install_shared(model: nn.Module, name: str, svd: WhitenedSVD, rank: int) -> nn.Module:
    """The shared-input form of the parent module ``name``: one down-projection, the stacked up factors split
    back into its projections, each with its bias (shifted as :func:`_install` shifts a pair's, if fitted so)."""
    parent = model.get_submodule(name)
    projections, rows = zip(*svd.split, strict=True)
    linears = [getattr(parent, projection) for projection in projections]
    dtype, device = linears[0].weight.dtype, linears[0].weight.device
    up, down = svd.factors(rank)
    biases = [None if linear.bias is None else linear.bias.detach() for linear in linears]
    shift = svd.bias_shift(rank) if biases[0] is not None else None
    if shift is not None:
        biases = [
            (bias.to(torch.float64) + extra.to(device)).to(dtype)
            for bias, extra in zip(biases, shift.split(rows), strict=True)
        ]
    ups = [part.to(dtype) for part in up.split(rows)]
    shared = share_input(parent, projections, rank, down.to(dtype), ups, biases).to(device)
    set_submodule(model, name, shared)
    return shared


def compress_activation_aware(
    model: nn.Module,
    dense_model: nn.Module,
    block_groups: list[list[list[str]]],
    extra_targets: list[str],
    config: CompressionConfig,
    batches: Iterator[torch.Tensor | dict | CalibrationSplit] | None,
    blocks: tuple[nn.ModuleList, nn.ModuleList],
    progress: bool = True,
    processes: CalibrationProcesses = SINGLE_PROCESS,
    shareable: list[tuple[str, ...]] | None = None,
) -> tuple[CompressionPlan, CompressionReport]:
    """Factorize ``model``'s targets in place (``model`` is a private copy of ``dense_model``).

    ``block_groups[b][g]`` lists the target linears of group ``g`` of block ``b``; ``blocks`` is
    ``(dense_blocks, working_blocks)``; ``batches`` yields ``pixel_values`` tensors (or dicts of
    forward keyword arguments, or :class:`CalibrationSplit` items from :func:`index_calibration_stream`).
    Nothing here is vision-specific: :func:`hf_vitcompress.compress` supplies the family's layout.
    Returns the plan and a report.

    ``shareable``: groups of linears (full names, each all the input projections of one parent module, which
    reads its input only through them) that may share one down-projection (``config.shared_qkv``).

    With several ``processes``, ``batches`` is this process's share: every statistic is summed over
    processes and the compensation residuals are trained data-parallel, so all processes end equal.
    """
    report = CompressionReport()
    targets = [name for block in block_groups for group in block for name in group] + list(extra_targets)
    block_wise = config.sequential or config.compensation_rank > 0
    selecting = needs_selection(config)

    # 1. one pass: dense statistics, held-out images, Fisher weights (and the first block's inputs when
    # going block by block)
    statistics: dict[str, LayerStatistics] | None = None
    sensitivity = OutputSensitivity() if needs_sensitivity(config) else None
    reference = HeldOutReference(processes=processes) if selecting else None
    first_inputs = BlockInputs()
    if batches is not None:
        statistics = {}
        model.eval()
        with (
            processes.together("the calibration pass"),
            torch.no_grad(),
            record_linear_inputs(model, targets, statistics),
            capture_block_inputs(blocks[1][0], first_inputs) if block_wise else nullcontext(),
        ):
            stream = index_calibration_stream(batches, config)
            for split in tqdm(stream, desc="calibration", disable=not progress, unit="batch"):
                if split.held_out is not None:
                    reference.batches.append(split.held_out)  # measured after the pass, outside the hooks
                if split.fit is None:
                    continue
                if sensitivity is not None and split.position < config.sensitivity_samples:
                    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + split.position)
                    accumulate_sensitivity(model, targets, split.fit, sensitivity, generator)
                else:
                    forward_batch(model, split.fit)
        sum_over_processes(statistics, processes, model)
        if sensitivity is not None:
            sensitivity.sum_over_processes(processes, model, targets)
        if reference is not None:
            with processes.together("the held-out reference"):
                reference.compute_outputs(model)

    # 2-3. factorizations, allocations, and the choice between them by the held-out output error
    log = tqdm.write if progress else (lambda _message: None)
    groups = shared_groups(model, shareable or []) if config.shared_qkv else []
    selection = select_factorization(
        model, targets, statistics, sensitivity, reference, config, _install, log, processes, groups
    )
    chosen = selection.factorization
    config = replace(
        config,
        whitening=chosen.whitening,
        loss_weighting=chosen.loss_weighting,
        rank_allocation=selection.rank_allocation,
    )
    svds, ranks, budget = selection.svds, selection.ranks, selection.budget
    processes.check_same("the rank allocation", {name: None if rank is DENSE else rank for name, rank in ranks.items()})
    report.solvers = {name: svd.solver for name, svd in svds.items()}
    statistics = None  # the Grams are no longer needed (sequential calibration collects its own)

    # 4. install
    if not block_wise:
        install_all(model, svds, ranks, _install)
    else:
        sequential_start = time.perf_counter()
        one_shot = dict(svds)  # sequential calibration replaces entries; 'auto' may return to these
        originals = dense_modules(model, targets, groups)
        parents = {group.members[0]: group for group in groups if group.parent in ranks}
        dense_inputs, working_inputs = first_inputs, first_inputs.clone()
        dense_blocks, working_blocks = blocks
        for index, block in enumerate(tqdm(block_groups, desc="blocks", disable=not progress, unit="block")):
            for group in block:
                chosen_names = [name for name in group if ranks[name] is not DENSE]
                if not chosen_names:
                    continue
                pairs = _InputPairs(
                    dense_blocks[index],
                    working_blocks[index],
                    dense_model.get_submodule(chosen_names[0]),  # the group's linears read the same input
                    model.get_submodule(chosen_names[0]),
                    dense_inputs,
                    working_inputs,
                )
                paired = None
                if config.sequential:
                    with processes.together("sequential calibration"):
                        paired = _paired_statistics(pairs)
                    paired.sum_over_processes(processes)
                if ranks[chosen_names[0]] == SHARED:  # one shared down-projection for the group
                    shared = parents[chosen_names[0]]
                    if paired is not None:
                        weights = selection.shared_weights[shared.parent]
                        svds[shared.parent] = factorize_shared(model, shared, None, chosen, config, weights, paired)
                    _install(model, shared.parent, svds[shared.parent], ranks[shared.parent])
                    continue
                if paired is not None:
                    svds.update(factorize_layers(model, chosen_names, None, chosen, config, sensitivity, paired=paired))
                installed = {name: _install(model, name, svds[name], ranks[name]) for name in chosen_names}
                if config.compensation_rank > 0 and config.compensation_epochs > 0:
                    report.compensation += train_compensation(
                        {
                            name: (dense_model.get_submodule(name).weight.detach(), installed[name])
                            for name in chosen_names
                        },
                        replace(pairs, working_linear=installed[chosen_names[0]]),  # the linear just installed
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
        if config.sequential == "auto":
            judge_sequential(model, selection, reference, one_shot, originals, _install, processes)
        elif config.sequential:  # asked for: what is installed is the block-by-block fit, and the record says so
            selection.sequential = True
        report.sequential_seconds = time.perf_counter() - sequential_start
    if len(selection.scores) > 1:  # something was chosen by measurement
        report.selection = selection.record()
        report.selection_seconds = selection.seconds

    layers = {}
    for group in groups:
        if isinstance(module := model.get_submodule(group.parent), SharedInputMixin):
            # the up-projections give the outputs and bias; the input width is the shared down-projection's
            _, out_features, bias = projection_shape([getattr(module, p) for p in group.projections])
            layers[group.parent] = LayerPlan(
                "shared_input",
                module.shared_down.in_features,
                out_features,
                bias,
                module.shared_rank,
                projections=list(group.projections),
            )
    for name in targets:
        if isinstance(module := model.get_submodule(name), LowRankLinear):
            layers[name] = LayerPlan(
                "low_rank", module.in_features, module.out_features, module.bias is not None, module.rank
            )
    plan = CompressionPlan(
        layers=layers,
        dense_parameters=budget.dense_parameters,
        parameters=count_parameters(model),
        selection=report.selection,
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


def _paired_statistics(pairs: _InputPairs) -> PairedStatistics:
    """This process's :class:`PairedStatistics` of one layer group's input over its calibration batches
    (empty, not missing, on a process without batches, so the sum over processes still meets)."""
    linear = pairs.working_linear
    paired = PairedStatistics.empty(linear.in_features, device=next(linear.parameters()).device)
    for i in range(len(pairs)):
        paired.update(*pairs[i])
    return paired
