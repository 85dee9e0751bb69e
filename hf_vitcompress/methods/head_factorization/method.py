"""``method="head_factorization"``: COMCAT-style per-head attention products, plus low-rank MLP linears,
under one global parameter budget and one plan.

One calibration pass collects the input statistics of every attention (its ``q_proj`` input, shared
by q/k/v) and of every low-rank target. Each head contributes two candidates to the shared allocator,
its Q·Kᵀ and its V·O product; each MLP linear one, exactly as in the activation-aware method. Errors
are normalized per module (a head's discarded energy over its attention's total), so heads of one
attention compete by how much they matter and modules are comparable with each other.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import ALLOCATORS, DENSE, RankCandidate, make_budget
from ...calibration.attention_mixing import HeadMixingStatistics, record_head_mixing, sum_head_mixing_over_processes
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...calibration.gram import LayerStatistics, collect_linear_statistics, sum_over_processes
from ...configuration import CompressionConfig
from ...layers import LowRankLinear
from ...plan import CompressionPlan, LayerPlan, count_parameters
from ..activation_aware.method import CompressionReport, _install
from ..activation_aware.selection import Factorization, factorize_layers, rank_candidate
from .factorization import AttentionFactorization, factorize_attention, install_head_factorized

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _head_candidates(name: str, factorization: AttentionFactorization, hidden: int) -> list[RankCandidate]:
    head_dim = factorization.head_dim
    qk_unit, vo_unit = factorization.rank_costs(hidden)
    candidates = []
    for kind, svds in (("qk", factorization.qk), ("vo", factorization.vo)):
        total = max(sum(float(svd.spectrum.sum()) for svd in svds), 1e-30)
        for h, svd in enumerate(svds):
            kept = torch.cat([svd.spectrum.new_zeros(1), svd.spectrum.cumsum(0)])
            errors = (kept[-1] - kept).clamp_min(0) / total
            if kind == "qk":  # the dense model's W_Q^h, W_K^h and their biases
                unit, dense = qk_unit, 2 * hidden * head_dim + head_dim * factorization.dense_qk_biases
            else:  # W_V^h, its bias and W_O^h's columns (the folded output bias is a fixed cost)
                unit, dense = vo_unit, 2 * hidden * head_dim + head_dim * factorization.dense_v_bias
            candidates.append(
                RankCandidate(
                    f"{name}#{kind}{h}",
                    hidden,
                    hidden,
                    errors,
                    unit_cost=unit,
                    dense_parameters=dense,
                    full_rank=head_dim,
                )
            )
    return candidates


def head_ranks(
    name: str, factorization: AttentionFactorization, ranks: dict[str, int | None]
) -> tuple[list[int], list[int]]:
    """Per-head ``(qk_ranks, vo_ranks)`` of attention ``name`` from an allocation over :func:`_head_candidates`.

    ``DENSE`` means full rank: exact, and never more weights than the dense projections.
    """
    heads, full = len(factorization.qk), factorization.head_dim

    def rank_of(key: str) -> int:
        return full if ranks[key] is DENSE else ranks[key]

    return [rank_of(f"{name}#qk{h}") for h in range(heads)], [rank_of(f"{name}#vo{h}") for h in range(heads)]


def compress_head_factorization(
    model: nn.Module,
    attention_names: list[str],
    linear_targets: list[str],
    config: CompressionConfig,
    batches: Iterator[torch.Tensor | dict] | None,
    progress: bool = True,
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> tuple[CompressionPlan, CompressionReport]:
    """Factorize ``model``'s attentions per head and its ``linear_targets`` by low rank, in place.

    ``batches`` are this process's share when ``processes`` has several (the statistics are summed).
    """
    report = CompressionReport()
    inputs = [f"{name}.q_proj" for name in attention_names] + linear_targets
    statistics: dict[str, LayerStatistics] | None = None
    mixing: dict[str, HeadMixingStatistics] = {}
    if batches is not None and config.whitening != "none":
        with processes.together("the calibration pass"), record_head_mixing(model, attention_names, mixing):
            statistics = collect_linear_statistics(model, inputs, batches, progress)
        sum_over_processes(statistics, processes, model)
        sum_head_mixing_over_processes(mixing, processes)

    factorizations = {
        name: factorize_attention(
            model.get_submodule(name),
            statistics.pop(f"{name}.q_proj", None) if statistics else None,
            config.damping,
            mixing.pop(name, None),
        )
        for name in tqdm(attention_names, desc="attention products", disable=not progress, unit="module")
    }
    svds = factorize_layers(model, linear_targets, statistics, Factorization(config.whitening), config, release=True)
    candidates = [
        candidate
        for name, factorization in factorizations.items()
        for candidate in _head_candidates(name, factorization, model.get_submodule(name).q_proj.in_features)
    ]
    candidates += [
        rank_candidate(name, model.get_submodule(name), svds[name], config.error_normalization)
        for name in linear_targets
    ]
    budget = make_budget(count_parameters(model), candidates, config.target_param_ratio)
    ranks = ALLOCATORS[config.rank_allocation](candidates, budget.candidate_budget)
    processes.check_same("the rank allocation", {name: None if rank is DENSE else rank for name, rank in ranks.items()})
    report.solvers = {name: f.solver for name, f in factorizations.items()} | {n: s.solver for n, s in svds.items()}

    layers: dict[str, LayerPlan] = {}
    for name, factorization in factorizations.items():
        qk_ranks, vo_ranks = head_ranks(name, factorization, ranks)
        layers[name] = install_head_factorized(
            model, name, model.get_submodule(name), factorization, qk_ranks, vo_ranks
        )
    for name in linear_targets:
        if ranks[name] is not DENSE:
            module: LowRankLinear = _install(model, name, svds[name], ranks[name])
            layers[name] = LayerPlan(
                "low_rank", module.in_features, module.out_features, module.bias is not None, module.rank
            )
    plan = CompressionPlan(layers=layers, dense_parameters=budget.dense_parameters, parameters=count_parameters(model))
    return plan, report
