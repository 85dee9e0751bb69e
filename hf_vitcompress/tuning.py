"""``tune()``: run each factorized layer the way that is fastest *measured* on the device it will run on.

Fewer multiply-adds do not guarantee less time: at small widths or high ranks the two skinny GEMMs of
a factor pair can be slower than the one dense GEMM they replace (launch and memory traffic dominate).
So instead of trusting the FLOP count, :func:`tune` times every :class:`~hf_vitcompress.LowRankLinear`
at its real input shape (captured from one forward pass on ``example_inputs``) as

* ``dense``: the merged ``[out, in]`` matrix, one GEMM;
* ``factorized``: the two factor GEMMs (the PyTorch path);
* ``fused``: the Triton kernel that keeps the ``n × r`` intermediate on chip (CUDA only: the CPU
  interpreter is for correctness tests, its timings mean nothing),

and keeps the fastest. A layer that is fastest dense is merged back into an ``nn.Linear`` (it then
holds more weights: the plan's parameter count says so); a fused one records
``implementation="fused"``. The decisions and the timings go into the plan (``plan.tuning``), so
``save_pretrained`` / ``from_pretrained`` reproduce them without timing again. Shared q/k/v input
projections and head-factorized attention are not timed: they always run as their factor matmuls.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .attention import HeadFactorizedAttention
from .evaluation import image_forward
from .kernels.lowrank import triton_available
from .layers import LowRankLinear
from .plan import CompressionPlan, count_parameters, set_submodule
from .shared_input import SharedInputMixin

CHOICES = ("dense", "factorized", "fused")


class TuningError(ValueError):
    """``tune`` cannot run on this model or these inputs."""


@dataclass
class LayerTiming:
    """Median milliseconds per call of each candidate at the layer's real input shape, and the winner."""

    name: str
    rows: int
    in_features: int
    out_features: int
    rank: int
    milliseconds: dict[str, float]
    choice: str


def _forward(model: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, dict):
        image_forward(model)(**{k: v for k, v in example_inputs.items() if k != "labels"})
    else:
        image_forward(model)(pixel_values=example_inputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_milliseconds(
    function: Callable[[], Any], device: torch.device, repeats: int, warmup: int, calls: int | None = None
) -> float:
    """Median wall time of one ``function()`` call, over ``repeats`` samples after ``warmup`` calls.

    Each sample times ``calls`` back-to-back calls between two device synchronizations (default: 10 on
    a GPU, where one kernel launch is shorter than a synchronization, 1 on a CPU) and divides.
    """
    calls = calls or (10 if device.type == "cuda" else 1)
    for _ in range(warmup):
        function()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(samples)


def candidates_for(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """What can be timed meaningfully here: the kernel only on CUDA, in a dtype it supports."""
    fused = (
        device.type == "cuda" and triton_available(device) and dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    return CHOICES if fused else ("dense", "factorized")


def _capture_shapes(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, torch.Size]:
    """The input shape each named layer sees in one forward pass (only shapes: timing does not need the
    activations, and keeping every layer's input would cost gigabytes for a large model)."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str, args: tuple) -> None:  # returns None: a pre-hook's return value replaces the args
        shapes.setdefault(name, args[0].shape)

    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, _name=name: record(_name, args))
        for name in names
    ]
    try:
        with torch.no_grad():
            _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _time_layer(
    layer: LowRankLinear, shape: torch.Size, choices: tuple[str, ...], repeats: int, warmup: int
) -> dict[str, float]:
    """Each candidate through the module that would serve it (the merged ``nn.Linear``, or ``layer``
    with its ``implementation`` set), on a random input of the layer's real shape."""
    weight = layer.lowrank_down.weight
    inputs = torch.randn(shape, device=weight.device, dtype=weight.dtype)
    merged = layer.merge() if "dense" in choices else None
    saved = layer.implementation
    milliseconds = {}
    try:
        with torch.no_grad():
            for choice in choices:
                if choice == "dense":
                    function = lambda: merged(inputs)  # noqa: E731
                else:
                    layer.implementation = choice
                    function = lambda: layer(inputs)  # noqa: E731
                if choice == "fused" and not layer.kernel_serves(inputs):
                    milliseconds[choice] = math.inf  # it would run the two GEMMs: timing it would mislabel them
                    continue
                try:
                    milliseconds[choice] = median_milliseconds(function, inputs.device, repeats, warmup)
                except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is not chosen
                    warnings.warn(
                        f"tune: {choice} failed for a {tuple(shape)} input ({error}); not chosen.", stacklevel=3
                    )
                    milliseconds[choice] = math.inf
    finally:
        layer.implementation = saved
    return milliseconds


def tune(
    model: nn.Module,
    example_inputs: torch.Tensor | dict[str, torch.Tensor],
    *,
    choices: tuple[str, ...] | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> list[LayerTiming]:
    """Time and choose the implementation of every ``LowRankLinear`` of the compressed ``model``, in place.

    ``example_inputs``: a ``pixel_values`` batch (or a dict of forward keyword arguments) of the size the
    model will serve, on the device and in the dtype it will run in: the timings are only valid there,
    and ``plan.tuning`` records both. ``choices`` restricts the candidates (default: all that can be
    timed here). Returns the per-layer timings; the model's plan is updated.
    """
    plan_data = getattr(getattr(model, "config", None), "compression_plan", None)
    names = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    untimed = _untimed_factorized_parts(model)
    if plan_data and not names and untimed:
        raise TuningError(
            f"tune() times LowRankLinear layers; this compressed model has none: its factorized parts are "
            f"{' and '.join(untimed)}, which tune() does not time (they always run as their factor matmuls). "
            "There is nothing to tune; serve the model as it is."
        )
    if not plan_data or not names:
        raise TuningError(
            "tune() times the factorized layers of a compressed model; this model has none. "
            "Compress it first (hf_vitcompress.compress with method='activation_aware' or 'head_factorization')."
        )
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    available = candidates_for(device, dtype)
    if choices is None:
        choices = available
    unknown = [c for c in choices if c not in available]
    if unknown or not choices:
        raise TuningError(
            f"Cannot time {unknown or choices} here ({device.type}, {dtype}); available: {available}. The fused "
            "kernel is timed only on a CUDA GPU with Triton installed (pip install 'hf_vitcompress[triton]')."
        )
    pixel_values = example_inputs.get("pixel_values") if isinstance(example_inputs, dict) else example_inputs
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.device != device:
        raise TuningError(
            f"example_inputs must be a tensor (or a dict with 'pixel_values') on the model's device {device}; "
            f"got {type(pixel_values).__name__} on {getattr(pixel_values, 'device', None)}."
        )

    was_training = model.training
    model.eval()
    try:
        shapes = _capture_shapes(model, names, example_inputs)
        timings = []
        for name in names:
            if name not in shapes:  # never called by this forward (the timings would be made up)
                continue
            layer = model.get_submodule(name)
            milliseconds = _time_layer(layer, shapes[name], tuple(choices), repeats, warmup)
            runnable = {choice: ms for choice, ms in milliseconds.items() if math.isfinite(ms)}
            if not runnable:
                warnings.warn(
                    f"tune: none of {tuple(choices)} can run {name} here (the fused kernel needs rank <= 256 "
                    "and factors no other tool hooked or wrapped); it stays as two factor matmuls.",
                    stacklevel=2,
                )
            choice = min(runnable, key=runnable.get) if runnable else "factorized"
            rows = math.prod(shapes[name][:-1])
            timings.append(
                LayerTiming(name, rows, layer.in_features, layer.out_features, layer.rank, milliseconds, choice)
            )
    finally:
        model.train(was_training)
    with torch.inference_mode(False):  # merged weights must stay ordinary tensors (trainable, saveable)
        _apply(model, timings, device, dtype, tuple(pixel_values.shape))
    return timings


def _untimed_factorized_parts(model: nn.Module) -> list[str]:
    """Names the factorized modules ``tune`` leaves as they are, so its refusal can say what the model holds."""
    shared = sum(isinstance(m, SharedInputMixin) for m in model.modules())
    heads = sum(isinstance(m, HeadFactorizedAttention) for m in model.modules())
    parts = [f"shared q/k/v input projections in {shared} block(s)"] if shared else []
    return parts + ([f"head-factorized attention in {heads} block(s)"] if heads else [])


def _apply(
    model: nn.Module, timings: list[LayerTiming], device: torch.device, dtype: torch.dtype, shape: tuple
) -> None:
    plan = CompressionPlan.from_dict(model.config.compression_plan)
    for timing in timings:
        layer = model.get_submodule(timing.name)
        if timing.choice == "dense":
            set_submodule(model, timing.name, layer.merge())
            plan.layers.pop(timing.name, None)
            continue
        layer.implementation = timing.choice
        if timing.name in plan.layers:
            plan.layers[timing.name].implementation = None if timing.choice == "factorized" else timing.choice
    plan.parameters = count_parameters(model)
    previous = (plan.tuning or {}).get("merged_to_dense", [])  # an earlier tune() already merged these
    merged = sorted({*previous, *(t.name for t in timings if t.choice == "dense")})
    plan.tuning = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "example_inputs_shape": list(shape),
        "merged_to_dense": merged,
        "layers": {t.name: {k: v for k, v in asdict(t).items() if k != "name"} for t in timings},
    }
    model.config.compression_plan = plan.to_dict()
