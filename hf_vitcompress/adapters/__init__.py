"""Customization adapters for diffusion models: COMCAT's per-head low-rank attention branch.

COMCAT's observation (attention heads only need low-rank *products* ``W_Q W_Kᵀ`` and ``W_V W_O``) also
gives a small customization adapter: a parallel branch of ``rank_per_head`` extra query/key/value
dimensions per head, sharing each head's softmax with the frozen weights. It lives in the attention
processors of a diffusers model, beside (not instead of) LoRA adapters loaded through diffusers' PEFT
backend::

    from hf_vitcompress.adapters import HeadLowRankAdapterConfig, add_head_lowrank_adapter
    add_head_lowrank_adapter(pipe.unet, HeadLowRankAdapterConfig(rank_per_head=2, targets=("attn1", "attn2")))

Needs ``diffusers`` (``pip install 'hf_vitcompress[diffusion]'``); importing this module does not.
"""

from .config import AdapterError, HeadLowRankAdapterConfig
from .model import (
    add_head_lowrank_adapter,
    disable_head_lowrank_adapters,
    enable_head_lowrank_adapters,
    fuse_head_lowrank_adapters,
    head_lowrank_adapter_names,
    remove_head_lowrank_adapter,
    set_head_lowrank_adapters,
)
from .processor import HeadLowRankAttnProcessor, HeadLowRankBranch
from .serialization import CONFIG_NAME, WEIGHTS_NAME, load_head_lowrank_adapter, save_head_lowrank_adapter

__all__ = [
    "AdapterError",
    "CONFIG_NAME",
    "HeadLowRankAdapterConfig",
    "HeadLowRankAttnProcessor",
    "HeadLowRankBranch",
    "WEIGHTS_NAME",
    "add_head_lowrank_adapter",
    "disable_head_lowrank_adapters",
    "enable_head_lowrank_adapters",
    "fuse_head_lowrank_adapters",
    "head_lowrank_adapter_names",
    "load_head_lowrank_adapter",
    "remove_head_lowrank_adapter",
    "save_head_lowrank_adapter",
    "set_head_lowrank_adapters",
]
