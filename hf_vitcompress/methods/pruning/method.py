"""``method="pruning"`` through ``compress()``: one-shot structured pruning to a FLOPs budget.

Groups are ranked by magnitude (no data needed) or Taylor importance (on the calibration images,
against the dense model's own predictions), projected onto the budget and physically removed. These
are the baselines of :class:`~hf_vitcompress.PruningTrainer` (UVC), which *learns* the structure
with distillation and ends with the same projection and the same export.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ...calibration.data import interpolated_positions
from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...configuration import CompressionConfig
from .importance import magnitude_scores, taylor_scores
from .projection import project_to_budget
from .structure import BlockPruning, PrunableModel


def plan_pruning(
    model: nn.Module,
    config: CompressionConfig,
    batches: Iterator[torch.Tensor] | None,
    processes: CalibrationProcesses = SINGLE_PROCESS,
    image_size: tuple[int, int] | None = None,
) -> tuple[PrunableModel, list[BlockPruning]]:
    """What to remove from the dense ``model`` (left unchanged) to meet ``config.target_flops_ratio``.

    ``batches`` are this process's share when ``processes`` has several (Taylor sums are added up).
    ``image_size``: the resolution the budget is counted at (the calibration images'; default
    ``config.image_size``).
    """
    structure = PrunableModel.of(model, image_size)
    budget = structure.check_budget(config.target_flops_ratio, config.skip_blocks)
    if config.pruning_importance == "taylor":  # on a copy: the user's model keeps its gradients untouched
        scoring = copy.deepcopy(model)
        if next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
            # The copy is made anyway; in float32 its gradients do not round the scores of small groups
            # away (bfloat16 keeps 8 bits), so the ranking is the one the same weights get in float32.
            scoring.float()
        with interpolated_positions(scoring):  # calibration images of another size than config.image_size
            scores = taylor_scores(scoring, structure, batches, processes)
    else:
        scores = magnitude_scores(model, structure)
    return structure, project_to_budget(structure, scores, budget, skip_blocks=config.skip_blocks)
