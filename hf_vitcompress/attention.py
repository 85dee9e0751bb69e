"""``HeadFactorizedAttention``: multi-head attention whose per-head products are low rank (COMCAT).

Head ``h``'s attention scores depend on ``W_Q`` and ``W_K`` only through ``W_Q^hᵀ W_K^h`` and its output
on ``W_V`` and ``W_O`` only through ``W_V^hᵀ W_O^hᵀ`` (both ``d × d``, rank ≤ ``d_h``). This module stores
rank-``r`` factors of those products, per head:

    scores_h = (x L_h + l_h)(x R_h)ᵀ · d_h^{-1/2}        out = Σ_h softmax(scores_h) (x D_h) U_hᵀ + b

``L, l`` (``qk_left``), ``R`` (``qk_right``), ``D`` (``vo_down``) and ``U, b`` (``vo_up``) are plain
``nn.Linear`` layers packing every head's factors side by side, so PEFT, quantizers and optimizers see
ordinary linears; their names match no transformers weight-renaming pattern. Ranks may differ per
head; heads whose value/output rank is 0 are gone. Different ranks are zero-padded per head inside
``forward`` so that the usual attention kernels (eager, SDPA) run unchanged, with the original scale.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def head_factorized_parameter_count(
    hidden_size: int, qk_ranks: Sequence[int], vo_ranks: Sequence[int], qk_bias: bool, out_bias: bool
) -> int:
    """Weights of a :class:`HeadFactorizedAttention` (only heads with a value/output rank count)."""
    qk = sum(q for q, v in zip(qk_ranks, vo_ranks, strict=True) if v > 0)
    vo = sum(vo_ranks)
    return 2 * qk * hidden_size + qk * qk_bias + 2 * vo * hidden_size + hidden_size * out_bias


OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj")  # ViT/DeiT/DINOv2, CLIP/SigLIP


def attention_heads(attention: nn.Module) -> int:
    """A dense self-attention's head count: ``num_attention_heads`` (ViT, DINOv2), ``num_heads`` (CLIP, SigLIP),
    else its config's."""
    for name in ("num_attention_heads", "num_heads"):
        if getattr(attention, name, None) is not None:
            return int(getattr(attention, name))
    return int(attention.config.num_attention_heads)


def attention_projection_names(attention: nn.Module) -> tuple[str, str, str, str]:
    """The names of a dense self-attention's query, key, value and output linears: ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj`` (ViT, DeiT, DINOv2) or ``out_proj`` (CLIP, SigLIP); ``ValueError`` otherwise."""
    output = next(
        (name for name in OUTPUT_PROJECTION_NAMES if isinstance(getattr(attention, name, None), nn.Linear)), None
    )
    names = ("q_proj", "k_proj", "v_proj", output)
    if output is None or not all(isinstance(getattr(attention, name, None), nn.Linear) for name in names[:3]):
        raise ValueError(
            f"{type(attention).__name__} is not a q_proj/k_proj/v_proj + o_proj (or out_proj) self-attention."
        )
    return names


def with_own_position_bias(
    attention: nn.Module, attention_mask: torch.Tensor | None, batch: int, heads: Sequence[int] | None = None
) -> torch.Tensor | None:
    """The additive score term of an attention that owns a ``relative_position_bias`` module, as ``SwinAttention``
    builds it: the bias (``[1, heads, n, n]``, only the rows of ``heads`` if given) plus the shifted-window mask
    (``[windows, n, n]``, repeated over the ``batch // windows`` images). Other attentions: ``attention_mask``."""
    module = getattr(attention, "relative_position_bias", None)
    if not isinstance(module, nn.Module):
        return attention_mask
    bias = module()
    if heads is not None:
        bias = bias[:, list(heads)]
    if attention_mask is None:
        return bias
    return bias + attention_mask.unsqueeze(1).repeat(batch // attention_mask.shape[0], 1, 1, 1)


class HeadFactorizedAttention(nn.Module):
    """Drop-in for a ViT-style attention module (``forward(hidden_states, attention_mask) -> (out, weights)``).

    ``qk_ranks[h]`` / ``vo_ranks[h]`` are head ``h``'s ranks (``0 ≤ r ≤ head_dim``); a head with
    ``vo_ranks[h] == 0`` contributes nothing and is removed, a head with ``qk_ranks[h] == 0`` attends
    uniformly. ``config`` is the model config (for ``_attn_implementation``).

    ``relative_position_bias``: the dense attention's own bias module, where it has one (Swin's
    ``SwinRelativePositionBias``, called with no arguments, ``[1, heads, n, n]``). It is kept under the same
    name, so its table loads from the same checkpoint key, and used as the dense attention uses it: the kept
    heads' rows plus the shifted-window mask (``[windows, n, n]``, repeated over the batch) when there is one.
    Build one with :func:`head_factorized_like` to carry it over.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        head_dim: int,
        qk_ranks: Sequence[int],
        vo_ranks: Sequence[int],
        qk_bias: bool = True,
        out_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        relative_position_bias: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(qk_ranks) != len(vo_ranks):
            raise ValueError(f"{len(qk_ranks)} query/key ranks but {len(vo_ranks)} value/output ranks.")
        for kind, ranks in (("query/key", qk_ranks), ("value/output", vo_ranks)):
            bad = [r for r in ranks if not 0 <= int(r) <= head_dim]
            if bad:
                raise ValueError(f"{kind} ranks must be in [0, head_dim={head_dim}]; got {bad}.")
        if not any(vo_ranks):
            raise ValueError("Every head has value/output rank 0: the attention would output only its bias.")
        self.config = config
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.scaling = head_dim**-0.5  # the original scale: the factors reproduce the original scores
        self.is_causal = False
        dropout = getattr(config, "attention_probs_dropout_prob", None)  # ViT's name; CLIP/SigLIP's below
        self.attention_dropout = float(
            (getattr(config, "attention_dropout", 0.0) if dropout is None else dropout) or 0.0
        )
        active = [h for h, v in enumerate(vo_ranks) if v > 0]
        # A per-head additive mask (BEiT's relative position bias arrives as attention_mask) has a row for every
        # head of the dense attention: the heads kept here read theirs (see forward).
        self.source_heads, self.active_heads = len(vo_ranks), active
        self.qk_ranks = [int(qk_ranks[h]) for h in active]
        self.vo_ranks = [int(vo_ranks[h]) for h in active]
        self.num_heads = len(active)
        self.qk_bias, self.out_bias = qk_bias, out_bias
        factory = {"device": device, "dtype": dtype}
        self.qk_left = nn.Linear(hidden_size, sum(self.qk_ranks), bias=qk_bias, **factory)
        self.qk_right = nn.Linear(hidden_size, sum(self.qk_ranks), bias=False, **factory)
        self.vo_down = nn.Linear(hidden_size, sum(self.vo_ranks), bias=False, **factory)
        self.vo_up = nn.Linear(sum(self.vo_ranks), hidden_size, bias=out_bias, **factory)
        self.qk_width = max(1, max(self.qk_ranks))  # a zero-width query would break attention kernels
        self.vo_width = max(self.vo_ranks)
        # Plain Python, not buffers: transformers may build the module on the meta device before loading,
        # and a non-persistent buffer would then hold garbage.
        self._qk_positions = self._packed_positions(self.qk_ranks, self.qk_width)
        self._vo_positions = self._packed_positions(self.vo_ranks, self.vo_width)
        self._index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.relative_position_bias = relative_position_bias

    @staticmethod
    def _packed_positions(ranks: Sequence[int], width: int) -> list[int]:
        """Where each packed column goes in the ``[heads × width]`` zero-padded layout."""
        return [h * width + i for h, r in enumerate(ranks) for i in range(r)]

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._index_cache:
            self._index_cache[device] = (
                torch.tensor(self._qk_positions, dtype=torch.long, device=device),
                torch.tensor(self._vo_positions, dtype=torch.long, device=device),
            )
        return self._index_cache[device]

    def _to_heads(self, packed: torch.Tensor, ranks: list[int], width: int, index: torch.Tensor) -> torch.Tensor:
        batch_shape = packed.shape[:-1]
        if all(r == width for r in ranks):  # uniform ranks: a plain view, no padding
            padded = packed
        elif torch.compiler.is_exporting():
            # an exported graph pads head by head (Split, Pad, Concat: copies) rather than scattering into zeros
            # (onnxruntime's ScatterND, with the Gather below, was 7 % of a head-factorized DINOv2-S's time)
            pieces = packed.split(ranks, dim=-1)
            padded = torch.cat([nn.functional.pad(p, (0, width - r)) for p, r in zip(pieces, ranks, strict=True)], -1)
        else:
            padded = packed.new_zeros(*batch_shape, self.num_heads * width)
            padded = padded.index_copy(-1, index, packed)
        return padded.view(*batch_shape, self.num_heads, width).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk_index, vo_index = self._indices(hidden_states.device)
        query = self._to_heads(self.qk_left(hidden_states), self.qk_ranks, self.qk_width, qk_index)
        key = self._to_heads(self.qk_right(hidden_states), self.qk_ranks, self.qk_width, qk_index)
        value = self._to_heads(self.vo_down(hidden_states), self.vo_ranks, self.vo_width, vo_index)
        if self.relative_position_bias is not None:
            kept = self.active_heads if self.num_heads != self.source_heads else None
            attention_mask = with_own_position_bias(self, attention_mask, hidden_states.shape[0], kept)
        elif (
            attention_mask is not None
            and attention_mask.dim() == 4
            and attention_mask.shape[1] == self.source_heads != self.num_heads
        ):
            attention_mask = attention_mask[:, self.active_heads]
        implementation = self._implementation()
        attention: Callable = _eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        if implementation != "eager" and self.qk_width != self.vo_width:
            # Fused kernels (SDPA's flash / memory-efficient paths) need one head width for q, k and v and
            # otherwise fall back to a path measured 3.4x slower on CPU; zero columns change nothing
            # (zero query/key columns add 0 to the scores, zero value columns are sliced off below).
            width = max(self.qk_width, self.vo_width)
            query, key = (nn.functional.pad(t, (0, width - self.qk_width)) for t in (query, key))
            value = nn.functional.pad(value, (0, width - self.vo_width))
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = output[..., : self.vo_width]
        if torch.compiler.is_exporting() and output.shape[-1] * self.num_heads != vo_index.numel():
            output = torch.cat([output[..., h, :r] for h, r in enumerate(self.vo_ranks)], dim=-1)  # Slice, Concat
        else:
            output = output.reshape(*hidden_states.shape[:-1], self.num_heads * self.vo_width)
            if output.shape[-1] != vo_index.numel():
                output = output.index_select(-1, vo_index)
        return self.vo_up(output), weights

    def _implementation(self) -> str:
        return getattr(self.config, "_attn_implementation", None) or "eager"

    def attention_matmul_width(self, implementation: str | None = None) -> int:
        """Per-token width of the two attention matmuls (``Σ_heads`` of the q·k and A·v widths) as they run
        under ``implementation`` (default: the config's current one).

        Every implementation but eager zero-pads q, k and v to one head width (see ``forward``), and the
        kernels multiply the zeros too: that is real work, counted here, so a model's MACs can differ between
        ``attn_implementation="eager"`` and ``"sdpa"``. The padded count is never the lower one.
        """
        implementation = implementation or self._implementation()
        if implementation != "eager" and self.qk_width != self.vo_width:
            return 2 * self.num_heads * max(self.qk_width, self.vo_width)
        return self.num_heads * (self.qk_width + self.vo_width)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, qk_ranks={self.qk_ranks}, vo_ranks={self.vo_ranks}"


def head_factorized_like(
    dense: nn.Module,
    head_dim: int,
    qk_ranks: Sequence[int],
    vo_ranks: Sequence[int],
    qk_bias: bool,
    out_bias: bool,
) -> HeadFactorizedAttention:
    """An empty :class:`HeadFactorizedAttention` to replace the dense self-attention ``dense``: its config, width,
    device and dtype, and a copy of its ``relative_position_bias`` module where it has one (Swin)."""
    weight = getattr(dense, attention_projection_names(dense)[0]).weight
    position_bias = getattr(dense, "relative_position_bias", None)
    return HeadFactorizedAttention(
        dense.config,
        weight.shape[1],
        head_dim,
        qk_ranks,
        vo_ranks,
        qk_bias=qk_bias,
        out_bias=out_bias,
        device=weight.device,
        dtype=weight.dtype,
        relative_position_bias=copy.deepcopy(position_bias) if isinstance(position_bias, nn.Module) else None,
    )
