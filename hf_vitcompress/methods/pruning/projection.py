"""Projection onto the FLOPs budget: the one step every pruning route (one-shot and UVC) ends with.

Greedy knapsack on additive importance scores: while the model costs more than the budget, take the
move that loses the least importance per MAC saved (drop a block's weakest neuron, its weakest head,
one value dim from each of its heads, or, if allowed, skip the block); then, while something fits in
what is left of the budget, add back the removed group that brings the most importance per MAC. The
result costs at most the budget and, when MLP neurons were pruned, less than one neuron below it.
"""

from __future__ import annotations

import torch

from .importance import GroupScores
from .structure import BlockPruning, PrunableModel, PruningError


def _sorted(indices: list[int], scores: torch.Tensor, descending: bool = False) -> list[int]:
    return sorted(indices, key=lambda i: (float(scores[i]), i), reverse=descending)


def project_to_budget(
    structure: PrunableModel,
    scores: GroupScores,
    budget: int,
    state: list[BlockPruning] | None = None,
    skip_blocks: bool = False,
) -> list[BlockPruning]:
    """The pruning state closest to ``state`` (default: nothing pruned) that costs at most ``budget`` MACs."""
    state = [block.copy() for block in (state or structure.full_state())]
    # Kept groups sorted weakest first, so each block's next candidate of each kind is at the front.
    for b, block in enumerate(state):
        block.neurons = _sorted(block.neurons, scores.neurons[b])
        order = _sorted(block.heads, scores.heads[b])
        dims_of = dict(zip(block.heads, block.value_dims, strict=True))
        block.heads = order
        block.value_dims = [_sorted(dims_of[h], scores.value_dims[b][h]) for h in order]

    def head_value(b: int, position: int) -> float:
        block = state[b]
        h = block.heads[position]
        qk = float(scores.heads[b][h] - scores.value_dims[b][h].sum())
        return qk + float(scores.value_dims[b][h][block.value_dims[position]].sum())

    def removals(b: int) -> list[tuple[float, str]]:
        block, shape = state[b], structure.blocks[b]
        if block.skipped:
            return []
        moves = []
        if len(block.neurons) > 1:
            moves.append((float(scores.neurons[b][block.neurons[0]]) / structure.mlp_macs(shape, 1), "neuron"))
        if len(block.heads) > 1:
            weakest = min(range(len(block.heads)), key=lambda p: head_value(b, p))
            block.heads.insert(0, block.heads.pop(weakest))
            block.value_dims.insert(0, block.value_dims.pop(weakest))
            saved = structure.attention_macs(shape, 1, shape.head_dim, block.value_dim)
            moves.append((head_value(b, 0) / saved, "head"))
        if block.value_dim > 1:
            value = sum(float(scores.value_dims[b][h][dims[0]]) for h, dims in zip(block.heads, block.value_dims))
            moves.append((value / structure.value_dim_macs(shape, len(block.heads)), "dim"))
        if skip_blocks:
            value = sum(head_value(b, p) for p in range(len(block.heads)))
            value += float(scores.neurons[b][block.neurons].sum())
            macs = structure.attention_macs(shape, len(block.heads), shape.head_dim, block.value_dim)
            moves.append((value / (macs + structure.mlp_macs(shape, len(block.neurons))), "skip"))
        return moves

    cost = structure.macs(state)
    moves = {b: removals(b) for b in range(len(state))}  # only the block a move touched changes
    while cost > budget:
        last_block = sum(not block.skipped for block in state) == 1
        candidates = [
            (ratio, b, kind)
            for b, options in moves.items()
            for ratio, kind in options
            if not (kind == "skip" and last_block)
        ]
        if not candidates:
            raise PruningError(
                f"Cannot prune below {cost / structure.dense_macs:.3f} of the dense FLOPs from this state; the budget is "
                f"{budget / structure.dense_macs:.3f} (allow skip_blocks=True, or a larger target_flops_ratio)."
            )
        _, b, kind = min(candidates)
        block = state[b]
        if kind == "neuron":
            block.neurons.pop(0)
        elif kind == "head":
            block.heads.pop(0)
            block.value_dims.pop(0)
        elif kind == "dim":
            block.value_dims = [dims[1:] for dims in block.value_dims]
        else:
            block.skipped = True
        moves[b] = removals(b)
        cost = structure.macs(state)

    # Fill what is left of the budget, most important group per MAC first.
    removed_neurons = [
        []
        if block.skipped
        else _sorted(sorted(set(range(shape.neurons)) - set(block.neurons)), scores.neurons[b], True)
        for b, (block, shape) in enumerate(zip(state, structure.blocks, strict=True))
    ]

    def head_with_dims(b: int, h: int) -> tuple[float, list[int]]:
        dims = _sorted(list(range(structure.blocks[b].head_dim)), scores.value_dims[b][h], descending=True)
        dims = dims[: state[b].value_dim]
        return float(scores.heads[b][h] - scores.value_dims[b][h].sum() + scores.value_dims[b][h][dims].sum()), dims

    while True:
        slack = budget - cost
        best: tuple[float, int, str, int] | None = None
        for b, (block, shape) in enumerate(zip(state, structure.blocks, strict=True)):
            if block.skipped:
                continue
            options = []
            if removed_neurons[b] and structure.mlp_macs(shape, 1) <= slack:
                options.append(
                    (float(scores.neurons[b][removed_neurons[b][0]]) / structure.mlp_macs(shape, 1), b, "neuron", 0)
                )
            macs = structure.attention_macs(shape, 1, shape.head_dim, block.value_dim)
            gone = [h for h in range(shape.heads) if h not in block.heads]
            if gone and macs <= slack:
                h = max(gone, key=lambda h: head_with_dims(b, h)[0])
                options.append((head_with_dims(b, h)[0] / macs, b, "head", h))
            macs = structure.value_dim_macs(shape, len(block.heads))
            if block.value_dim < shape.head_dim and macs <= slack:
                total = sum(
                    max(float(scores.value_dims[b][h][i]) for i in range(shape.head_dim) if i not in dims)
                    for h, dims in zip(block.heads, block.value_dims, strict=True)
                )
                options.append((total / macs, b, "dim", 0))
            best = max([best, *options] if best else options, default=None)
        if best is None:
            break
        _, b, kind, index = best
        block, shape = state[b], structure.blocks[b]
        if kind == "neuron":
            block.neurons.append(removed_neurons[b].pop(0))
        elif kind == "head":
            block.heads.append(index)
            block.value_dims.append(head_with_dims(b, index)[1])
        else:
            for h, dims in zip(block.heads, block.value_dims, strict=True):
                missing = [i for i in range(shape.head_dim) if i not in dims]
                dims.append(max(missing, key=lambda i: float(scores.value_dims[b][h][i])))
        cost = structure.macs(state)

    for block in state:  # canonical order: original index order
        pairs = sorted(zip(block.heads, block.value_dims, strict=True))
        block.heads = [h for h, _ in pairs]
        block.value_dims = [sorted(dims) for _, dims in pairs]
        block.neurons = sorted(block.neurons)
    structure.check_state(state)
    return state
