"""Activation-aware (whitened) SVD of one linear layer.

With calibration inputs X (rows = tokens) and ``C = XᵀX / n = S Sᵀ``, the SVD ``W S = U Σ Vᵀ`` gives
``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} V_kᵀ S⁻¹``, and the mean per-token output error of the
rank-k pair is exactly the sum of the discarded ``σ²``: ``‖X (W − AB)ᵀ‖²_F / n = Σ_{i>k} σ_i²``.
So one SVD gives the error of every candidate rank, which is what global rank allocation needs.

Two generalizations, both about measuring the error that matters rather than a factorization's own:

* **output weights** ``d`` (one per output channel, e.g. the Fisher diagonal of the model's output error
  with respect to this layer's output, :mod:`hf_vitcompress.calibration.sensitivity`): the SVD of
  ``D^½ W S`` minimizes ``E[(W x − A B x)ᵀ D (W x − A B x)]``, the output error weighted by how much each
  channel's error reaches the model's output (FWSVD's idea, here combined with any input whitening);
* :func:`output_errors` gives the *true* weighted output error ``tr(D ΔW C ΔWᵀ)`` of every rank for any
  factorization (plain, diagonal, shrunk Gram), computed from the Gram; a non-Gram factorization's own
  spectrum is not an output error, so allocating on it compares unlike numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration.gram import LayerStatistics, PairedStatistics
from ...calibration.whitening import gram_root


@dataclass
class WhitenedSVD:
    """All components of one layer's (whitened) SVD, strongest first."""

    left: torch.Tensor  # [out, m] = U Σ^{1/2}
    right: torch.Tensor  # [m, in] = Σ^{1/2} Vᵀ S⁻¹
    spectrum: torch.Tensor  # [m] σ², float64: output energy carried by each component
    solver: str  # how S was obtained: identity | diagonal | cholesky | cholesky+shift | eigh
    # set by output_matched_svd: the bias that makes the pair's mean output the dense layer's, E[Wx] − AB·E[x']
    target_mean: torch.Tensor | None = None  # [out] W·E[x]
    input_mean: torch.Tensor | None = None  # [in] E[x']
    # set for a shared down-projection: the stacked outputs' (projection name, rows), in order
    split: tuple[tuple[str, int], ...] | None = None

    @property
    def total_energy(self) -> float:
        return float(self.spectrum.sum())

    def discarded_energy(self, rank: int) -> float:
        return float(self.spectrum[rank:].sum())

    def factors(self, rank: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, rank], down [rank, in])`` for components ``start .. start + rank``."""
        return self.left[:, start : start + rank], self.right[start : start + rank]

    def bias_shift(self, rank: int) -> torch.Tensor | None:
        """What to add to the dense bias at ``rank`` (``None`` unless fitted by :func:`output_matched_svd`)."""
        if self.target_mean is None:
            return None
        up, down = self.factors(rank)
        return self.target_mean - up.to(torch.float64) @ (down.to(torch.float64) @ self.input_mean)


def whitened_svd(
    weight: torch.Tensor,
    statistics: LayerStatistics | None,
    whitening: str = "gram",
    gram_shrinkage: float = 0.0,
    damping: float = 1e-6,
    output_weights: torch.Tensor | None = None,
) -> WhitenedSVD:
    """Factorize ``weight [out, in]`` so that truncation minimizes the error on the calibration inputs.

    ``whitening``: ``"gram"`` (full XᵀX), ``"diagonal"`` (ASVD-style per-channel scale ``mean|x|^½``)
    or ``"none"`` (plain weight SVD; ``statistics`` may be ``None``). ``gram_shrinkage`` a blends the
    Gram toward its diagonal, ``(1-a)·C + a·diag(C)``, trading exactness on the calibration set for
    robustness to what it does not cover. ``output_weights`` ``[out]`` (positive) weight each output
    channel's error; the spectrum is then in weighted units.
    """
    w = weight.detach().to(torch.float64)
    row_scale = None
    if output_weights is not None:
        row_scale = output_weights.to(device=w.device, dtype=torch.float64).sqrt()[:, None]
        w = w * row_scale
    svd = _whitened_svd(w, statistics, whitening, gram_shrinkage, damping)
    if row_scale is not None:
        svd.left = svd.left / row_scale
    return svd


def _whitened_svd(
    w: torch.Tensor, statistics: LayerStatistics | None, whitening: str, gram_shrinkage: float, damping: float
) -> WhitenedSVD:
    if whitening == "none":
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        root = sigma.sqrt()
        return WhitenedSVD(u * root, root[:, None] * vh, sigma.square(), "identity")
    if statistics is None or statistics.tokens == 0:
        raise ValueError(f"whitening={whitening!r} needs calibration statistics for this layer.")
    if whitening == "diagonal":
        scale = (statistics.abs_sum / statistics.tokens).sqrt()
        scale = scale.clamp_min(1e-6 * float(scale.max()) if float(scale.max()) > 0 else 1e-12)
        u, sigma, vh = torch.linalg.svd(w * scale, full_matrices=False)
        root = sigma.sqrt()
        return WhitenedSVD(u * root, root[:, None] * vh / scale, sigma.square(), "diagonal")
    if whitening != "gram":
        raise ValueError(f"Unknown whitening {whitening!r}.")

    gram = statistics.mean_gram().to(w.device)
    if gram_shrinkage > 0:
        gram = (1.0 - gram_shrinkage) * gram + gram_shrinkage * torch.diag(gram.diagonal())
    root = gram_root(gram, damping)
    u, sigma, vh = torch.linalg.svd(w @ root.matrix, full_matrices=False)
    scale = sigma.sqrt()
    right = root.solve_transpose((scale[:, None] * vh).T).T  # Σ^½ Vᵀ S⁻¹
    return WhitenedSVD(u * scale, right, sigma.square(), root.solver)


def output_errors(
    svd: WhitenedSVD, gram: torch.Tensor, output_weights: torch.Tensor | None = None, max_rank: int | None = None
) -> torch.Tensor:
    """``errors[k] = tr(D ΔW_k C ΔW_kᵀ)`` for ``k = 0 .. max_rank``: the mean (weighted) output error per token
    of keeping the first ``k`` components, on the inputs whose Gram is ``C`` (``D = diag(output_weights)``,
    the identity when ``None``).

    With ``ΔW_k = Σ_{i≥k} l_i r_iᵀ`` the error is ``Σ_{i,j≥k} (l_iᵀ D l_j)(r_iᵀ C r_j)``: one Hadamard
    product of two small Gram matrices and a 2-D suffix sum, exact for any factorization (its components
    need not be orthogonal in this metric, as plain and diagonal-scaled SVDs are not).
    """
    left = svd.left.to(torch.float64)
    right = svd.right.to(device=gram.device, dtype=torch.float64)
    weighted_left = left if output_weights is None else left * output_weights.to(left)[:, None]
    products = (left.T @ weighted_left).to(gram.device) * (right @ gram.to(torch.float64) @ right.T)
    suffix = products.flip(0).cumsum(0).flip(0).flip(1).cumsum(1).flip(1)  # suffix[k, l] = Σ_{i≥k, j≥l}
    errors = torch.cat([suffix.diagonal(), suffix.new_zeros(1)])  # all components kept: W itself
    return errors[: None if max_rank is None else max_rank + 1].clamp_min(0.0)


def output_matched_svd(
    weight: torch.Tensor,
    paired: PairedStatistics,
    whitening: str = "gram",
    gram_shrinkage: float = 0.0,
    damping: float = 1e-6,
    output_weights: torch.Tensor | None = None,
    ridge: float | None = None,
    free_bias: bool = True,
) -> WhitenedSVD:
    """Factor pairs fitted to the *dense* layer's output ``W x`` on the *compressed* model's inputs ``x'``.

    Sequential calibration's objective: ``min E‖W x + b − (A B x' + b')‖² + λ s ‖A B − W‖²_F`` over rank-k
    ``A B`` and a free bias ``b'``. With centered statistics (``C' = Cov(x')``, ``K = Cov(x', x)``) and
    ``C_λ = C' + λ s I = S Sᵀ`` it splits exactly into ``‖(M* − A B) S‖²_F`` plus a term no rank changes,
    where ``M* = W (Kᵀ + λ s I) C_λ⁻¹`` is the (ridge) least-squares map: so the whitened SVD of ``M*``
    under ``C_λ`` is the optimal pair, and the bias is ``b' = b + W E[x] − A B E[x']``
    (:meth:`WhitenedSVD.bias_shift`). The error the compressed layers before this one already made is
    thereby corrected as far as a linear map can, instead of being approximated along (which is what
    factorizing ``W`` on the compressed inputs does).

    The ridge pulls ``M*`` toward ``W`` along the directions the calibration tokens barely span: an
    unregularized least-squares map over ``d`` inputs fitted on not many more than ``d`` tokens follows
    the noise. ``ridge`` λ is in units of ``s``, the mean input variance; ``None`` means ``d / (4·tokens)``
    (proportional to the estimate's variance; the factor was the best of 0.1-1 in a simulation with
    1-10x more tokens than inputs), so with many tokens the fit is the data's and with few it stays
    nearer ``W``. Where nothing upstream is compressed (``x' = x``) ``M* = W`` for every λ.

    Other whitenings factorize the same ``M*`` their own way. A layer without a bias has none to correct
    (``free_bias=False``): the statistics are then not centered and no bias shift is set.
    """
    tokens = paired.tokens
    if tokens == 0:
        raise ValueError("Sequential calibration saw no tokens for this layer.")
    compressed = paired.compressed
    input_mean = compressed.linear_sum / tokens
    dense_mean = paired.dense_sum / tokens
    if not free_bias:  # fit through the origin: uncentered second moments
        input_mean, dense_mean = torch.zeros_like(input_mean), torch.zeros_like(dense_mean)
    covariance = compressed.gram / tokens - torch.outer(input_mean, input_mean)
    cross = paired.cross / tokens - torch.outer(input_mean, dense_mean)
    w = weight.detach().to(device=covariance.device, dtype=torch.float64)
    target = w
    scale = float(covariance.diagonal().mean())
    if scale > 0:
        strength = (w.shape[1] / (4 * tokens) if ridge is None else ridge) * scale
        identity = torch.eye(w.shape[1], dtype=torch.float64, device=covariance.device)
        covariance = covariance + strength * identity
        root = gram_root(covariance, damping)
        target = root.solve_transpose(root.solve((cross + strength * identity) @ w.T)).T  # W (Kᵀ + λsI) C_λ⁻¹
    centered = LayerStatistics(gram=covariance * tokens, abs_sum=compressed.abs_sum, tokens=tokens)
    svd = whitened_svd(target, centered, whitening, gram_shrinkage, damping, output_weights)
    if free_bias:
        svd.target_mean = w @ dense_mean
        svd.input_mean = input_mean
    return svd
