"""The attention processor that runs COMCAT's per-head low-rank branch beside a diffusers ``Attention``.

The branch adds, per head ``h``, ``r`` query/key columns and ``r`` value columns that share the head's
softmax with the frozen ones:

    logits_h = (Q_h K_hᵀ + s·α²·Q′_h K′_hᵀ) · d_h^{-1/2}        A_h = softmax(logits_h)
    out      = to_out(concat_h A_h V_h) + s·α²·concat_h(A_h V′_h) · O′ᵀ

Both sums are concatenations in disguise: ``[Q_h | s·α²·Q′_h] · [K_h | K′_h]ᵀ`` is the first, and
``A_h · [V_h | V′_h]`` yields ``A_h V_h`` and ``A_h V′_h`` side by side. So one scaled-dot-product
attention call over heads of width ``d_h + r`` (zero-padded to a multiple of 8, with the original
scale ``d_h^{-1/2}`` passed explicitly) computes everything; several adapters just add more columns.

The processor is an ``nn.Module`` (as diffusers' IP-Adapter processors are): ``Attention.set_processor``
registers it, so its parameters move with ``.to()``, reach the optimizer through ``unet.parameters()``
and show up in ``state_dict()`` (save them with :func:`save_head_lowrank_adapter`, not
``unet.save_pretrained``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadLowRankAdapterConfig

_SERIALS = itertools.count()  # creation order of branches: adapter names are listed in the order they were added

ATTENTION_WIDTH_MULTIPLE = 8
"""Head widths are zero-padded to a multiple of this: PyTorch's memory-efficient SDPA kernel needs it
(flash attention too), and a 40-wide head plus 2 adapter columns would otherwise fall back to the math
kernel, which materializes the whole attention matrix. Zero query/key columns add 0 to the logits and
zero value columns are sliced off, so padding changes nothing else."""


def padded_width(width: int) -> int:
    return -(-width // ATTENTION_WIDTH_MULTIPLE) * ATTENTION_WIDTH_MULTIPLE


class HeadLowRankBranch(nn.Module):
    """One adapter's weights on one attention: ``Q′, K′, V′`` (input → heads·r) and ``O′`` (heads·r → output).

    Initialized like LoRA, one factor of each product random and the other zero (``K′ = 0``, ``O′ = 0``):
    both products are 0, so adding the branch leaves the model unchanged, while the gradients reach
    ``K′`` (through ``Q′``) and ``O′`` (through ``A·V′``) from the first step.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        out_dim: int,
        heads: int,
        config: HeadLowRankAdapterConfig,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.heads, self.rank_per_head, self.alpha = heads, config.rank_per_head, config.alpha
        self.serial = next(_SERIALS)
        width = heads * self.rank_per_head
        factory = {"device": device, "dtype": dtype}
        # The names end in "_lowrank" so that PEFT target names ("to_q", "to_out.0", ...) never match them.
        self.query_lowrank = nn.Linear(query_dim, width, bias=False, **factory)
        self.key_lowrank = nn.Linear(context_dim, width, bias=False, **factory)
        self.value_lowrank = nn.Linear(context_dim, width, bias=False, **factory)
        self.output_lowrank = nn.Linear(width, out_dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for random_factor in (self.query_lowrank, self.value_lowrank):
            nn.init.kaiming_uniform_(random_factor.weight, a=math.sqrt(5))
        for zero_factor in (self.key_lowrank, self.output_lowrank):
            nn.init.zeros_(zero_factor.weight)

    def project(self, linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        """``linear(inputs)`` split into heads, ``[batch, heads, tokens, r]``, in the inputs' dtype.

        The branch may be kept in another dtype than the model (float32 factors on a float16 UNet, as
        diffusers' ``cast_training_params`` recipe does): inputs are cast to it and results cast back."""
        packed = linear(inputs.to(linear.weight.dtype)).to(inputs.dtype)
        batch, tokens, _ = packed.shape
        return packed.view(batch, tokens, self.heads, self.rank_per_head).transpose(1, 2)

    def output(self, columns: torch.Tensor) -> torch.Tensor:
        """``O′`` applied to the merged ``[batch, tokens, heads·r]`` attention outputs, in their dtype."""
        return self.output_lowrank(columns.to(self.output_lowrank.weight.dtype)).to(columns.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, rank_per_head={self.rank_per_head}, alpha={self.alpha}"


class HeadLowRankAttnProcessor(nn.Module):
    """Runs an ``Attention`` as ``AttnProcessor2_0`` does, plus the active :class:`HeadLowRankBranch` es.

    ``branches`` holds every named adapter added to this attention; ``active`` and ``scales`` say which
    run and how strongly (``scale`` multiplies ``α²``: 0 turns a branch off, 1 is as trained). With no
    branch running, the call goes to ``base_processor`` unchanged, so a disabled adapter is exactly the
    original model. ``base_processor`` is restored when the last adapter is removed.
    """

    def __init__(self, base_processor) -> None:
        super().__init__()
        self.base_processor = base_processor
        self.branches = nn.ModuleDict()
        self.active: list[str] = []
        self.scales: dict[str, float] = {}
        self.enabled = True

    def running(self) -> list[tuple[str, HeadLowRankBranch, float]]:
        """``(name, branch, s·α²)`` of each branch that contributes to this call."""
        if not self.enabled:
            return []
        running = []
        for name in self.active:
            factor = self.scales[name] * self.branches[name].alpha ** 2
            if factor != 0:
                running.append((name, self.branches[name], factor))
        return running

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        running = self.running()
        if not running:
            return self.base_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        # From here on, AttnProcessor2_0 step by step, with the branch columns added around the SDPA call.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        queries, keys, values = [query], [key], [value]
        for _, branch, factor in running:
            queries.append(branch.project(branch.query_lowrank, hidden_states) * factor)
            keys.append(branch.project(branch.key_lowrank, encoder_hidden_states))
            values.append(branch.project(branch.value_lowrank, encoder_hidden_states))
        joined_width = head_dim + sum(branch.rank_per_head for _, branch, _ in running)
        if padded_width(joined_width) != joined_width:
            for columns in (queries, keys, values):
                columns.append(columns[0].new_zeros(*columns[0].shape[:3], padded_width(joined_width) - joined_width))
        attended = F.scaled_dot_product_attention(
            torch.cat(queries, dim=-1),
            torch.cat(keys, dim=-1),
            torch.cat(values, dim=-1),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            scale=base_scale(attn, self.base_processor, head_dim),
        )

        def merge_heads(columns: torch.Tensor) -> torch.Tensor:
            return columns.transpose(1, 2).reshape(batch_size, -1, columns.shape[1] * columns.shape[-1])

        hidden_states = attn.to_out[0](merge_heads(attended[..., :head_dim]).to(query.dtype))
        start = head_dim
        for _, branch, factor in running:
            columns = attended[..., start : start + branch.rank_per_head]
            hidden_states = hidden_states + branch.output(merge_heads(columns).to(query.dtype)) * factor
            start += branch.rank_per_head
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def base_scale(attn, base_processor, head_dim: int) -> float:
    """The softmax scale the original processor applies: ``AttnProcessor2_0`` leaves SDPA's default
    ``head_dim^{-1/2}`` (it ignores ``attn.scale``), the classic ``AttnProcessor`` uses ``attn.scale``."""
    from diffusers.models.attention_processor import AttnProcessor

    return attn.scale if isinstance(base_processor, AttnProcessor) else head_dim**-0.5
