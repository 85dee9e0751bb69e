"""Square roots of activation Grams: the metric every activation-aware factorization works in.

With ``C = E[xᵀx] = S Sᵀ``, the mean squared output error of a map ``x ↦ x A`` is ``‖Sᵀ A‖²_F``: an SVD
in the whitened space ``Sᵀ A`` is optimal for the calibration data, and ``S⁻ᵀ`` maps factors back.
Rank-deficient Grams (dead channels, few tokens) get a shifted Cholesky and, failing that, an
eigendecomposition with a pseudo-inverse: this never raises on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass
class GramRoot:
    """``S`` with ``gram ≈ S Sᵀ`` and a way to apply ``S⁻ᵀ`` (a pseudo-inverse on directions the data never spans)."""

    matrix: torch.Tensor
    solver: str  # identity | cholesky | cholesky+shift | eigh
    eigenvectors: torch.Tensor | None = None
    inverse_root: torch.Tensor | None = None

    def solve(self, values: torch.Tensor) -> torch.Tensor:
        """``S⁻¹ · values`` (the same pseudo-inverse as :meth:`solve_transpose`)."""
        if self.solver == "identity":
            return values
        if self.solver == "eigh":  # S⁻¹ = Λ^-½ Qᵀ
            return self.inverse_root[:, None] * (self.eigenvectors.T @ values)
        return torch.linalg.solve_triangular(self.matrix, values, upper=False)

    def solve_transpose(self, values: torch.Tensor) -> torch.Tensor:
        """``S⁻ᵀ · values``."""
        if self.solver == "identity":
            return values
        if self.solver == "eigh":  # S = Q Λ^½  →  S⁻ᵀ = Q Λ^-½
            return self.eigenvectors @ (self.inverse_root[:, None] * values)
        return torch.linalg.solve_triangular(self.matrix.T, values, upper=True)


def identity_root(size: int, dtype: torch.dtype = torch.float64, device=None) -> GramRoot:
    return GramRoot(torch.eye(size, dtype=dtype, device=device), "identity")


def gram_root(gram: torch.Tensor, damping: float) -> GramRoot:
    """The root of ``gram`` (float64), by Cholesky when it is well conditioned, else by eigendecomposition."""
    factor, solver = robust_cholesky(gram, damping)
    if factor is not None:
        return GramRoot(factor, solver)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(0)
    largest = float(eigenvalues.max())
    keep = eigenvalues > 1e-12 * largest if largest > 0 else eigenvalues > 0
    root = eigenvalues.sqrt()
    inverse_root = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return GramRoot(eigenvectors * root, "eigh", eigenvectors, inverse_root)
