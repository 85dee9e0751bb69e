"""Run a model block by block over the calibration set (for sequential calibration and compensation).

The hidden states entering one block are kept for the whole calibration set (``n × tokens × width``
floats, on the model's device); everything else streams. This is the price of letting each layer see
the inputs produced by the already-compressed layers before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block and the block's other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def clone(self) -> BlockInputs:
        return BlockInputs([h.clone() for h in self.hidden], list(self.args), list(self.kwargs))

    @torch.no_grad()
    def through(self, block: nn.Module) -> BlockInputs:
        """The inputs of the next block: this block applied to every batch."""
        outputs = [block(h, *a, **k) for h, a, k in zip(self.hidden, self.args, self.kwargs)]
        outputs = [o[0] if isinstance(o, tuple) else o for o in outputs]
        return BlockInputs(outputs, self.args, self.kwargs)

    def __len__(self) -> int:
        return len(self.hidden)


@contextmanager
def capture_block_inputs(block: nn.Module, into: BlockInputs) -> Iterator[BlockInputs]:
    """While active, every call of ``block`` appends its inputs to ``into``."""

    def hook(_module, args, kwargs):
        into.hidden.append(args[0].detach())
        into.args.append(tuple(args[1:]))
        into.kwargs.append(dict(kwargs))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield into
    finally:
        handle.remove()


@contextmanager
def capture_module_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, the inputs of ``module``'s forward calls are appended to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()
