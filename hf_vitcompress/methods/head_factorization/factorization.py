"""Per-head SVDs of the attention products ``W_Q^hᵀ W_K^h`` and ``W_V^hᵀ W_O^hᵀ`` (COMCAT), activation-aware.

Both products are ``d × d`` but have rank ≤ ``d_h``: each is ``a bᵀ`` with thin ``a, b`` (``d × d_h``).
Their SVD comes from two thin QRs and one ``d_h × d_h`` SVD, so no ``d × d`` matrix is ever formed.

Metrics (``G = E[xᵀx] = S Sᵀ`` of the attention input, ``x̃ = [x, 1]``, ``G̃ = E[x̃ᵀx̃] = S̃ S̃ᵀ``):

* scores: ``E_ij[(x̃_i ΔM x_jᵀ)²] = ‖S̃ᵀ ΔM S‖²_F`` with ``M = [W_Qᵀ; b_Qᵀ] W_K``. The query bias rides
  along as the last row of ``M`` (the homogeneous coordinate), so it is kept to the same optimal
  truncation as the weights instead of being dropped; the key bias adds ``q_i·b_K`` to every score of
  row ``i``, which softmax ignores, so it is dropped exactly.
* outputs: ``E[(A_h x ΔN)²] = ‖S_hᵀ ΔN‖²_F`` with ``N = W_Vᵀ W_Oᵀ`` and ``S_h`` the root of the Gram of
  the head's attention-mixed tokens ``A_h x`` (:mod:`hf_vitcompress.calibration.attention_mixing`); the
  Gram of ``x`` itself when those were not collected. Attention rows sum to one, so the value bias
  contributes the constant ``b_V W_Oᵀ`` per head, folded exactly into the output bias.

In both cases the error of rank ``r`` is the sum of the discarded ``σ²`` (full rank ``d_h`` is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...calibration.attention_mixing import HeadMixingStatistics
from ...calibration.gram import LayerStatistics
from ...calibration.whitening import GramRoot, gram_root, identity_root


@dataclass
class ProductSVD:
    """SVD of one head's product in its metric: ``M ≈ left[:, :r] @ right[:, :r]ᵀ``, strongest first."""

    left: torch.Tensor  # [p, k]
    right: torch.Tensor  # [q, k]
    spectrum: torch.Tensor  # [k] σ², float64: error removed by each component

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.left[:, :rank], self.right[:, :rank]

    def discarded_energy(self, rank: int) -> float:
        return float(self.spectrum[rank:].sum())


def product_svd(a: torch.Tensor, b: torch.Tensor, left_root: GramRoot, right_root: GramRoot) -> ProductSVD:
    """SVD of ``M = a bᵀ`` (``a [p, k]``, ``b [q, k]``, ``k`` small) minimizing ``‖S_lᵀ ΔM S_r‖_F``."""
    a_w, b_w = left_root.matrix.T @ a, right_root.matrix.T @ b
    q_a, r_a = torch.linalg.qr(a_w)
    q_b, r_b = torch.linalg.qr(b_w)
    u, sigma, vh = torch.linalg.svd(r_a @ r_b.T)
    scale = sigma.sqrt()
    left = left_root.solve_transpose(q_a @ (u * scale))
    right = right_root.solve_transpose(q_b @ (vh.T * scale))
    return ProductSVD(left, right, sigma.square())


@dataclass
class AttentionFactorization:
    """Every head's two product SVDs for one attention module, plus the exactly folded output bias."""

    qk: list[ProductSVD]
    vo: list[ProductSVD]
    out_bias: torch.Tensor | None
    qk_bias: bool
    head_dim: int
    solver: str
    # How many of the dense q/k biases, and whether the v bias, exist: what a head costs kept dense (BEiT's
    # key projection has no bias, ViT's has one).
    dense_qk_biases: int = 2
    dense_v_bias: int = 1

    def rank_costs(self, hidden: int) -> tuple[int, int]:
        """Weights one rank of a head's Q·Kᵀ (``L``, ``R`` and the query bias) and of its V·O (``D``, ``U``) cost."""
        return 2 * hidden + self.qk_bias, 2 * hidden


def factorize_attention(
    attention: nn.Module,
    statistics: LayerStatistics | None,
    damping: float = 1e-6,
    mixing: HeadMixingStatistics | None = None,
) -> AttentionFactorization:
    """Per-head product SVDs of a ViT-style attention (``q_proj, k_proj, v_proj, o_proj``).

    ``statistics`` are those of the attention input (``q_proj``'s input); ``None`` gives plain
    (unweighted) SVDs of the products. ``mixing``: the heads' mixed-token Grams, the exact metric of the
    value·output products (without it they are whitened with the Gram of the input).
    """
    from ...attention import attention_heads, attention_projection_names

    heads, head_dim = attention_heads(attention), attention.head_dim
    q, k, v, o = (attention.get_submodule(name) for name in attention_projection_names(attention))
    w_q, w_k, w_v, w_o = (m.weight.detach().to(torch.float64) for m in (q, k, v, o))
    hidden = w_q.shape[1]
    qk_bias = q.bias is not None
    if statistics is None or statistics.tokens == 0:
        root = identity_root(hidden, device=w_q.device)
        augmented_root = identity_root(hidden + 1, device=w_q.device) if qk_bias else root
    else:
        root = gram_root(statistics.mean_gram().to(w_q.device), damping)
        augmented_root = gram_root(statistics.mean_augmented_gram().to(w_q.device), damping) if qk_bias else root
    output_root = identity_root(o.out_features, device=w_q.device)

    qk, vo = [], []
    out_bias = o.bias.detach().to(torch.float64).clone() if o.bias is not None else None
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        a = w_q[rows].T  # [d, d_h]
        if qk_bias:
            a = torch.cat([a, q.bias.detach().to(torch.float64)[rows][None]], dim=0)  # [d + 1, d_h]
        qk.append(product_svd(a, w_k[rows].T, augmented_root, root))
        vo_root = root
        if mixing is not None and mixing.tokens > 0:
            vo_root = gram_root(mixing.mean_gram(h).to(w_q.device), damping)
        vo.append(product_svd(w_v[rows].T, w_o[:, rows], vo_root, output_root))
        if v.bias is not None:
            folded = w_o[:, rows] @ v.bias.detach().to(torch.float64)[rows]
            out_bias = folded if out_bias is None else out_bias + folded
    dense_qk_biases = int(q.bias is not None) + int(k.bias is not None)
    return AttentionFactorization(
        qk, vo, out_bias, qk_bias, head_dim, root.solver, dense_qk_biases, int(v.bias is not None)
    )


def install_head_factorized(
    model: nn.Module,
    name: str,
    source: nn.Module,
    factorization: AttentionFactorization,
    qk_ranks: list[int],
    vo_ranks: list[int],
):
    """Put the head-factorized version of ``source`` (the dense attention) at ``name`` in ``model``; return its plan entry."""
    from ...plan import LayerPlan, set_submodule

    set_submodule(model, name, build_head_factorized(source, factorization, qk_ranks, vo_ranks))
    hidden = source.q_proj.in_features
    return LayerPlan(
        "head_factorized",
        hidden,
        hidden,
        factorization.out_bias is not None,
        head_dim=factorization.head_dim,
        qk_ranks=list(qk_ranks),
        vo_ranks=list(vo_ranks),
        qk_bias=factorization.qk_bias,
    )


def build_head_factorized(
    attention: nn.Module, factorization: AttentionFactorization, qk_ranks: list[int], vo_ranks: list[int]
):
    """A :class:`~hf_vitcompress.attention.HeadFactorizedAttention` holding the given ranks' factors."""
    from ...attention import head_factorized_like

    reference = attention.q_proj.weight
    module = head_factorized_like(
        attention,
        factorization.head_dim,
        qk_ranks,
        vo_ranks,
        qk_bias=factorization.qk_bias,
        out_bias=factorization.out_bias is not None,
    )
    active = [h for h, r in enumerate(vo_ranks) if r > 0]
    lefts, rights, downs, ups = [], [], [], []
    for h in active:
        left, right = factorization.qk[h].factors(qk_ranks[h])
        lefts.append(left)
        rights.append(right)
        down, up = factorization.vo[h].factors(vo_ranks[h])
        downs.append(down)
        ups.append(up)
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
    hidden = reference.shape[1]
    with torch.no_grad():
        module.qk_left.weight.copy_(left[:hidden].T)
        if factorization.qk_bias:
            module.qk_left.bias.copy_(left[hidden])
        module.qk_right.weight.copy_(right.T)
        module.vo_down.weight.copy_(torch.cat(downs, dim=1).T)
        module.vo_up.weight.copy_(torch.cat(ups, dim=1))
        if factorization.out_bias is not None:
            module.vo_up.bias.copy_(factorization.out_bias)
    return module
