"""``compress()``: the one entry point every method goes through."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .attention import OUTPUT_PROJECTION_NAMES, attention_projection_names
from .calibration.data import CalibrationDataError, interpolated_positions, iter_calibration_batches, patch_size_of
from .calibration.distributed import CalibrationProcesses
from .configuration import CompressionConfig
from .families import FamilyAdapter, family_for
from .layers import LowRankLinear
from .methods.activation_aware.method import (
    benefits_from_calibration,
    compress_activation_aware,
    index_calibration_stream,
    needs_calibration,
)
from .methods.head_factorization.method import ATTENTION_PROJECTIONS, compress_head_factorization
from .methods.pruning.export import export_pruned
from .methods.pruning.method import plan_pruning
from .modeling_utils import CompressedModelMixin
from .plan import CompressionPlan, count_parameters


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
    if target_modules is None:  # every block linear, and the family's other default targets
        return all_groups, family.extra_linear_names(model)
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


def _head_factorization_targets(target_modules: list[str] | None, family: FamilyAdapter) -> list[str] | None:
    """``attention`` selects whole attention modules (all four projections); single projections cannot be
    head-factorized on their own."""
    if target_modules is None:
        return None
    projections = [role for role in family.roles if role in ATTENTION_PROJECTIONS + OUTPUT_PROJECTION_NAMES]
    partial = sorted(set(target_modules) & set(projections))
    if partial:
        raise ValueError(
            f"method='head_factorization' factorizes whole attention modules, not {partial}: use 'attention' "
            "(with 'fc1' / 'fc2' for the MLP), or method='activation_aware' for single projections."
        )
    expanded = []
    for entry in target_modules:
        expanded.extend(projections if entry == "attention" else [entry])
    return expanded


def check_weights_in_memory(model: nn.Module) -> None:
    """Refuse, before any work, a model whose weights are not all in memory (meta device, Accelerate offload).

    Compression reads every weight (a deep copy, SVDs, statistics) and writes new ones. A meta tensor has
    no data; an offloaded one lives in an Accelerate hook's weights map that neither the copy nor the
    factorization sees. Either way the run would fail deep inside (``Tensor.item() cannot be called on
    meta tensors``, ``Cannot copy out of meta tensor``) or, worse, hand back a half-compressed model.
    """
    missing = [
        name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta
    ]
    if not missing:
        return
    example = f"{len(missing)} of its tensors (e.g. {missing[0]!r}) are on the meta device"
    device_map = getattr(model, "hf_device_map", None)
    if device_map or any(hasattr(module, "_hf_hook") for module in model.modules()):
        devices = sorted({str(device) for device in (device_map or {}).values()})
        where = f" (its device_map places weights on {', '.join(devices)})" if devices else ""
        raise ValueError(
            f"compress() needs every weight of the model in memory, but {type(model).__name__} is offloaded by "
            f"Accelerate{where}: {example}. Load it without offloading, e.g. "
            "AutoModelForImageClassification.from_pretrained(path) with no device_map (or a device_map that puts "
            "everything on one device with room for it), instead of cpu_offload / disk_offload / device_map with "
            "'cpu' or 'disk' entries; then compress. The compressed model is smaller and can be dispatched afterwards."
        )
    raise ValueError(
        f"compress() needs the model's weights, but {type(model).__name__} has none: {example}, as after "
        "accelerate's init_empty_weights() or building on device='meta'. Load real weights first, e.g. "
        "AutoModelForImageClassification.from_pretrained(path) (or load_checkpoint_and_dispatch without "
        "offloading), then compress."
    )


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype compression runs ``model``'s forward passes in: its own, except float16 on the CPU.

    float16 matmuls on the CPU are emulated (about 7x slower than float32 in torch 2.13), so a float16
    model there is compressed on a float32 copy and the result cast back to float16: the same weights,
    the activations rounded less. Everywhere else (bfloat16 on the CPU, which is fast; any half dtype on
    an accelerator, where a float32 copy of a large model would cost memory it may not have) the model
    runs in its own dtype, so the statistics describe the model as it will serve. Statistics and
    factorizations are float64 either way.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    devices = {p.device.type for p in model.parameters()}
    if dtypes == {torch.float16} and devices == {"cpu"}:
        return torch.float32
    return next(model.parameters()).dtype


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

    Calibration images may have any size that is a multiple of the patch size: calibrate at the
    resolution you serve. Other sizes than ``config.image_size`` run with ``interpolate_pos_encoding=True``
    (as you would serve them), and method ``pruning`` counts its FLOPs budget at the size of the images it
    is given (magnitude importance reads only their size). The sizes are recorded in
    ``config.compression_provenance``.

    Half-precision models (float16, bfloat16) compress to a model in the same dtype; see
    :func:`compute_dtype` for the dtype the forward passes run in. A model whose weights are not in
    memory (meta device, Accelerate offloading) is refused up front (:func:`check_weights_in_memory`).
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}.")
    if isinstance(model, CompressedModelMixin) or any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError("This model is already compressed; compress the original dense model instead.")
    family = family_for(model)
    family.compressed_class_for(model)  # refuses unsupported model classes before any work
    if family.image_tower is not None:
        return compress_image_tower(model, family, config, calibration_data, progress=progress, distributed=distributed)
    if config.method not in family.methods:
        raise ValueError(
            f"method={config.method!r} does not handle {type(model).__name__} yet: its blocks lack the layout that "
            "method is written for (head_factorization and pruning: a dot-product attention with q_proj/k_proj/v_proj "
            "and o_proj or out_proj, and pruning an mlp with fc1/fc2 or gate_proj/up_proj/down_proj). Use method="
            f"{' or '.join(repr(m) for m in family.methods)}."
        )
    if not family.chained and config.method == "activation_aware" and (config.sequential or config.compensation_rank):
        raise ValueError(
            f"sequential={config.sequential!r} / compensation_rank={config.compensation_rank} calibrate block by "
            f"block, feeding each block's output to the next, but the blocks of {type(model).__name__} come in "
            "stages with a patch merging between them (not one chain). Use the one-shot default "
            "(sequential=False, compensation_rank=0)."
        )
    check_weights_in_memory(model)
    target_modules = config.target_modules
    if config.method == "head_factorization":
        target_modules = _head_factorization_targets(target_modules, family)
    if config.method == "pruning" and target_modules is not None:
        raise ValueError(
            "method='pruning' prunes every encoder block (heads, value dims, MLP neurons, blocks); target_modules "
            "is not supported for it."
        )
    block_groups, extra = resolve_targets(model, family, target_modules)

    dtype = next(model.parameters()).dtype
    working_dtype = compute_dtype(model)
    parameter = next(model.parameters())
    batches = None
    calibration_images = 0
    image_sizes: list[tuple[int, int]] = []  # distinct calibration resolutions, in the order met
    processes = CalibrationProcesses()

    def checked_batches(max_samples: int) -> Iterator[torch.Tensor]:
        return iter_calibration_batches(
            calibration_data,
            max_samples=max_samples,
            num_channels=model.config.num_channels,
            patch_size=patch_size_of(model.config),
            device=parameter.device,
            dtype=working_dtype,
        )

    if needs_calibration(config) or (calibration_data is not None and benefits_from_calibration(config)):
        if distributed:
            processes = CalibrationProcesses.current().with_context(
                config=config.to_dict(), targets=block_groups, extra_targets=extra
            )
        progress = progress and processes.is_main

        def counted(source):
            nonlocal calibration_images
            for batch in source:
                size = tuple(batch.shape[-2:])
                if size not in image_sizes:
                    if image_sizes and config.method == "pruning":
                        raise CalibrationDataError(
                            f"method='pruning' counts its FLOPs budget at one resolution, but the calibration images "
                            f"come in {image_sizes[0]} and {size}: resize them to the one resolution you serve."
                        )
                    image_sizes.append(size)
                calibration_images += len(batch)
                yield batch

        source = counted(checked_batches(config.calibration_samples))
        with processes.together("reading the calibration data"):
            first = next(source)  # checks the data (and learns its resolution) before any model work
        stream = itertools.chain([first], source)
        if config.method == "activation_aware":  # held-out images and stream positions, the same for any process count
            stream = index_calibration_stream(stream, config)
        batches = processes.shard(stream)  # every process counts all images
    elif config.method == "pruning" and calibration_data is not None:  # magnitude: only the images' size
        image_sizes.append(tuple(next(checked_batches(1)).shape[-2:]))

    was_training = model.training
    model.eval()  # the dense model is the reference: no dropout while it is measured
    forward_state = family.forward_state_of(model)  # what the calibration forwards may change (Swin's windows)
    try:
        # float16 on the CPU: compute on a float32 copy (see compute_dtype); the user's model is untouched
        dense = model if working_dtype == dtype else copy.deepcopy(model).to(working_dtype)
        if config.method == "pruning":  # its export copies the model itself
            image_size = image_sizes[0] if image_sizes else None
            structure, state = plan_pruning(dense, config, batches, processes, image_size=image_size)
            provenance = _image_size_provenance(image_sizes if batches is not None else [])
            if image_size:
                provenance["macs_image_size"] = list(image_size)  # the resolution the FLOPs budget is counted at
            pruned = export_pruned(
                dense, structure, state, config, calibration_images=calibration_images, provenance=provenance
            )
            family.restore_forward_state(pruned, forward_state)
            return _in_dtype(pruned, dtype).train(was_training)
        working = copy.deepcopy(dense)
        with interpolated_positions(working):  # calibration images of another size than config.image_size
            if config.method == "head_factorization":
                linears = [name for block in block_groups for group in block for name in group] + extra
                attention_names = [name.rsplit(".", 1)[0] for name in linears if name.endswith(".q_proj")]
                projections = {
                    f"{a}.{p}" for a in attention_names for p in attention_projection_names(working.get_submodule(a))
                }
                others = [name for name in linears if name not in projections]
                plan, report = compress_head_factorization(
                    working, attention_names, others, config, batches, progress, processes
                )
            else:
                plan, report = compress_activation_aware(
                    working,
                    dense,
                    block_groups,
                    extra,
                    config,
                    batches,
                    (family.blocks(dense), family.blocks(working)),
                    progress=progress,
                    processes=processes,
                    shareable=family.shareable_groups(working, block_groups),
                )
    finally:
        model.train(was_training)
        family.restore_forward_state(model, forward_state)
    working.train(was_training)
    family.restore_forward_state(working, forward_state)

    compressed = finish_compressed(working, model, config, plan, report, calibration_images)
    compressed.config.compression_provenance.update(_image_size_provenance(image_sizes if batches is not None else []))
    return _in_dtype(compressed, dtype)


def _image_size_provenance(image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """The calibration resolutions, for the record: statistics describe the model at these sizes only."""
    return {"calibration_image_sizes": [list(size) for size in image_sizes]} if image_sizes else {}


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` cast back to the input's dtype when it was compressed in another (see :func:`compute_dtype`)."""
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    return model


def compress_image_tower(
    model: PreTrainedModel,
    family: FamilyAdapter,
    config: CompressionConfig,
    calibration_data: Any,
    *,
    progress: bool,
    distributed: bool,
) -> PreTrainedModel:
    """A two-tower model (``CLIPModel``, ``SiglipModel``) with its image tower compressed and its text tower and
    projections as they were, so that zero-shot classification and retrieval still run.

    The tower (``family.image_tower``: e.g. a ``CLIPVisionModelWithProjection`` made of the model's own
    ``vision_model`` and ``visual_projection``, measured on the image embeddings) is compressed as that family
    compresses it, on images alone; its modules then replace the model's in a copy. ``target_param_ratio`` is the
    tower's; the plan counts the whole model's parameters, and the provenance records the tower's own counts.
    """
    tower = family.image_tower(model)
    asked = config
    if config.target_modules:  # full-model names (vision_model.encoder...) as the tower names its modules
        asked = dataclasses.replace(
            config, target_modules=[_tower_name(entry, family.image_tower_parts) for entry in config.target_modules]
        )
    small_tower = compress(tower, asked, calibration_data, progress=progress, distributed=distributed)
    tower_config, tower_plan = small_tower.config, small_tower.compression_plan
    report, provenance = small_tower.compression_report, tower_config.compression_provenance
    full = _copy_without(model, [child for child, _ in family.image_tower_parts])  # the text tower, untouched
    renamed: dict[str, str] = {}  # the tower's module names -> the full model's
    for child, attribute in family.image_tower_parts:
        part = small_tower.get_submodule(attribute) if attribute else small_tower
        if part is small_tower:  # the tower itself becomes the full model's child again: its dense class
            part.__class__ = type(tower)
        setattr(full, child, part)
        for name, _ in part.named_modules():
            renamed[f"{attribute}.{name}".strip(".")] = f"{child}.{name}".rstrip(".")
    for module in full.modules():  # the tower's modules follow the full model's vision config again
        if getattr(module, "config", None) is tower_config:
            module.config = full.config.vision_config
    plan = dataclasses.replace(
        tower_plan,
        layers={renamed[name]: layer for name, layer in tower_plan.layers.items()},
        dense_parameters=count_parameters(model),
        parameters=count_parameters(full),
    )
    compressed = finish_compressed(full, model, config, plan, report, provenance["calibration_images"])
    recorded = compressed.config.compression_provenance
    recorded.update({key: value for key, value in provenance.items() if key not in recorded})
    recorded["image_tower"] = {
        "class": type(tower).__name__,
        "dense_parameters": tower_plan.dense_parameters,
        "parameters": tower_plan.parameters,
    }
    return compressed


def _tower_name(name: str, parts: tuple[tuple[str, str], ...]) -> str:
    """A full two-tower model's module name as its image tower names it (role names pass unchanged)."""
    for child, attribute in parts:
        if name == child or name.startswith(f"{child}."):
            rest = name[len(child) :].lstrip(".")
            return ".".join(part for part in (attribute, rest) if part)
    return name


def _copy_without(model: nn.Module, children: list[str]) -> nn.Module:
    """A deep copy of ``model`` without the named children (``None`` in the copy, to be set): the parts about to be
    replaced are not copied, so a two-tower model is not held twice with its dense image tower."""
    kept = {child: getattr(model, child) for child in children}
    try:
        for child in children:
            setattr(model, child, None)
        return copy.deepcopy(model)
    finally:
        for child, module in kept.items():
            setattr(model, child, module)


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
    # save_pretrained writes this too, but `from_config(compressed.config)` reads it before any save: with
    # several classes registered for one Auto class (DeiT with and without teacher) it picks the right one.
    working.config.architectures = [working.__class__.__name__]
    working.compression_report = report
    return working
