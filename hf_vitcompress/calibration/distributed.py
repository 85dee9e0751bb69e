"""Calibration across several processes (``accelerate launch``): shard the images, add up the sums.

Every statistic calibration keeps is a *sum* over calibration tokens (Gram ``Σxᵀx``, ``Σ|x|``, ``Σx``,
token counts, Taylor terms), so sharding the images across processes and adding the per-process sums
gives the single-process result up to float64 summation order.

Why an all-reduce rather than "reduce to the process that owns the layer, factorize there, broadcast
the factors": each process already holds its partial sums of *every* target layer while it streams its
shard (the hooks cannot know which layer another process will own), so the in-place all-reduce costs
no memory beyond what the calibration pass itself needs, and afterwards every process holds the same
model, which is what code after ``compress()`` under ``accelerate launch`` expects (any process may
evaluate; the main one saves). The price is that every process runs the (deterministic) SVDs itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch


class CalibrationProcessError(RuntimeError):
    """The processes of a multi-process calibration disagree (different models, dtypes or layers)."""


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class CalibrationProcesses:
    """This process's place among the calibration processes (``count == 1``: a plain single-process run)."""

    index: int = 0
    count: int = 1
    context: str = ""  # what every process must agree on (the CompressionConfig, as JSON); part of every check

    @classmethod
    def current(cls) -> CalibrationProcesses:
        """The running process group, set up by ``accelerate launch`` / ``torchrun`` (or a single process).

        Uses an already initialized ``torch.distributed`` group; otherwise, when the launcher's
        ``WORLD_SIZE`` says there are several processes, Accelerate's ``PartialState`` sets the group up.
        """
        dist = _distributed()
        if dist is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            PartialState()
            dist = _distributed()
        if dist is None:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    def with_context(self, **context: Any) -> CalibrationProcesses:
        """The same processes, with ``context`` compared across processes by every :meth:`check_same`."""
        return replace(self, context=json.dumps(context, sort_keys=True, default=str))

    @property
    def is_distributed(self) -> bool:
        return self.count > 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, batches: Iterable) -> Iterator:
        """Batch ``i`` of the (globally limited) calibration stream goes to process ``i % count``."""
        for position, batch in enumerate(batches):
            if position % self.count == self.index:
                yield batch

    def check_same(self, what: str, signature: Any) -> None:
        """Raise the same :class:`CalibrationProcessError` on every process if ``signature`` differs anywhere.

        Collective calls with mismatched shapes or dtypes hang or fail obscurely; comparing a small
        description first turns that into one clear error, raised by all processes at once.
        """
        if not self.is_distributed:
            return
        signature = {"compression config": self.context, what: signature}
        gathered: list[Any] = [None] * self.count
        _distributed().all_gather_object(gathered, signature)
        for index, other in enumerate(gathered):
            if other != gathered[0]:
                raise CalibrationProcessError(
                    f"Calibration processes 0 and {index} disagree about {what}: {_difference(gathered[0], other)}. "
                    "Every process must load the same model in the same dtype and compress it with the same "
                    "CompressionConfig; only the calibration images are split between them."
                )

    @contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a step of local work; if it fails on any process, it fails on every process.

        A process that raises before a collective would leave the others waiting in it until the
        backend's timeout; here every process reports success or its error first, and all raise.
        """
        if not self.is_distributed:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = caught
        statuses: list[Any] = [None] * self.count
        _distributed().all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(index, status) for index, status in enumerate(statuses) if status is not None]
        if failed:
            index, status = failed[0]
            raise CalibrationProcessError(f"Calibration process {index} failed during {what}: {status}")

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Add each tensor up over all processes, in place (same order on every process)."""
        if not self.is_distributed:
            return
        dist = _distributed()
        nccl = dist.get_backend() == "nccl"
        for tensor in tensors:
            if nccl and tensor.device.type != "cuda":  # NCCL reduces CUDA tensors only
                staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(staged)
                tensor.copy_(staged)
            else:
                dist.all_reduce(tensor)

    def sum_numbers(self, values: list[float]) -> list[float]:
        """Sums of a few Python numbers over all processes (float64)."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        self.sum_([tensor])
        return tensor.tolist()


def _difference(first: Any, other: Any) -> str:
    if isinstance(first, dict) and isinstance(other, dict):
        for key in sorted(set(first) | set(other), key=str):
            if first.get(key) != other.get(key):
                return f"{key}: {first.get(key)!r} vs {other.get(key)!r}"
    return f"{first!r:.300} vs {other!r:.300}"


SINGLE_PROCESS = CalibrationProcesses()
"""The default of every function that takes ``processes``: a plain one-process run."""
