"""``compress()``: the one entry point every method goes through."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .calibration.data import image_size_of, iter_calibration_batches
from .calibration.distributed import CalibrationProcesses
from .configuration import CompressionConfig
from .families import FamilyAdapter, family_for
from .layers import LowRankLinear
from .methods.activation_aware.method import compress_activation_aware, needs_calibration
from .methods.head_factorization.method import ATTENTION_PROJECTIONS, compress_head_factorization
from .methods.pruning.export import export_pruned
from .methods.pruning.method import plan_pruning
from .modeling_utils import CompressedModelMixin
from .plan import CompressionPlan


def resolve_targets(
    model: nn.Module, family: FamilyAdapter, target_modules: list[str] | None
) -> tuple[list[list[list[str]]], list[str]]:
    """``(block_groups, extra)``: the block linears to compress, grouped as the family says, and any other named linears.

    Role names (``q_proj``, ``fc1``, ...) select that linear in every block; other entries must name
    (or be a dotted suffix of) an ``nn.Linear`` of the model.
    """
    all_groups = family.block_linear_names(model)
    if not any(name for block in all_groups for group in block for name in group):
        raise ValueError(f"{type(model).__name__} has no encoder blocks with attention/MLP linears to compress.")
    if target_modules is None:
        return all_groups, []
    roles = set(family.roles)
    chosen_roles = {entry for entry in target_modules if entry in roles}
    block_names = {name for block in all_groups for group in block for name in group}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    extra: list[str] = []
    for entry in target_modules:
        if entry in roles:
            continue
        matches = sorted(name for name in linears if name == entry or name.endswith("." + entry))
        if not matches:
            raise ValueError(
                f"target_modules entry {entry!r} matches no nn.Linear of {type(model).__name__}. Use a role name "
                f"({', '.join(family.roles)}) or the name of a linear module (e.g. 'classifier')."
            )
        extra.extend(name for name in matches if name not in extra)
    block_groups = [
        [[name for name in group if name.rsplit(".", 1)[-1] in chosen_roles or name in extra] for group in block]
        for block in all_groups
    ]
    return block_groups, [name for name in extra if name not in block_names]


def _head_factorization_targets(target_modules: list[str] | None) -> list[str] | None:
    """``attention`` selects whole attention modules (all four projections); single projections cannot be
    head-factorized on their own."""
    if target_modules is None:
        return None
    partial = sorted(set(target_modules) & set(ATTENTION_PROJECTIONS))
    if partial:
        raise ValueError(
            f"method='head_factorization' factorizes whole attention modules, not {partial}: use 'attention' "
            "(with 'fc1' / 'fc2' for the MLP), or method='activation_aware' for single projections."
        )
    expanded = []
    for entry in target_modules:
        expanded.extend(ATTENTION_PROJECTIONS if entry == "attention" else [entry])
    return expanded


def _version() -> str:
    from . import __version__

    return __version__


def compress(
    model: PreTrainedModel,
    config: CompressionConfig,
    calibration_data: Any = None,
    *,
    progress: bool = True,
    distributed: bool = False,
) -> PreTrainedModel:
    """Return a compressed copy of ``model``; ``model`` itself is never modified.

    ``calibration_data``: a DataLoader or any iterable of ``{"pixel_values": tensor}`` batches, a
    ``datasets.Dataset`` with a ``pixel_values`` column, or a ``[n, C, H, W]`` tensor. At most
    ``config.calibration_samples`` images are used. The result is an instance of the family's
    ``Compressed*`` class (a subclass of the input's class): it saves with ``save_pretrained`` and
    loads back with ``AutoModelForImageClassification.from_pretrained`` after ``import hf_vitcompress``.

    ``distributed=True``, under ``accelerate launch`` / ``torchrun`` (several processes): every process
    calls ``compress`` with the same model, config and (unsharded) calibration data; each runs the
    calibration forward passes on its share of the batches, the statistics are summed over processes,
    and every process returns the same compressed model (see :mod:`hf_vitcompress.calibration.distributed`).
    Without it, ``compress`` calibrates each process on all the data it is given and runs no collectives,
    so calling it from one process only (``if accelerator.is_main_process``) is safe.
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}.")
    if isinstance(model, CompressedModelMixin) or any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError("This model is already compressed; compress the original dense model instead.")
    family = family_for(model)
    family.compressed_class_for(model)  # refuses unsupported model classes before any work
    target_modules = config.target_modules
    if config.method == "head_factorization":
        target_modules = _head_factorization_targets(target_modules)
    if config.method == "pruning" and target_modules is not None:
        raise ValueError(
            "method='pruning' prunes every encoder block (heads, value dims, MLP neurons, blocks); target_modules "
            "is not supported for it."
        )
    block_groups, extra = resolve_targets(model, family, target_modules)

    batches = None
    calibration_images = 0
    processes = CalibrationProcesses()
    if needs_calibration(config):
        if distributed:
            processes = CalibrationProcesses.current().with_context(
                config=config.to_dict(), targets=block_groups, extra_targets=extra
            )
        progress = progress and processes.is_main
        parameter = next(model.parameters())
        batches = iter_calibration_batches(
            calibration_data,
            max_samples=config.calibration_samples,
            num_channels=model.config.num_channels,
            image_size=image_size_of(model.config),
            device=parameter.device,
            dtype=parameter.dtype,
        )

        def counted(source):
            nonlocal calibration_images
            for batch in source:
                calibration_images += len(batch)
                yield batch

        batches = processes.shard(counted(batches))  # every process counts all images, runs its share

    was_training = model.training
    model.eval()  # the dense model is the reference: no dropout while it is measured
    try:
        if config.method == "pruning":  # its export copies the model itself
            structure, state = plan_pruning(model, config, batches, processes)
            pruned = export_pruned(model, structure, state, config, calibration_images=calibration_images)
            return pruned.train(was_training)
        working = copy.deepcopy(model)
        if config.method == "head_factorization":
            linears = [name for block in block_groups for group in block for name in group] + extra
            attention_names = [name.rsplit(".", 1)[0] for name in linears if name.endswith(".q_proj")]
            projections = {f"{a}.{p}" for a in attention_names for p in ATTENTION_PROJECTIONS}
            others = [name for name in linears if name not in projections]
            plan, report = compress_head_factorization(
                working, attention_names, others, config, batches, progress, processes
            )
        else:
            plan, report = compress_activation_aware(
                working,
                model,
                block_groups,
                extra,
                config,
                batches,
                (family.blocks(model), family.blocks(working)),
                progress=progress,
                processes=processes,
            )
    finally:
        model.train(was_training)
    working.train(was_training)

    return finish_compressed(working, model, config, plan, report, calibration_images)


def finish_compressed(
    working: nn.Module,
    original: nn.Module,
    config: CompressionConfig,
    plan: CompressionPlan,
    report: Any,
    calibration_images: int,
) -> PreTrainedModel:
    """Turn ``working`` (a modified copy of ``original``) into the family's compressed class, in place.

    Records what was asked (``config``), what was decided (``plan``) and where it came from; every
    method ends here, so every compressed model saves, loads and describes itself the same way.
    """
    family = family_for(original)
    # Become the compressed class in place (so replaced heads, hooks and dtypes survive); the config
    # object is shared by every submodule of `working`, so it is converted in place too.
    working.config.__class__ = family.config_class
    working.config.compression_config = config.to_dict()
    working.config.compression_plan = plan.to_dict()
    working.config.compression_provenance = {
        "base_model": getattr(original, "name_or_path", "") or None,
        "base_model_class": type(original).__name__,
        "calibration_images": calibration_images,
        "hf_vitcompress_version": _version(),
    }
    working.config.auto_map = family.config_class.default_auto_map()
    working.__class__ = family.compressed_class_for(original)
    working.compression_report = report
    return working
