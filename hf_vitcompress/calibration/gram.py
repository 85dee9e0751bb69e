"""Streaming second-moment statistics of linear-layer inputs (the calibration every method shares)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import CalibrationProcesses
from .validation import forward_batch


class NonFiniteActivationError(ValueError):
    """A layer input contained NaN/inf during calibration (the model or the data is broken)."""


@dataclass
class LayerStatistics:
    """Sums over every calibration token ``x`` (a row of the layer input) of ``xᵀx``, ``|x|`` and ``x``, in float64.

    Memory is ``d_in²`` per layer whatever the calibration-set size; sums (not means) so that shards
    from several processes add up exactly.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0
    linear_sum: torch.Tensor | None = None  # Σx: the mean input, for biases folded into factor pairs

    @classmethod
    def empty(cls, in_features: int, device: torch.device | None = None) -> LayerStatistics:
        return cls(
            gram=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            abs_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
            linear_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
        )

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        if not torch.isfinite(rows).all():
            raise NonFiniteActivationError("Non-finite values reached a layer input during calibration.")
        self.gram.addmm_(rows.T, rows)
        self.abs_sum.add_(rows.abs().sum(0))
        if self.linear_sum is None:
            self.linear_sum = torch.zeros_like(self.abs_sum)
        self.linear_sum.add_(rows.sum(0))
        self.tokens += rows.shape[0]

    def mean_gram(self) -> torch.Tensor:
        """``E[xᵀx]`` per token."""
        return self.gram / max(self.tokens, 1)

    def mean_augmented_gram(self) -> torch.Tensor:
        """``E[x̃ᵀx̃]`` for ``x̃ = [x, 1]``: the metric of a map whose bias is its last input row."""
        mean = self.linear_sum / max(self.tokens, 1)
        top = torch.cat([self.mean_gram(), mean[:, None]], dim=1)
        return torch.cat([top, torch.cat([mean, mean.new_ones(1)])[None]], dim=0)


@dataclass
class PairedStatistics:
    """One linear's inputs in the compressed model (``x'``) and in the dense model (``x``), token for token:
    ``Σx'x'ᵀ``, ``Σ|x'|``, ``Σx'`` (as :class:`LayerStatistics`), the cross sum ``Σx'xᵀ`` and ``Σx``.

    This is what fitting a layer to the *dense* layer's output on the *compressed* model's inputs
    needs (sequential calibration): the least-squares map from ``x'`` to ``W x``. Sums, so shards add up.
    """

    compressed: LayerStatistics
    cross: torch.Tensor  # Σ x' xᵀ [in, in]
    dense_sum: torch.Tensor  # Σ x [in]

    @classmethod
    def empty(cls, in_features: int, device: torch.device | None = None) -> PairedStatistics:
        return cls(
            compressed=LayerStatistics.empty(in_features, device=device),
            cross=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            dense_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
        )

    def update(self, dense_inputs: torch.Tensor, compressed_inputs: torch.Tensor) -> None:
        width = dense_inputs.shape[-1]
        dense = dense_inputs.detach().reshape(-1, width).to(torch.float64)
        compressed = compressed_inputs.detach().reshape(-1, width).to(torch.float64)
        if dense.shape != compressed.shape:
            raise ValueError(f"Paired inputs differ in shape: {tuple(dense.shape)} vs {tuple(compressed.shape)}.")
        self.compressed.update(compressed)
        self.cross.addmm_(compressed.T, dense)
        self.dense_sum.add_(dense.sum(0))

    @property
    def tokens(self) -> int:
        return self.compressed.tokens

    def sum_over_processes(self, processes: CalibrationProcesses) -> None:
        if not processes.is_distributed:
            return
        layer = self.compressed
        processes.sum_([layer.gram, layer.abs_sum, layer.linear_sum, self.cross, self.dense_sum])
        layer.tokens = int(processes.sum_numbers([layer.tokens])[0])


@contextmanager
def record_linear_inputs(model: nn.Module, names: Iterable[str], statistics: dict[str, LayerStatistics]):
    """While active, every forward of the named linears adds its input to ``statistics[name]``."""
    handles = []
    try:
        for name in names:
            module = model.get_submodule(name)
            if name not in statistics:
                statistics[name] = LayerStatistics.empty(module.in_features, device=next(module.parameters()).device)

            def hook(_module, args, _name=name):
                try:
                    statistics[_name].update(args[0])
                except NonFiniteActivationError as error:
                    raise NonFiniteActivationError(
                        f"Non-finite values reached the input of {_name!r} during calibration: check the model weights "
                        "and the calibration images (they must be normalized as the model expects)."
                    ) from error

            handles.append(module.register_forward_pre_hook(hook))
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def collect_linear_statistics(
    model: nn.Module, names: Iterable[str], batches: Iterable, progress: bool = False
) -> dict[str, LayerStatistics]:
    """One calibration pass of ``model`` (in eval mode) over ``batches``, recording the named linears' inputs.

    A batch is a ``pixel_values`` tensor or a dict of forward keyword arguments (labels are not passed on).
    """
    from tqdm.auto import tqdm

    statistics: dict[str, LayerStatistics] = {}
    model.eval()
    with torch.no_grad(), record_linear_inputs(model, names, statistics):
        for batch in tqdm(batches, desc="calibration", disable=not progress, unit="batch"):
            forward_batch(model, batch)
    return statistics


def sum_over_processes(
    statistics: dict[str, LayerStatistics], processes: CalibrationProcesses, model: nn.Module
) -> dict[str, LayerStatistics]:
    """Add every process's partial statistics up, in place, so all processes hold the full-data sums.

    First checks that all processes calibrated the same layers of a model in the same dtype (a
    mismatch would make the collectives hang or silently mix different models).
    """
    if not processes.is_distributed:
        return statistics
    parameter = next(model.parameters())
    processes.check_same(
        "the calibrated model",
        {
            "model dtype": str(parameter.dtype),
            "layers": {name: tuple(s.gram.shape) for name, s in sorted(statistics.items())},
        },
    )
    names = sorted(statistics)
    for name in names:
        layer = statistics[name]
        if layer.linear_sum is None:
            layer.linear_sum = torch.zeros_like(layer.abs_sum)
        processes.sum_([layer.gram, layer.abs_sum, layer.linear_sum])
    for name, tokens in zip(names, processes.sum_numbers([statistics[n].tokens for n in names]), strict=True):
        statistics[name].tokens = int(tokens)
    return statistics
