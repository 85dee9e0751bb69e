"""UVC's primal-dual search as a :class:`~hf_vitcompress.CompressionController` (Yu et al., ICLR 2022).

Variables, per block ``b``: the pruned fractions ``u_b = (heads, value dims, neurons)`` and, with
``skip_blocks``, a gate logit ``θ_b``. Multipliers: ``z`` for the FLOPs constraint and ``y`` for group
sparsity. The Lagrangian the trainer minimizes is

    KD/CE loss  +  z · (F(u, σ(θ)) / F_dense − target)  +  y · Σ_{b,kind} S_b,kind(u)

where ``F`` is the analytic MAC count of :class:`~.structure.PrunableModel` (expected over the gates)
and ``S(u)`` the (normalized) total norm of the ``u·n`` weakest groups of a kind, interpolated so it is
differentiable in ``u``. In the forward pass, the ``⌊u·n⌋`` weakest groups (ranked by the norm of
their value/output or fc1/fc2 weights) are masked; the masks are straight-through (hard forward,
sigmoid backward in units of one group), so the distillation loss also pulls on ``u``. Block gates
are Gumbel-sigmoid samples, also straight-through. After each optimizer step:

* primal: SGD on ``u`` and ``θ`` (``pruning_count_lr``), clipped so every kept block keeps one head,
  one value dim and one neuron;
* proximal: the groups currently selected for pruning are shrunk, multiplied by ``1 − y``;
* dual ascent: ``z += pruning_dual_lr · (F/F_dense − target)`` (kept ≥ 0) and
  ``y += pruning_proximal_lr · S`` (capped at 1), so the budget pressure grows while the model is
  over budget and the shrinking grows while selected groups still carry weight.

Differences from the official code, on purpose: the budget is met exactly at the end by projection
(:func:`~.projection.project_to_budget`) instead of softly; the pruned structures are removed
physically (:mod:`.export`); the proximal step is the multiplicative shrink above.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerState

from ...configuration import CompressionConfig
from ...training.callbacks import CompressionController
from .importance import magnitude_scores
from .projection import project_to_budget
from .structure import (
    BlockPruning,
    PrunableModel,
    attention_layout,
    block_attention,
    mlp_layout,
    state_from_dict,
    state_to_dict,
)

STAGES = ("warmup", "search", "post")
KINDS = ("heads", "value_dims", "neurons")
GATE_TEMPERATURE = (1.0, 0.1)  # Gumbel-sigmoid temperature, annealed geometrically over the search


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return hard + soft - soft.detach()


class UVCController(CompressionController):
    """Drives the warm-up, search and post-training stages of :class:`~hf_vitcompress.PruningTrainer`."""

    name = "uvc"

    def __init__(self, structure: PrunableModel, config: CompressionConfig, budget: int) -> None:
        self.structure, self.config, self.budget = structure, config, budget
        blocks = len(structure.blocks)
        self.sizes = torch.tensor(
            [[s.heads, s.head_dim, s.neurons] for s in structure.blocks], dtype=torch.float32
        )  # groups per kind
        self.fractions = torch.zeros(blocks, 3, requires_grad=True)
        self.gate_logits = torch.full((blocks,), 3.0, requires_grad=config.skip_blocks)
        self.flops_multiplier = 0.0
        self.sparsity_multiplier = 0.0
        self.stage = "warmup"
        self.final_state: list[BlockPruning] | None = None
        self.gate_temperature = GATE_TEMPERATURE[0]
        self._orders: list[dict[str, torch.Tensor]] | None = None
        self._norms: list[dict[str, torch.Tensor]] | None = None
        self._handles: list[Any] = []
        self._model: nn.Module | None = None

    # -- hooks on the model ------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Mask the model's forward pass (value/output heads and dims, MLP neurons, block outputs)."""
        self.detach()
        self._model = model
        for b, name in enumerate(self.structure.block_names):
            block = model.get_submodule(name)
            attention = block_attention(block)[1]
            output_projection = getattr(attention, attention_layout(attention)[3])  # its input is the value heads
            self._handles.append(output_projection.register_forward_pre_hook(self._mask_hook(b, "attention")))
            # fc2, or SwiGLU's down_proj: its input is the neurons
            output = getattr(block.mlp, mlp_layout(block.mlp)[1])
            self._handles.append(output.register_forward_pre_hook(self._mask_hook(b, "neurons")))
            if self.config.skip_blocks:
                self._handles.append(block.register_forward_hook(self._gate_hook(b)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _mask_hook(self, b: int, kind: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self.stage == "warmup":
                return None
            device = args[0].device
            mask = self.attention_mask(b, device) if kind == "attention" else self.neuron_mask(b, device)
            return (args[0] * mask.to(device=args[0].device, dtype=args[0].dtype), *args[1:])

        return hook

    def _gate_hook(self, b: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
            if self.stage == "warmup":
                return None
            # a Swin layer returns (hidden_states, attention weights): the gate is on the residual stream only
            hidden = output[0] if isinstance(output, tuple) else output
            gate = self.gate(b, module.training).to(device=hidden.device, dtype=hidden.dtype)
            gated = args[0] + gate * (hidden - args[0])
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        return hook

    # -- masks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def group_norms(self, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        """Per block: the norm of each head's and each value dim's value/output weights, and of each neuron
        (the same scores the final projection uses, so the search and the projection agree on the ranking)."""
        scores = magnitude_scores(model, self.structure, include_query_key=False)
        return [
            {"heads": h.float().sqrt(), "value_dims": d.float().sqrt(), "neurons": n.float().sqrt()}
            for h, d, n in zip(scores.heads, scores.value_dims, scores.neurons, strict=True)
        ]

    def _refresh_orders(self, model: nn.Module) -> None:
        self._norms = self.group_norms(model)
        self._orders = [
            {kind: norm.argsort(dim=-1).argsort(dim=-1).float() for kind, norm in block.items()}
            for block in self._norms
        ]  # rank of each group, 0 = weakest

    def _kept(self, b: int, kind: str) -> torch.Tensor:
        """Straight-through keep mask of one kind in block ``b`` (1 = kept)."""
        column = KINDS.index(kind)
        pruned = self.fractions[b, column] * self.sizes[b, column]
        rank = self._orders[b][kind]
        hard = (rank >= torch.floor(pruned.detach())).float()
        return _straight_through(hard, torch.sigmoid(rank + 0.5 - pruned))

    def _fixed(self, b: int, which: int, device: torch.device | None) -> torch.Tensor:
        if device is None:
            return self._fixed_masks[b][which]
        key = (b, which, device)
        if key not in self._fixed_on_device:  # copied to the model's device once, not in every forward
            self._fixed_on_device[key] = self._fixed_masks[b][which].to(device)
        return self._fixed_on_device[key]

    def attention_mask(self, b: int, device: torch.device | None = None) -> torch.Tensor:
        if self.final_state is not None:
            return self._fixed(b, 0, device)
        return (self._kept(b, "heads")[:, None] * self._kept(b, "value_dims")).reshape(-1)

    def neuron_mask(self, b: int, device: torch.device | None = None) -> torch.Tensor:
        if self.final_state is not None:
            return self._fixed(b, 1, device)
        return self._kept(b, "neurons")

    def gate(self, b: int, training: bool) -> torch.Tensor:
        if self.final_state is not None:
            return torch.tensor(0.0 if self.final_state[b].skipped else 1.0)
        logit = self.gate_logits[b]
        if not training:
            return (logit.detach() > 0).float()
        uniform = torch.rand(()).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(uniform) - torch.log1p(-uniform)) / self.gate_temperature)
        return _straight_through((soft.detach() > 0.5).float(), soft)

    # -- the Lagrangian ----------------------------------------------------------------------------
    def expected_macs(self) -> torch.Tensor:
        s = self.structure
        kept = self.sizes * (1 - self.fractions)
        keep = torch.sigmoid(self.gate_logits) if self.config.skip_blocks else torch.ones(len(s.blocks))
        shapes = s.stacked()
        blocks = s.attention_macs(shapes, kept[:, 0], self.sizes[:, 1], kept[:, 1]) + s.mlp_macs(shapes, kept[:, 2])
        return s.fixed_macs + (keep * blocks).sum()

    def _sparsity(self, b: int, kind: str) -> torch.Tensor:
        """Normalized norm of the ``u·n`` weakest groups (per head for value dims), linear between counts."""
        column = KINDS.index(kind)
        pruned = self.fractions[b, column] * self.sizes[b, column]
        norms = self._norms[b][kind]
        ordered = norms.sort(dim=-1).values / norms.sum(-1, keepdim=True).clamp_min(1e-12)
        cumulative = torch.cat([ordered.new_zeros(*ordered.shape[:-1], 1), ordered.cumsum(-1)], dim=-1)
        whole = int(pruned.detach().floor().clamp(0, ordered.shape[-1] - 1))
        value = cumulative[..., whole] + (pruned - whole) * ordered[..., whole]
        return value.mean()

    def auxiliary_loss(self, model: nn.Module, state: TrainerState) -> torch.Tensor | None:
        if self.stage != "search":
            return None
        flops = self.flops_multiplier * (
            self.expected_macs() / self.structure.dense_macs - self.config.target_flops_ratio
        )
        sparsity = sum(self._sparsity(b, kind) for b in range(len(self.structure.blocks)) for kind in KINDS)
        return flops + self.sparsity_multiplier * sparsity

    # -- stages ------------------------------------------------------------------------------------
    def _stage_at(self, step: int, max_steps: int) -> str:
        warmup_end = round(self.config.pruning_warmup_ratio * max_steps)
        search_end = round((self.config.pruning_warmup_ratio + self.config.pruning_search_ratio) * max_steps)
        if step < warmup_end:
            return "warmup"
        return "search" if step < search_end else "post"

    def on_train_begin(self, model: nn.Module, state: TrainerState) -> None:
        if self._model is None:
            self.attach(model)
        self.on_step_begin(model, state)

    def on_step_begin(self, model: nn.Module, state: TrainerState) -> None:
        stage = self._stage_at(state.global_step, state.max_steps)
        if stage == "post" and self.final_state is None:
            self.finalize(model)
        if stage != "post":
            self.stage = stage
        if self.stage == "search":
            warmup_end = round(self.config.pruning_warmup_ratio * state.max_steps)
            length = max(1, round(self.config.pruning_search_ratio * state.max_steps))
            progress = min(1.0, (state.global_step - warmup_end) / length)
            start, end = GATE_TEMPERATURE
            self.gate_temperature = start * (end / start) ** progress
            self._refresh_orders(model)

    @torch.no_grad()
    def on_optimizer_step(self, model: nn.Module, state: TrainerState) -> None:
        if self.stage != "search":
            return
        lr = self.config.pruning_count_lr
        if self.fractions.grad is not None:
            self.fractions -= lr * self.fractions.grad
        self.fractions.copy_(torch.minimum(self.fractions.clamp_min(0), (self.sizes - 1) / self.sizes))
        if self.config.skip_blocks and self.gate_logits.grad is not None:
            self.gate_logits -= lr * self.gate_logits.grad
            self.gate_logits.clamp_(-6, 6)
        self.fractions.grad = None
        self.gate_logits.grad = None

        self._refresh_orders(model)
        selected = self._shrink(model, max(0.0, 1.0 - self.sparsity_multiplier))
        ratio = float(self.expected_macs()) / self.structure.dense_macs
        self.flops_multiplier = max(
            0.0, self.flops_multiplier + self.config.pruning_dual_lr * (ratio - self.config.target_flops_ratio)
        )
        self.sparsity_multiplier = min(1.0, self.sparsity_multiplier + self.config.pruning_proximal_lr * selected)

    def _selected(self, b: int, kind: str) -> torch.Tensor:
        column = KINDS.index(kind)
        count = int(float(self.fractions[b, column].detach() * self.sizes[b, column]))
        return self._orders[b][kind] < count

    def _shrink(self, model: nn.Module, factor: float) -> float:
        """Multiply the groups selected for pruning by ``factor``; return their remaining normalized norm."""
        remaining = []
        for b, name in enumerate(self.structure.block_names):
            block = model.get_submodule(name)
            dims = (self._selected(b, "heads")[:, None] | self._selected(b, "value_dims")).reshape(-1)
            neurons = self._selected(b, "neurons")
            inputs, output = mlp_layout(block.mlp)
            attention = block_attention(block)[1]
            _, _, value, projection = attention_layout(attention)
            pairs = (
                (dims, [getattr(attention, value)], getattr(attention, projection)),
                (neurons, [getattr(block.mlp, name) for name in inputs], getattr(block.mlp, output)),
            )
            for mask, row_linears, columns in pairs:  # a group is rows of the first linears and columns of the last
                if not bool(mask.any()):
                    continue
                scale = torch.where(mask, factor, 1.0).to(columns.weight.device)
                for rows in row_linears:
                    rows.weight.mul_(scale[:, None].to(rows.weight.dtype))
                    if rows.bias is not None:
                        rows.bias.mul_(scale.to(rows.bias.dtype))
                columns.weight.mul_(scale[None, :].to(columns.weight.dtype))
            norms = self._norms[b]
            dim_norms = norms["value_dims"].reshape(-1)
            remaining.append(float(factor * dim_norms[dims.cpu()].sum() / dim_norms.sum().clamp_min(1e-12)))
            remaining.append(
                float(factor * norms["neurons"][neurons.cpu()].sum() / norms["neurons"].sum().clamp_min(1e-12))
            )
        return sum(remaining) / max(len(remaining), 1)

    @torch.no_grad()
    def searched_state(self, model: nn.Module) -> list[BlockPruning]:
        """The hard structure the search currently selects (before projection onto the budget)."""
        self._refresh_orders(model)
        state = []
        for b, shape in enumerate(self.structure.blocks):
            heads = [h for h in range(shape.heads) if not self._selected(b, "heads")[h]]
            pruned_dims = int(float(self.fractions[b, 1] * self.sizes[b, 1]))
            dims = [
                sorted(
                    self._norms[b]["value_dims"][h].argsort(descending=True)[: shape.head_dim - pruned_dims].tolist()
                )
                for h in heads
            ]
            neurons = [j for j in range(shape.neurons) if not self._selected(b, "neurons")[j]]
            skipped = self.config.skip_blocks and float(self.gate_logits[b]) <= 0
            state.append(BlockPruning(heads, dims, neurons, skipped))
        if all(block.skipped for block in state):  # keep the block the gates like most
            state[int(self.gate_logits.argmax())].skipped = False
        return state

    def projected_state(self, model: nn.Module) -> list[BlockPruning]:
        """The fixed structure: the final one once the search has ended, else the current search state (or,
        before the search, nothing pruned) projected onto the budget. Changes nothing in the controller."""
        if self.final_state is not None:
            return self.final_state
        start = self.searched_state(model) if self.stage == "search" else None
        scores = magnitude_scores(model, self.structure, include_query_key=False)
        return project_to_budget(self.structure, scores, self.budget, start, skip_blocks=self.config.skip_blocks)

    def finalize(self, model: nn.Module) -> list[BlockPruning]:
        """End the search: project its structure onto the budget exactly and fix the masks."""
        if self.final_state is None:
            self.set_final_state(self.projected_state(model))
        self.stage = "post"
        return self.final_state

    def set_final_state(self, state: list[BlockPruning]) -> None:
        self.structure.check_state(state)
        self.final_state = state
        self._fixed_on_device = {}
        self._fixed_masks = []
        for block, shape in zip(state, self.structure.blocks, strict=True):
            attention = torch.zeros(shape.heads, shape.head_dim)
            for h, dims in zip(block.heads, block.value_dims, strict=True):
                attention[h, dims] = 1.0
            neurons = torch.zeros(shape.neurons)
            neurons[block.neurons] = 1.0
            self._fixed_masks.append((attention.reshape(-1), neurons))
        self.stage = "post"

    # -- logging and checkpoints -------------------------------------------------------------------
    def metrics(self, model: nn.Module, state: TrainerState) -> dict[str, float]:
        if self.final_state is not None:
            ratio = self.structure.macs(self.final_state) / self.structure.dense_macs
        else:
            with torch.no_grad():
                ratio = float(self.expected_macs()) / self.structure.dense_macs if self.stage == "search" else 1.0
        kept = (1 - self.fractions.detach()).mean(0)
        return {
            "pruning/stage": STAGES.index(self.stage),
            "pruning/flops_ratio": ratio,
            "pruning/flops_multiplier": self.flops_multiplier,
            "pruning/sparsity_multiplier": self.sparsity_multiplier,
            **{f"pruning/kept_{kind}": float(kept[i]) for i, kind in enumerate(KINDS)},
            **(
                {"pruning/kept_blocks": float((self.gate_logits > 0).float().mean())} if self.config.skip_blocks else {}
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "fractions": self.fractions.detach().tolist(),
            "gate_logits": self.gate_logits.detach().tolist(),
            "flops_multiplier": self.flops_multiplier,
            "sparsity_multiplier": self.sparsity_multiplier,
            "gate_temperature": self.gate_temperature,
            "final_state": None if self.final_state is None else state_to_dict(self.final_state),
        }

    @torch.no_grad()
    def load_state_dict(self, data: dict[str, Any]) -> None:
        fractions = torch.tensor(data["fractions"])
        if fractions.shape != self.fractions.shape or data["stage"] not in STAGES:
            raise ValueError("The saved pruning state is for a different model (block count differs).")
        self.fractions.copy_(fractions)
        self.gate_logits.copy_(torch.tensor(data["gate_logits"]))
        self.flops_multiplier = float(data["flops_multiplier"])
        self.sparsity_multiplier = float(data["sparsity_multiplier"])
        self.gate_temperature = float(data.get("gate_temperature", GATE_TEMPERATURE[0]))
        self.stage = data["stage"]
        if data.get("final_state") is not None:
            self.set_final_state(state_from_dict(data["final_state"]))
        if not math.isfinite(self.flops_multiplier):
            raise ValueError("The saved pruning state holds a non-finite FLOPs multiplier.")
