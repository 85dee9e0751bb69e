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


def robust_cholesky(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor | None, str]:
    """Lower Cholesky factor of ``gram + shift·I``, raising the shift until it is well conditioned.

    Returns ``(None, "eigh")`` when even a large shift fails, so the caller falls back to an
    eigendecomposition. Never raises on rank-deficient input.
    """
    scale = float(gram.diagonal().mean())
    if not scale > 0:
        return None, "eigh"
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    shift = damping * scale
    for attempt in range(5):
        factor, info = torch.linalg.cholesky_ex(gram + shift * identity)
        if int(info) == 0:
            pivots = factor.diagonal()
            if float(pivots.min()) ** 2 > 1e-12 * float(pivots.max()) ** 2:
                return factor, "cholesky" if attempt == 0 else "cholesky+shift"
        shift = max(shift * 100.0, 1e-10 * scale)
    return None, "eigh"


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
    factor, solver = robust_cholesky(gram, damping)
    if factor is not None:
        u, sigma, vh = torch.linalg.svd(w @ factor, full_matrices=False)
        root = sigma.sqrt()
        right = torch.linalg.solve_triangular(factor, root[:, None] * vh, upper=False, left=False)
        return WhitenedSVD(u * root, right, sigma.square(), solver)

    # Eigendecomposition fallback: S = Q Λ^½, S⁺ = Λ^-½ Qᵀ on the directions the data spans.
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(0)
    keep = eigenvalues > 1e-12 * float(eigenvalues.max()) if float(eigenvalues.max()) > 0 else eigenvalues > 0
    root_eig = eigenvalues.sqrt()
    inverse_root = torch.where(keep, 1.0 / root_eig.clamp_min(1e-300), torch.zeros_like(root_eig))
    u, sigma, vh = torch.linalg.svd(w @ (eigenvectors * root_eig), full_matrices=False)
    root = sigma.sqrt()
    right = (root[:, None] * vh * inverse_root) @ eigenvectors.T
    return WhitenedSVD(u * root, right, sigma.square(), "eigh")
