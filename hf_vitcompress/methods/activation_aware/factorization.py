"""Activation-aware (whitened) SVD of one linear layer.

With calibration inputs X (rows = tokens) and ``C = XᵀX / n = S Sᵀ``, the SVD ``W S = U Σ Vᵀ`` gives
``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} V_kᵀ S⁻¹``, and the mean per-token output error of the
rank-k pair is exactly the sum of the discarded ``σ²``: ``‖X (W − AB)ᵀ‖²_F / n = Σ_{i>k} σ_i²``.
So one SVD gives the error of every candidate rank, which is what global rank allocation needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration.gram import LayerStatistics
from ...calibration.whitening import gram_root


@dataclass
class WhitenedSVD:
    """All components of one layer's (whitened) SVD, strongest first."""

    left: torch.Tensor  # [out, m] = U Σ^{1/2}
    right: torch.Tensor  # [m, in] = Σ^{1/2} Vᵀ S⁻¹
    spectrum: torch.Tensor  # [m] σ², float64: output energy carried by each component
    solver: str  # how S was obtained: identity | diagonal | cholesky | cholesky+shift | eigh

    @property
    def total_energy(self) -> float:
        return float(self.spectrum.sum())

    def discarded_energy(self, rank: int) -> float:
        return float(self.spectrum[rank:].sum())

    def factors(self, rank: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, rank], down [rank, in])`` for components ``start .. start + rank``."""
        return self.left[:, start : start + rank], self.right[start : start + rank]


def whitened_svd(
    weight: torch.Tensor,
    statistics: LayerStatistics | None,
    whitening: str = "gram",
    gram_shrinkage: float = 0.0,
    damping: float = 1e-6,
) -> WhitenedSVD:
    """Factorize ``weight [out, in]`` so that truncation minimizes the error on the calibration inputs.

    ``whitening``: ``"gram"`` (full XᵀX), ``"diagonal"`` (ASVD-style per-channel scale ``mean|x|^½``)
    or ``"none"`` (plain weight SVD; ``statistics`` may be ``None``). ``gram_shrinkage`` a blends the
    Gram toward its diagonal, ``(1-a)·C + a·diag(C)``, trading exactness on the calibration set for
    robustness to what it does not cover.
    """
    w = weight.detach().to(torch.float64)
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
