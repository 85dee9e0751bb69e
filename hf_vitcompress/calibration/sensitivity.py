"""How much an error at each linear's output reaches the model's output: the Fisher diagonal per channel.

A small perturbation ``δy`` of one linear's output changes the model's output error by about
``δyᵀ Jᵀ G J δy`` (``J``: the Jacobian from that output to the model's output; ``G``: the metric, the
Fisher of the softmax for a classifier's KL, the identity for a backbone's squared feature error). Its
diagonal per output channel ``s_c = E[(Jᵀ G J)_cc]`` is estimated without labels, with one backward pass
per batch of a random projection whose covariance is ``G``:

* classifier: ``∂ log p(ŷ) / ∂y`` with ``ŷ`` sampled from the dense model's own prediction (the
  empirical-Fisher trick with model labels, whose expectation is exactly ``Jᵀ G J``);
* backbone: ``∂ (zᵀ h) / ∂y`` with ``z ~ N(0, I)`` on ``last_hidden_state`` (Hutchinson).

``s`` summed over tokens and averaged over images makes ``Σ_c s_c E[δy_c²]`` an estimate of the output
error per image, comparable across layers: the weights that make rank allocation loss-aware
(:func:`hf_vitcompress.methods.activation_aware.factorization.whitened_svd`, ``output_weights``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import CalibrationProcesses
from .validation import Batch, batch_size, forward_batch, output_of, token_mask


@dataclass
class OutputSensitivity:
    """Σ over images and tokens of the squared projected gradient, per output channel of each linear."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    images: int = 0

    def weights(self, name: str, floor: float = 1e-4) -> torch.Tensor:
        """Per-image sensitivities of ``name``'s output channels, floored at ``floor`` × their mean so every
        channel keeps a positive weight (a channel the samples never reached still costs something)."""
        mean = self.sums[name] / max(self.images, 1)
        return mean.clamp_min(floor * float(mean.mean()) if float(mean.mean()) > 0 else 1e-30)

    def sum_over_processes(self, processes: CalibrationProcesses, model: nn.Module, names: Sequence[str]) -> None:
        """Add every process's sums up (a process that weighed no image contributes zeros)."""
        if not processes.is_distributed:
            return
        for name in names:
            if name not in self.sums:
                weight = model.get_submodule(name).weight
                self.sums[name] = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        names = sorted(names)
        processes.sum_([self.sums[name] for name in names])
        self.images = int(processes.sum_numbers([self.images])[0])


def accumulate_sensitivity(
    model: nn.Module,
    names: Sequence[str],
    batch: Batch,
    into: OutputSensitivity,
    generator: torch.Generator,
) -> None:
    """One forward and backward pass of ``model`` on ``batch``, adding every named linear's squared projected
    output gradient to ``into``. The weights get no gradient (only the outputs' are asked for)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _a, out, _n=name: outputs.__setitem__(_n, out))
        for name in names
    ]
    try:
        with torch.enable_grad():
            kind, output = output_of(forward_batch(model, batch))
            if kind == "logits":
                probabilities = F.softmax(output.detach().double(), dim=-1).reshape(-1, output.shape[-1])
                sampled = torch.multinomial(probabilities.cpu(), 1, generator=generator).to(output.device)
                loss = -F.log_softmax(output.float(), dim=-1).reshape(-1, output.shape[-1]).gather(1, sampled).sum()
            else:
                direction = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.device)
                mask = token_mask(batch, output)
                if mask is not None:
                    direction = direction * mask.float()
                loss = (output.float() * direction).sum()
            missing = [name for name in names if name not in outputs]
            if missing:
                raise RuntimeError(f"{missing[0]!r} was not called by the model's forward: cannot weigh its output.")
            gradients = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for name, gradient in zip(names, gradients, strict=True):
        width = outputs[name].shape[-1]
        squared = (
            torch.zeros(width, dtype=torch.float64, device=outputs[name].device)
            if gradient is None
            else gradient.detach().to(torch.float64).reshape(-1, width).square().sum(0)
        )
        into.sums[name] = squared if name not in into.sums else into.sums[name] + squared
    into.images += batch_size(batch)
