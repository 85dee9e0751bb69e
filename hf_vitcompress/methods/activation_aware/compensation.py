"""Error compensation: a small trained low-rank residual per layer (Azizi et al. 2024, second stage).

After truncation to rank ``r``, the last ``q`` components of each factor pair become a trainable
residual ``C·D`` (the first ``r − q`` stay frozen). It is trained by Adam on the layer's output error
over the calibration data, where the *target* is the dense layer on the dense model's activations and
the *input* is what the compressed model actually feeds the layer, so it also absorbs the error
propagated from earlier compressed layers. Then it is folded back (it already is part of the pair).

Two deliberate differences from the paper, both measured in ``benchmarks/RESULTS.md``: the residual
starts from the next SVD components instead of from zero, so training begins at the plain rank-r
solution; and the result is kept only if it lowers the training objective on the full calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...layers import LowRankLinear


@dataclass
class CompensationResult:
    name: str
    error_before: float  # relative output error on the calibration set before training
    error_after: float
    kept: bool


def _relative_error(
    pairs: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    weight: torch.Tensor,
    layer: LowRankLinear,
    processes: CalibrationProcesses,
) -> float:
    """``‖x̂·(AB)ᵀ − x·Wᵀ‖² / ‖x·Wᵀ‖²`` over all calibration rows of all processes (biases cancel)."""
    error, energy = 0.0, 0.0
    with torch.no_grad():
        approximation = layer.dense_weight().double()
        for dense_input, compressed_input in pairs():
            target = dense_input.double() @ weight.double().T
            error += float((compressed_input.double() @ approximation.T - target).square().sum())
            energy += float(target.square().sum())
    error, energy = processes.sum_numbers([error, energy])
    return error / max(energy, 1e-30)


def train_compensation(
    layers: dict[str, tuple[torch.Tensor, LowRankLinear]],
    pairs: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    residual_rank: int,
    epochs: int,
    lr: float,
    processes: CalibrationProcesses = SINGLE_PROCESS,
    batches_per_epoch: int | None = None,
) -> list[CompensationResult]:
    """Train the last ``residual_rank`` components of each ``LowRankLinear`` in ``layers``.

    ``layers`` maps a name to ``(dense_weight [out, in], low_rank_layer)``; all of them read the same
    input. ``pairs()`` yields ``(dense_input, compressed_input)`` batches of matching rows (a fresh
    iterator per epoch). Biases are equal in both models and cancel, so they are left out.

    With several ``processes`` (each with its share of the batches) training is data-parallel: one
    step takes one batch per process and averages the gradients, so every process keeps equal weights;
    ``batches_per_epoch`` (how many batches ``pairs()`` yields here) is then needed to agree on the
    number of steps before the first one.
    """
    if processes.is_distributed and batches_per_epoch is None:
        raise ValueError("Data-parallel compensation needs batches_per_epoch (the length of this process's share).")
    results = []
    trainable = {}
    for name, (weight, layer) in layers.items():
        q = min(residual_rank, layer.rank)
        if q == 0:
            continue
        main = layer.rank - q
        up = layer.lowrank_up.weight.detach()
        down = layer.lowrank_down.weight.detach()
        trainable[name] = {
            "main": (up[:, :main].clone(), down[:main].clone()),
            "up": up[:, main:].clone().float().requires_grad_(True),
            "down": down[main:].clone().float().requires_grad_(True),
            "before": _relative_error(pairs, weight, layer, processes),
        }
    if not trainable:
        return results
    parameters = [t[k] for t in trainable.values() for k in ("up", "down")]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        for dense_input, compressed_input in _data_parallel(pairs, processes, batches_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            if dense_input is None:  # this process's share ran out before another's: contribute nothing
                _average_gradients(parameters, processes, contributes=False)
                optimizer.step()
                continue
            loss = 0.0
            for name, state in trainable.items():
                weight = layers[name][0]
                with torch.no_grad():
                    target = dense_input @ weight.float().T
                    main_up, main_down = state["main"]
                    frozen = (compressed_input @ main_down.float().T) @ main_up.float().T
                prediction = frozen + (compressed_input.float() @ state["down"].T) @ state["up"].T
                loss = loss + (prediction - target).square().mean() / target.square().mean().clamp_min(1e-30)
            loss.backward()
            _average_gradients(parameters, processes, contributes=True)
            optimizer.step()
    for name, state in trainable.items():
        weight, layer = layers[name]
        main = layer.rank - state["up"].shape[1]
        saved_up = layer.lowrank_up.weight.detach().clone()
        saved_down = layer.lowrank_down.weight.detach().clone()
        with torch.no_grad():
            layer.lowrank_up.weight[:, main:] = state["up"].to(saved_up.dtype)
            layer.lowrank_down.weight[main:] = state["down"].to(saved_down.dtype)
        after = _relative_error(pairs, weight, layer, processes)
        kept = after < state["before"]
        if not kept:
            with torch.no_grad():
                layer.lowrank_up.weight.copy_(saved_up)
                layer.lowrank_down.weight.copy_(saved_down)
        results.append(CompensationResult(name, state["before"], after if kept else state["before"], kept))
    return results


def _data_parallel(
    pairs: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    processes: CalibrationProcesses,
    batches_per_epoch: int | None,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """One epoch of ``pairs()``; with several processes, padded with ``(None, None)`` to the longest share."""
    if not processes.is_distributed:
        yield from pairs()
        return
    steps = processes.max_int(batches_per_epoch)  # agreed before any step: every step is a collective
    yielded = 0
    for pair in pairs():
        yielded += 1
        yield pair
    for _ in range(steps - yielded):
        yield None, None


def _average_gradients(parameters: list[torch.Tensor], processes: CalibrationProcesses, contributes: bool) -> None:
    """Average gradients over the processes that had a batch this step (one process: nothing to do)."""
    if not processes.is_distributed:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    counts = processes.sum_numbers([float(contributes)])[0]
    processes.sum_([parameter.grad for parameter in parameters])
    for parameter in parameters:
        parameter.grad /= counts
