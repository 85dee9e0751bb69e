"""What structured pruning can remove from a ViT-style model, and what each choice costs in MACs.

Three kinds of groups per encoder block, plus the block itself:

* a **head**: its rows of ``q_proj`` / ``k_proj`` / ``v_proj`` and its columns of ``o_proj``;
* a **value dim** inside a head: one row of ``v_proj`` and the matching column of ``o_proj``. Every kept
  head of a block keeps the same number of value dims (each its own best ones), so the pruned attention
  runs as a plain multi-head attention with a narrower value head, without padding between heads;
* an **MLP neuron**: one row of ``fc1`` and the matching column of ``fc2`` (SwiGLU: one row of ``gate_proj`` and
  of ``up_proj``, one column of ``down_proj``; see :func:`mlp_layout`);
* the **block**: skipped entirely (the residual stream passes through).

MACs are counted the way :func:`hf_vitcompress.evaluation.count_macs` counts a real forward pass (every
linear and convolution and both attention matmuls); the fixed part outside the blocks (patch embedding,
pooler, classifier) is *measured* with it once, so the two counts agree by construction. Each block is costed at
its own width and token counts, measured in that same pass (:class:`BlockShape`): a ViT's blocks are all alike,
a Swin's differ by stage and attend within (padded) windows. The attention is ``attention`` (ViT, DINOv2, BEiT)
or ``self_attn`` (CLIP, SigLIP), its output projection ``o_proj`` or ``out_proj`` (:func:`block_attention`).

The budget is counted for the costliest attention implementation, whichever one is active while
pruning. A pruned attention keeps full-width query/key heads and narrower value heads; fused kernels
(SDPA, the transformers default, and flash attention) need one head width, so
:class:`~hf_vitcompress.attention.HeadFactorizedAttention` zero-pads the value heads and the A·V matmul
then costs the full head width, while eager attention runs it at the value width. A checkpoint is
loaded with whatever implementation its user picks (SDPA unless told otherwise), so counting the
eager cost for a model pruned under eager attention let it run over its budget after a reload (5.2 %
over in issue 14's report). Counting the padded cost makes the budget hold under every implementation;
eager attention then runs a little below it. (Not padding is no way out: with unequal widths SDPA falls
back to its math path, 1.5-2x slower than the padded fused kernel on CPU, ``benchmarks/sdpa_padding.py``.)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, astuple, dataclass, field
from typing import Any

import torch
from torch import nn

from ...attention import attention_heads, attention_projection_names
from ...calibration.data import image_config_of, image_size_of, interpolated_positions
from ...evaluation import count_macs
from ...families import family_for


class PruningError(ValueError):
    """A pruning request that cannot be met (unreachable budget, unsupported model, bad state)."""


@dataclass(frozen=True)
class BlockShape:
    """The dense shape of one encoder block, and what it runs on per image (measured, see ``PrunableModel.of``).

    ``tokens`` enter the block and its MLP runs on them; its q/k/v/o projections run on ``attention_tokens`` rows
    and each query attends to ``span`` keys. A ViT block attends globally (both are ``tokens``); a Swin block
    attends within windows: ``attention_tokens`` is every window's tokens (the grid padded to whole windows) and
    ``span`` one window's. The fields may be tensors (one entry per block, :meth:`PrunableModel.stacked`).
    """

    heads: int
    head_dim: int
    neurons: int
    hidden: int
    tokens: int
    attention_tokens: int
    span: int


@dataclass
class BlockPruning:
    """What one block keeps: head indices, each kept head's value dims (same count per head), MLP neurons."""

    heads: list[int]
    value_dims: list[list[int]]
    neurons: list[int]
    skipped: bool = False

    @property
    def value_dim(self) -> int:
        return len(self.value_dims[0]) if self.value_dims else 0

    def copy(self) -> BlockPruning:
        return BlockPruning(list(self.heads), [list(d) for d in self.value_dims], list(self.neurons), self.skipped)


# An MLP's input linears (a neuron is one row of each) and its output linear (a neuron is one column): the GELU
# MLP of ViT / DeiT / DINOv2 / BEiT, and the SwiGLU MLP of DINOv2 ViT-g.
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = ((("fc1",), "fc2"), (("gate_proj", "up_proj"), "down_proj"))


# Where a block holds its self-attention: ViT / DeiT / DINOv2 / BEiT (``attention``), CLIP / SigLIP (``self_attn``).
ATTENTION_ATTRIBUTES = ("attention", "self_attn")


def block_attention(block: nn.Module) -> tuple[str, nn.Module | None]:
    """``(attribute name, module)`` of ``block``'s self-attention; the module is ``None`` when it has none."""
    for name in ATTENTION_ATTRIBUTES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name, getattr(block, name)
    return ATTENTION_ATTRIBUTES[0], None


def attention_layout(attention: nn.Module | None) -> tuple[str, str, str, str] | None:
    """The query, key, value and output linear names of a dense self-attention (``o_proj`` or ``out_proj``), or
    ``None`` when it is not one (already pruned or factorized, or another layout)."""
    try:
        return attention_projection_names(attention) if attention is not None else None
    except ValueError:
        return None


def mlp_layout(mlp: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """``(input linear names, output linear name)`` of a dense ``mlp``, or ``None`` when it has neither layout."""
    for inputs, output in MLP_LAYOUTS:
        if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in (*inputs, output)):
            return inputs, output
    return None


@dataclass
class PrunableModel:
    """Facts about a model that pruning needs: block names and shapes (widths, token counts), fixed MACs."""

    block_names: list[str]
    blocks: list[BlockShape]
    fixed_macs: int
    mlp_inputs: int = 1  # linears a neuron is a row of: 1 (fc1), 2 (SwiGLU's gate_proj and up_proj)
    dense_macs: int = field(init=False)

    def __post_init__(self) -> None:
        self.dense_macs = self.fixed_macs + sum(self.block_macs(shape) for shape in self.blocks)

    @classmethod
    def of(cls, model: nn.Module, image_size: tuple[int, int] | None = None) -> PrunableModel:
        """Inspect the dense ``model``: one forward pass at ``image_size`` (default ``config.image_size``) counts
        its MACs and, per block, the tokens it runs on.

        The FLOPs budget must be met at the resolution the model will serve (tokens grow with the image area and
        attention with their square); at another size than the config's the forward runs with
        ``interpolate_pos_encoding=True``, counted by :func:`~hf_vitcompress.evaluation.count_macs`, so that this
        count and a later one of the pruned model agree by construction.
        """
        family = family_for(model)
        if family.image_tower is not None:
            raise PruningError(
                f"{type(model).__name__} is two towers and pruning works on one: compress(model, config) prunes its "
                "image tower and keeps the text tower; to search the structure with PruningTrainer, train the image "
                "tower (e.g. model.vision_model) on images."
            )
        names = family.block_names(model)
        blocks = [model.get_submodule(name) for name in names]
        parts, layouts = [], set()
        for name, block in zip(names, blocks, strict=True):
            _, attention = block_attention(block)
            mlp = getattr(block, "mlp", None)
            layout = mlp_layout(mlp) if mlp is not None else None
            if attention_layout(attention) is None or layout is None:
                raise PruningError(
                    f"Block {name} of {type(model).__name__} is not a dense attention (q_proj/k_proj/v_proj with "
                    "o_proj or out_proj) + MLP (fc1/fc2, or SwiGLU gate_proj/up_proj/down_proj) block: structured "
                    "pruning needs the dense model (prune before factorizing, and do not prune an already pruned model)."
                )
            layouts.add(layout)
            parts.append((attention, getattr(mlp, layout[0][0]).out_features))
        if len(layouts) != 1:
            raise PruningError(f"The blocks of {type(model).__name__} mix MLP layouts {sorted(layouts)}.")
        size = tuple(image_size) if image_size is not None else image_size_of(model.config)
        total, geometry = _measure(model, blocks, [attention for attention, _ in parts], size)
        shapes = [
            BlockShape(attention_heads(attention), attention.head_dim, neurons, attention.q_proj.in_features, *seen)
            for (attention, neurons), seen in zip(parts, geometry, strict=True)
        ]
        mlp_inputs = len(next(iter(layouts))[0])
        partial = cls([], [], 0, mlp_inputs)
        fixed = total - sum(partial.block_macs(shape) for shape in shapes)
        return cls(names, shapes, fixed, mlp_inputs)

    def stacked(self) -> BlockShape:
        """Every block's shape as one :class:`BlockShape` of float tensors (for costs of all blocks at once)."""
        columns = zip(*(astuple(shape) for shape in self.blocks), strict=True)
        return BlockShape(*(torch.tensor(column, dtype=torch.float64) for column in columns))

    # -- MACs --------------------------------------------------------------------------------------
    def attention_macs(self, shape: BlockShape, heads: Any, head_dim: Any, value_dim: Any, padded: bool = True) -> Any:
        """Q and K projections, V and O, and both attention matmuls of a block of ``shape`` keeping ``heads``
        heads of ``head_dim`` query/key and ``value_dim`` value dims (works on floats and tensors).

        ``padded`` (the default, what budgets are counted with): the cost under a fused attention kernel
        (SDPA, the transformers default), which zero-pads narrower value heads to the query/key width, so
        the A·V matmul costs the full head width. ``padded=False``: the cost under eager attention, which
        runs it at the value width. The padded cost is never lower, so a budget met with it holds under
        every implementation (see the module docstring).
        """
        rows, d, span = shape.attention_tokens, shape.hidden, shape.span
        attention_values = head_dim if padded else value_dim
        return heads * (2 * rows * d * head_dim + rows * span * head_dim) + heads * (
            2 * rows * d * value_dim + rows * span * attention_values
        )

    def value_dim_macs(self, shape: BlockShape, heads: int) -> int:
        """What one more (or one fewer) value dim in each of ``heads`` heads of a block of ``shape`` costs."""
        return self.attention_macs(shape, heads, 0, 1)

    def mlp_macs(self, shape: BlockShape, neurons: Any) -> Any:
        return (self.mlp_inputs + 1) * shape.tokens * shape.hidden * neurons

    def block_macs(self, shape: BlockShape) -> int:
        return self.attention_macs(shape, shape.heads, shape.head_dim, shape.head_dim) + self.mlp_macs(
            shape, shape.neurons
        )

    def macs(self, state: list[BlockPruning], padded: bool = True) -> int:
        """MACs per image of the model pruned as ``state`` says: by default under a fused attention kernel
        (the most it costs under any implementation); ``padded=False``: under eager attention."""
        total = self.fixed_macs
        for shape, block in zip(self.blocks, state, strict=True):
            if not block.skipped:
                total += self.attention_macs(shape, len(block.heads), shape.head_dim, block.value_dim, padded)
                total += self.mlp_macs(shape, len(block.neurons))
        return total

    def minimum_macs(self, skip_blocks: bool) -> int:
        """The least a model can cost: every block skipped but one, or every block at one head/dim/neuron."""
        smallest = [self.attention_macs(shape, 1, shape.head_dim, 1) + self.mlp_macs(shape, 1) for shape in self.blocks]
        if skip_blocks:
            return self.fixed_macs + min(smallest)
        return self.fixed_macs + sum(smallest)

    def full_state(self) -> list[BlockPruning]:
        return [
            BlockPruning(
                list(range(shape.heads)),
                [list(range(shape.head_dim)) for _ in range(shape.heads)],
                list(range(shape.neurons)),
            )
            for shape in self.blocks
        ]

    def check_budget(self, ratio: float, skip_blocks: bool) -> int:
        """The MAC budget for ``ratio``, or a :class:`PruningError` naming the smallest reachable ratio."""
        budget = int(ratio * self.dense_macs)
        floor = self.minimum_macs(skip_blocks)
        if budget < floor:
            hint = "" if skip_blocks else " (skip_blocks=True would allow whole blocks to go, down to one kept block)"
            raise PruningError(
                f"target_flops_ratio={ratio} is out of reach: keeping one head with one value dim and one MLP neuron "
                f"{'in a single block' if skip_blocks else 'per block'} still costs {floor / self.dense_macs:.3f} of the "
                f"dense FLOPs (the patch embedding and classifier alone {self.fixed_macs / self.dense_macs:.3f}){hint}."
            )
        return budget

    def check_state(self, state: list[BlockPruning]) -> None:
        if len(state) != len(self.blocks):
            raise PruningError(f"A pruning state for {len(state)} blocks; the model has {len(self.blocks)}.")
        if all(block.skipped for block in state):
            raise PruningError("Every block would be skipped; at least one must stay.")
        for name, shape, block in zip(self.block_names, self.blocks, state, strict=True):
            if block.skipped:
                continue
            ok = (
                block.heads
                and len(set(block.heads)) == len(block.heads)
                and all(0 <= h < shape.heads for h in block.heads)
                and len(block.value_dims) == len(block.heads)
                and block.value_dim >= 1
                and all(len(d) == block.value_dim and all(0 <= i < shape.head_dim for i in d) for d in block.value_dims)
                and block.neurons
                and all(0 <= j < shape.neurons for j in block.neurons)
            )
            if not ok:
                raise PruningError(f"Invalid pruning state for {name}: {asdict(block)}")


def state_to_dict(state: list[BlockPruning]) -> list[dict[str, Any]]:
    return [asdict(block) for block in state]


def state_from_dict(data: list[dict[str, Any]]) -> list[BlockPruning]:
    return [BlockPruning(**block) for block in data]


def _measure(
    model: nn.Module, blocks: list[nn.Module], attentions: list[nn.Module], image_size: tuple[int, int]
) -> tuple[int, list[tuple[int, int, int]]]:
    """MACs of one forward pass on one image of ``image_size``, and per block ``(tokens, attention_tokens, span)``:
    the tokens entering the block, and the rows and the sequence length its attention is called with."""
    config = model.config
    parameter = next(model.parameters())
    channels = image_config_of(config).num_channels
    pixels = torch.zeros(1, channels, *image_size, dtype=parameter.dtype, device=parameter.device)
    tokens: dict[int, int] = {}
    attention_calls: dict[int, tuple[int, int]] = {}

    def block_hook(index):
        def hook(_module, args):  # returns None: the block's inputs stay as they are
            tokens.setdefault(index, args[0].shape[1])

        return hook

    def attention_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            attention_calls.setdefault(index, (hidden.shape[0] * hidden.shape[1], hidden.shape[1]))

        return hook

    handles = [block.register_forward_pre_hook(block_hook(i)) for i, block in enumerate(blocks)]
    handles += [a.register_forward_pre_hook(attention_hook(i), with_kwargs=True) for i, a in enumerate(attentions)]
    try:
        with interpolated_positions(model) if image_size != image_size_of(config) else nullcontext():
            total = count_macs(model, pixels)
    finally:
        for handle in handles:
            handle.remove()
    return total, [(tokens[i], *attention_calls[i]) for i in range(len(blocks))]
