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

from dataclasses import dataclass
from typing import Protocol

import torch

from ...calibration.distributed import SINGLE_PROCESS, CalibrationProcesses
from ...layers import LowRankLinear


@dataclass
class CompensationResult:
    name: str
    error_before: float  # relative output error on the calibration set before training
    error_after: float
    kept: bool


class InputPairs(Protocol):
    """This process's calibration batches of one layer: ``pairs[i]`` is ``(dense_input, compressed_input)``,
    matching rows of the layer's input in the dense and in the compressed model."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class _PassOrders:
    """The batch order of each pass over the calibration set: in order first, then seeded shuffles.

    Every pass (error measurements included) takes the next order, on every process alike, so a
    multi-process run visits the batches exactly as one process does.
    """

    def __init__(self, batches: int, seed: int) -> None:
        self.batches = batches
        self.generator = torch.Generator().manual_seed(seed)
        self.passes = 0

    def next(self) -> list[int]:
        order = torch.randperm(self.batches, generator=self.generator).tolist() if self.passes else None
        self.passes += 1
        return order if order is not None else list(range(self.batches))


def _owned(pairs: InputPairs, order: list[int], processes: CalibrationProcesses):
    """``(pair or None)`` per global batch of ``order``: batch ``g`` lives on process ``g % count``."""
    for g in order:
        yield pairs[g // processes.count] if g % processes.count == processes.index else None


def _relative_error(
    pairs: InputPairs,
    orders: _PassOrders,
    weight: torch.Tensor,
    layer: LowRankLinear,
    processes: CalibrationProcesses,
) -> float:
    """``‖x̂·(AB)ᵀ − x·Wᵀ‖² / ‖x·Wᵀ‖²`` over all calibration rows of all processes (biases cancel)."""
    error, energy = 0.0, 0.0
    with processes.together("compensation"), torch.no_grad():
        approximation = layer.dense_weight().double()
        for pair in _owned(pairs, orders.next(), processes):
            if pair is None:
                continue
            dense_input, compressed_input = pair
            target = dense_input.double() @ weight.double().T
            error += float((compressed_input.double() @ approximation.T - target).square().sum())
            energy += float(target.square().sum())
    error, energy = processes.sum_numbers([error, energy])
    return error / max(energy, 1e-30)


def train_compensation(
    layers: dict[str, tuple[torch.Tensor, LowRankLinear]],
    pairs: InputPairs,
    residual_rank: int,
    epochs: int,
    lr: float,
    seed: int = 0,
    processes: CalibrationProcesses = SINGLE_PROCESS,
) -> list[CompensationResult]:
    """Train the last ``residual_rank`` components of each ``LowRankLinear`` in ``layers``.

    ``layers`` maps a name to ``(dense_weight [out, in], low_rank_layer)``; all of them read the same
    input, whose calibration batches ``pairs`` holds. One Adam step per batch; the first pass is in
    order, later ones shuffled (``seed``). Biases are equal in both models and cancel, so they are
    left out.

    With several ``processes``, each holds its share of the batches (batch ``g`` on process
    ``g % count``). Every step is taken by all processes on the one batch whose owner computes the
    gradient (the others add zeros), so the result equals one process on all batches up to rounding.
    Only the forward passes that produced the inputs ran in parallel.
    """
    batches = len(pairs)
    if processes.is_distributed:
        batches = int(processes.sum_numbers([batches])[0])
    orders = _PassOrders(batches, seed)
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
            "before": _relative_error(pairs, orders, weight, layer, processes),
        }
    if not trainable:
        return results
    parameters = [t[k] for t in trainable.values() for k in ("up", "down")]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        for pair in _owned(pairs, orders.next(), processes):
            optimizer.zero_grad(set_to_none=True)
            with processes.together("compensation"):
                if pair is not None:
                    _loss(trainable, layers, *pair).backward()
            if processes.is_distributed:  # the owner's gradient, on every process (the others add zeros)
                for parameter in parameters:
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                processes.sum_([parameter.grad for parameter in parameters])
            optimizer.step()
    for name, state in trainable.items():
        weight, layer = layers[name]
        main = layer.rank - state["up"].shape[1]
        saved_up = layer.lowrank_up.weight.detach().clone()
        saved_down = layer.lowrank_down.weight.detach().clone()
        with torch.no_grad():
            layer.lowrank_up.weight[:, main:] = state["up"].to(saved_up.dtype)
            layer.lowrank_down.weight[main:] = state["down"].to(saved_down.dtype)
        after = _relative_error(pairs, orders, weight, layer, processes)
        kept = after < state["before"]
        if not kept:
            with torch.no_grad():
                layer.lowrank_up.weight.copy_(saved_up)
                layer.lowrank_down.weight.copy_(saved_down)
        results.append(CompensationResult(name, state["before"], after if kept else state["before"], kept))
    return results


def _loss(
    trainable: dict[str, dict],
    layers: dict[str, tuple[torch.Tensor, LowRankLinear]],
    dense_input: torch.Tensor,
    compressed_input: torch.Tensor,
) -> torch.Tensor:
    """Sum over the group's layers of the relative output error of one batch.

    Computed in float32 whatever the model's dtype: the residual is trained in float32 (a half-precision
    Adam step would round most updates away), so half-precision inputs and weights are cast up first.
    """
    loss = 0.0
    dense_input, compressed_input = dense_input.float(), compressed_input.float()
    for name, state in trainable.items():
        weight = layers[name][0]
        with torch.no_grad():
            target = dense_input @ weight.float().T
            main_up, main_down = state["main"]
            frozen = (compressed_input @ main_down.float().T) @ main_up.float().T
        prediction = frozen + (compressed_input @ state["down"].T) @ state["up"].T
        loss = loss + (prediction - target).square().mean() / target.square().mean().clamp_min(1e-30)
    return loss
