"""`HeadLowRankAdapterConfig`: which attentions get a per-head low-rank branch, and how big it is."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class AdapterError(ValueError):
    """An adapter cannot be added, loaded, switched or fused as asked (the message says why and what to do)."""


@dataclass
class HeadLowRankAdapterConfig:
    """COMCAT's customization branch: per attention head, ``rank_per_head`` extra query/key and
    value/output dimensions that share the head's softmax with the frozen original ones.

    Per head ``h`` of a targeted attention: ``logits_h = (α²·Q′_h K′_hᵀ + Q_h K_hᵀ)·d_h^{-1/2}`` and
    ``out = to_out(A·V) + α²·Σ_h (A_h V′_h) O′_h``. The branch adds ``rank_per_head × heads`` columns to
    the query/key/value widths, so it costs ``(d_q + 2·d_kv + d_out) × heads × rank_per_head``
    parameters per attention, where ``d_q``/``d_kv`` are the query/context input widths and ``d_out``
    the output width.
    """

    rank_per_head: int = field(default=2, metadata={"help": "Extra dimensions per head (COMCAT uses 2)."})
    targets: tuple[str, ...] = field(
        default=("attn1", "attn2"),
        metadata={
            "help": "Attention modules to adapt, by full name or by the last part(s) of it: 'attn1' (self-attention "
            "of the UNet's transformer blocks), 'attn2' (cross-attention), or e.g. 'mid_block.attentions.0.transformer_blocks.0.attn2'."
        },
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Branch multiplier: the branch enters the logits and the output times alpha²."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.rank_per_head, bool) or not isinstance(self.rank_per_head, int) or self.rank_per_head < 1:
            raise AdapterError(f"rank_per_head must be an integer >= 1, got {self.rank_per_head!r}.")
        if isinstance(self.targets, (list, tuple)):
            self.targets = tuple(self.targets)
        if (
            not isinstance(self.targets, tuple)
            or not self.targets
            or not all(isinstance(t, str) and t.strip(". ") for t in self.targets)
        ):
            raise AdapterError(
                f"targets must be a non-empty list of module names (e.g. ('attn1', 'attn2')), got {self.targets!r}."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise AdapterError(f"alpha must be a finite number, got {self.alpha!r}.")
        if self.alpha == 0:
            raise AdapterError("alpha must not be 0: the branch would never contribute and never learn.")
        self.alpha = float(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, complete: bool = False) -> HeadLowRankAdapterConfig:
        """Rebuild from :meth:`to_dict`. ``complete=True`` (loading a saved adapter) requires every field:
        a default filled in for a missing ``alpha`` would silently change what the weights compute."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(
                f"Unknown HeadLowRankAdapterConfig fields {unknown} (known: {sorted(known)}); the adapter was probably "
                "saved by a newer hf_vitcompress: upgrade it."
            )
        missing = sorted(known - set(data))
        if complete and missing:
            raise AdapterError(f"The adapter config lacks {missing}; it is damaged (save the adapter again).")
        try:
            return cls(**data)
        except TypeError as error:
            raise AdapterError(f"The adapter config {data!r} is not valid ({error}).") from error
