"""``method="pruning"`` through ``compress()``: one-shot structured pruning to a FLOPs budget.

Groups are ranked by magnitude (no data needed) or Taylor importance (on the calibration images,
against the dense model's own predictions), projected onto the budget and physically removed. These
are the baselines of :class:`~hf_vitcompress.PruningTrainer` (UVC), which *learns* the structure
with distillation and ends with the same projection and the same export.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ...configuration import CompressionConfig
from ...plan import CompressionPlan, count_parameters
from .export import apply_pruning
from .importance import magnitude_scores, taylor_scores
from .projection import project_to_budget
from .structure import PrunableModel


def compress_pruning(
    model: nn.Module, config: CompressionConfig, batches: Iterator[torch.Tensor] | None
) -> tuple[CompressionPlan, dict]:
    """Prune ``model`` in place to ``config.target_flops_ratio``; returns the plan and a small report."""
    structure = PrunableModel.of(model)
    budget = structure.check_budget(config.target_flops_ratio, config.skip_blocks)
    dense_parameters = count_parameters(model)
    if config.pruning_importance == "taylor":
        scores = taylor_scores(model, structure, batches)
    else:
        scores = magnitude_scores(model, structure)
    state = project_to_budget(structure, scores, budget, skip_blocks=config.skip_blocks)
    layers = apply_pruning(model, structure, state)
    plan = CompressionPlan(layers=layers, dense_parameters=dense_parameters, parameters=count_parameters(model))
    return plan, {"dense_macs": structure.dense_macs, "macs": structure.macs(state), "budget_macs": budget}
