"""Adding, switching, removing and fusing head low-rank adapters on a diffusers model (a UNet, a transformer).

Module-level functions in the style of diffusers' PEFT backend (``add_adapter`` / ``set_adapters`` /
``disable_adapters``): the adapter lives in each targeted ``Attention``'s processor
(:class:`~hf_vitcompress.adapters.processor.HeadLowRankAttnProcessor`), the projections themselves are
untouched, so a LoRA on ``to_q``/``to_k``/``to_v``/``to_out.0`` can be active at the same time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .config import AdapterError, HeadLowRankAdapterConfig
from .processor import HeadLowRankAttnProcessor, HeadLowRankBranch, base_scale, padded_width


def _diffusers_attention():
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    except ImportError as error:
        raise ImportError(
            "Head low-rank adapters run on diffusers models: pip install 'hf_vitcompress[diffusion]' "
            f"(diffusers and peft). ({error})"
        ) from error
    return Attention, (AttnProcessor, AttnProcessor2_0)


def _matches(name: str, target: str) -> bool:
    target = target.strip(".")
    return name == target or name.endswith("." + target)


def _unsupported_reason(attn, base_processors: tuple[type, ...]) -> str | None:
    processor = attn.processor
    if isinstance(processor, HeadLowRankAttnProcessor):
        processor = processor.base_processor
    if not isinstance(processor, base_processors):
        return f"its processor is {type(processor).__name__} (supported: AttnProcessor2_0, AttnProcessor)"
    if getattr(attn, "fused_projections", False):
        return "its q/k/v projections are fused (call unfuse_qkv_projections() first)"
    if getattr(attn, "add_k_proj", None) is not None:
        return "it has added key/value projections (not supported)"
    if attn.to_k.out_features != attn.to_q.out_features or attn.to_q.out_features % attn.heads:
        return "its key/value heads differ from its query heads (not supported)"
    return None


def attention_modules(model: nn.Module, targets: Iterable[str], *, exact: bool = False) -> dict[str, nn.Module]:
    """The diffusers ``Attention`` modules of ``model`` whose names match ``targets`` (full names, or
    trailing parts unless ``exact``). Raises :class:`AdapterError` when none match or a match cannot
    carry the branch."""
    attention_class, base_processors = _diffusers_attention()
    targets = tuple(targets)
    every = {name: module for name, module in unwrap(model).named_modules() if isinstance(module, attention_class)}
    if exact:
        chosen = {name: every[name] for name in targets if name in every}
    else:
        chosen = {name: module for name, module in every.items() if any(_matches(name, t) for t in targets)}
    if not chosen:
        examples = ", ".join(list(every)[:3]) or "none: this model has no diffusers Attention module"
        raise AdapterError(
            f"No attention module matches targets {list(targets)}. Attention modules of this model: {examples}. "
            "Use their names or trailing parts ('attn1' for self-attention, 'attn2' for cross-attention)."
        )
    unsupported = {name: _unsupported_reason(m, base_processors) for name, m in chosen.items()}
    unsupported = {name: reason for name, reason in unsupported.items() if reason}
    if unsupported:
        name, reason = next(iter(unsupported.items()))
        raise AdapterError(
            f"{len(unsupported)} targeted attention module(s) cannot take a head low-rank adapter, e.g. {name}: "
            f"{reason}. Narrow `targets` or restore the default processor (set_default_attn_processor())."
        )
    return chosen


def refuse_distributed_wrapper(model: nn.Module) -> None:
    """Adding parameters under DDP would leave them out of its gradient synchronization, silently."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise AdapterError(
            "Add or load the adapter before wrapping the model in DistributedDataParallel (or accelerator.prepare): "
            "DDP only synchronizes the gradients of parameters that existed when it was built."
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under ``torch.compile`` / DDP wrappers, so module names never carry their prefixes."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


def _processors(model: nn.Module) -> dict[str, HeadLowRankAttnProcessor]:
    return {
        name: module.processor
        for name, module in unwrap(model).named_modules()
        if isinstance(getattr(module, "processor", None), HeadLowRankAttnProcessor)
    }


def head_lowrank_adapter_names(model: nn.Module) -> list[str]:
    """The adapters on ``model``, in the order they were added.

    The processors are the only record: a diffusers call that replaces them (``set_attn_processor``,
    ``enable_attention_slicing``, ``fuse_qkv_projections``, xFormers, IP-Adapter loading) removes
    the adapters with them, and they are then gone from here too."""
    branches: dict[str, HeadLowRankBranch] = {}
    for processor in _processors(model).values():
        for name, branch in processor.branches.items():
            branches.setdefault(name, branch)
    return sorted(branches, key=lambda name: branches[name].serial)


def adapter_config(model: nn.Module, adapter_name: str) -> HeadLowRankAdapterConfig:
    """The config ``adapter_name`` was added with."""
    for processor in _processors(model).values():
        if adapter_name in processor.branches:
            return dataclasses.replace(processor.branches[adapter_name].config)
    raise AdapterError(
        f"No head low-rank adapter named {adapter_name!r} on this model; it has {head_lowrank_adapter_names(model)}. "
        "(Diffusers calls that replace attention processors, such as set_attn_processor or enable_attention_slicing, "
        "remove adapters with them.)"
    )


def check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise AdapterError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}.")


def add_head_lowrank_adapter(
    model: nn.Module,
    config: HeadLowRankAdapterConfig,
    adapter_name: str = "default",
    *,
    trainable: bool = True,
    modules: Sequence[str] | None = None,
) -> list[str]:
    """Add a zero-initialized branch named ``adapter_name`` to every targeted attention of ``model``;
    the model's outputs are unchanged until it is trained. Returns the adapted module names.

    As PEFT's ``add_adapter`` does, ``trainable=True`` freezes every other parameter of ``model`` and
    leaves this adapter's trainable. The new adapter is made active beside any already active ones.
    ``modules`` pins the exact attention names (used when loading a saved adapter).
    """
    refuse_distributed_wrapper(model)
    model = unwrap(model)
    check_adapter_name(adapter_name)
    if not isinstance(config, HeadLowRankAdapterConfig):
        raise AdapterError(f"config must be a HeadLowRankAdapterConfig, got {type(config).__name__}.")
    config = dataclasses.replace(config)  # the adapter's own copy: later edits of the caller's do not reach it
    if adapter_name in head_lowrank_adapter_names(model):
        raise AdapterError(
            f"An adapter named {adapter_name!r} is already on this model; remove_head_lowrank_adapter() it first "
            "or choose another adapter_name."
        )
    chosen = attention_modules(model, config.targets if modules is None else modules, exact=modules is not None)
    if modules is not None and set(chosen) != set(modules):
        missing = sorted(set(modules) - set(chosen))
        raise AdapterError(f"Attention modules {missing[:3]} ({len(missing)} in all) are not in this model.")
    existing = _processors(model).values()
    enabled = all(processor.enabled for processor in existing)  # a disabled model stays disabled
    branches = []
    for attn in chosen.values():
        processor = attn.processor
        if not isinstance(processor, HeadLowRankAttnProcessor):
            processor = HeadLowRankAttnProcessor(processor)
            processor.enabled = enabled
        weight = attn.to_q.weight
        branch = HeadLowRankBranch(
            query_dim=attn.to_q.in_features,
            context_dim=attn.to_k.in_features,
            out_dim=attn.to_out[0].out_features,
            heads=attn.heads,
            config=config,
            device=weight.device,
            dtype=weight.dtype,
        )
        processor.branches[adapter_name] = branch
        processor.scales[adapter_name] = 1.0
        processor.active.append(adapter_name)
        if attn.processor is not processor:
            attn.set_processor(processor)
        branches.append(branch)
    if trainable:
        model.requires_grad_(False)
    for branch in branches:
        branch.requires_grad_(trainable)
    return list(chosen)


def set_head_lowrank_adapters(
    model: nn.Module, adapter_names: str | Sequence[str], weights: float | Sequence[float] | None = None
) -> None:
    """Make exactly ``adapter_names`` active, with ``weights`` (default 1.0) as their scales.

    A scale multiplies ``α²`` in both the logits and the output term: 0 turns an adapter off, 1 is as
    trained. Pass ``[]`` to deactivate every adapter (or use :func:`disable_head_lowrank_adapters`).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"Give one finite weight per adapter: {len(names)} names, weights {weights}.")
    if len(set(names)) != len(names):
        raise AdapterError(f"Each adapter may be named once, got {names}; its weight is its scale.")
    unknown = sorted(set(names) - set(head_lowrank_adapter_names(model)))
    if unknown:
        raise AdapterError(
            f"No head low-rank adapter named {unknown}; this model has {head_lowrank_adapter_names(model)}."
        )
    for processor in _processors(model).values():
        processor.active = [name for name in names if name in processor.branches]
        processor.scales.update({n: w for n, w in zip(names, weights) if n in processor.branches})


def disable_head_lowrank_adapters(model: nn.Module) -> None:
    """Run the original attention (exactly) until :func:`enable_head_lowrank_adapters`; nothing is removed."""
    for processor in _processors(model).values():
        processor.enabled = False


def enable_head_lowrank_adapters(model: nn.Module) -> None:
    for processor in _processors(model).values():
        processor.enabled = True


def remove_head_lowrank_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name``; attentions left with no adapter get their original processor back."""
    model = unwrap(model)
    adapter_config(model, adapter_name)  # raises for an unknown name
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, HeadLowRankAttnProcessor) or adapter_name not in processor.branches:
            continue
        del processor.branches[adapter_name]
        processor.scales.pop(adapter_name)
        processor.active = [n for n in processor.active if n != adapter_name]
        if not len(processor.branches):
            module.set_processor(processor.base_processor)


def fuse_head_lowrank_adapters(model: nn.Module) -> list[str]:
    """Fold the active adapters into their attentions for inference: each head becomes ``d_h + Σ r`` wide
    (zero-padded to a multiple of 8, see :data:`~hf_vitcompress.adapters.processor.ATTENTION_WIDTH_MULTIPLE`,
    so the fused model holds the adapters' weights plus those zeros).

    ``[Q_h | s·α²·Q′_h]·[K_h | K′_h]ᵀ`` and ``A_h·[V_h | V′_h]`` followed by ``[W_O,h | s·α²·O′_h]`` are
    exactly the adapted attention, so wider ``to_q``/``to_k``/``to_v``/``to_out.0`` give the same
    outputs (to rounding) with the model's own processor and no extra module. The softmax scale is kept
    by folding ``scale_before / scale_after`` into the query rows. The adapters are removed afterwards
    (like PEFT's ``merge_and_unload``); returns the fused attention names.

    Refused (before anything changes) where it would not be exact or would lose something: attentions
    with ``norm_q``/``norm_k`` (a wider head would be normalized differently), projections that other
    tools wrapped (PEFT LoRA: ``fuse_lora()``/``unload_lora_weights()`` first), and adapters present
    but inactive (remove them first). The fused model's attention widths no longer match its config:
    save the adapter (:func:`save_head_lowrank_adapter`), not the fused model.
    """
    plan = []
    for name, attn in unwrap(model).named_modules():
        processor = getattr(attn, "processor", None)
        if not isinstance(processor, HeadLowRankAttnProcessor):
            continue
        if not processor.enabled:
            raise AdapterError("Adapters are disabled (disable_head_lowrank_adapters); enable them to fuse them.")
        running = processor.running()
        idle = sorted(set(processor.branches) - {n for n, _, _ in running})
        if idle:
            raise AdapterError(
                f"Adapters {idle} are on {name} but not active (or scaled to 0); fusing would drop them. Remove "
                "them (remove_head_lowrank_adapter) or activate them (set_head_lowrank_adapters) first."
            )
        if attn.norm_q is not None or attn.norm_k is not None:
            raise AdapterError(
                f"Cannot fuse into {name}: it normalizes queries/keys per head (norm_q/norm_k), so a wider head "
                "would change the result. Keep the adapter unfused."
            )
        wrapped = [p for p in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]) if type(p) is not nn.Linear]
        if wrapped:
            kind = f"{type(wrapped[0]).__module__}.{type(wrapped[0]).__qualname__}"
            raise AdapterError(
                f"Cannot fuse into {name}: its projections are wrapped by another tool ({kind}). For a PEFT LoRA, "
                "unload it first: pipe.unload_lora_weights(), after pipe.fuse_lora() to keep its effect merged."
            )
        if running:
            plan.append((name, attn, processor, running))
    if not plan:
        raise AdapterError(
            "No adapter to fuse: none is active (see set_head_lowrank_adapters / enable_head_lowrank_adapters)."
        )
    for _, attn, processor, running in plan:
        _fuse_into(attn, processor, [(branch, factor) for _, branch, factor in running])
        attn.set_processor(processor.base_processor)
    return [name for name, *_ in plan]


@torch.no_grad()
def _fuse_into(attn, processor: HeadLowRankAttnProcessor, running: list[tuple[HeadLowRankBranch, float]]) -> None:
    heads = attn.heads
    head_dim = attn.to_q.out_features // heads
    extra = sum(branch.rank_per_head for branch, _ in running)
    width = padded_width(head_dim + extra)  # zero rows/columns up to a width the fused SDPA kernels take
    padding = width - head_dim - extra
    query_factor = base_scale(attn, processor.base_processor, head_dim) * math.sqrt(width)

    def per_head(weight: torch.Tensor, rank: int) -> torch.Tensor:  # [heads·rank, in] → [heads, rank, in]
        return weight.reshape(heads, rank, *weight.shape[1:])

    def widened(linear: nn.Linear, parts: list[torch.Tensor], first_factor: float) -> nn.Linear:
        parts = [*parts, linear.weight.new_zeros(heads * padding, linear.in_features)]
        rows = [per_head(linear.weight, head_dim) * first_factor]
        rows += [per_head(part.to(linear.weight.dtype), part.shape[0] // heads) for part in parts]
        new = nn.Linear(
            linear.in_features,
            heads * width,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        new.weight.copy_(torch.cat(rows, dim=1).reshape(heads * width, linear.in_features))
        if linear.bias is not None:
            bias = torch.zeros(heads, width, device=linear.bias.device, dtype=linear.bias.dtype)
            bias[:, :head_dim] = linear.bias.reshape(heads, head_dim) * first_factor
            new.bias.copy_(bias.reshape(-1))
        return new

    to_q = widened(attn.to_q, [b.query_lowrank.weight * (f * query_factor) for b, f in running], query_factor)
    to_k = widened(attn.to_k, [b.key_lowrank.weight for b, _ in running], 1.0)
    to_v = widened(attn.to_v, [b.value_lowrank.weight for b, _ in running], 1.0)
    out = attn.to_out[0]
    columns = [out.weight.T, *(b.output_lowrank.weight.T.to(out.weight.dtype) * f for b, f in running)]
    columns.append(out.weight.new_zeros(heads * padding, out.out_features))  # each [heads·r, out]
    stacked = torch.cat([per_head(c, c.shape[0] // heads) for c in columns], dim=1).reshape(heads * width, -1)
    to_out = nn.Linear(
        heads * width, out.out_features, bias=out.bias is not None, device=out.weight.device, dtype=out.weight.dtype
    )
    to_out.weight.copy_(stacked.T)
    if out.bias is not None:
        to_out.bias.copy_(out.bias)
    for linear, old in ((to_q, attn.to_q), (to_k, attn.to_k), (to_v, attn.to_v), (to_out, out)):
        linear.requires_grad_(old.weight.requires_grad)
    attn.to_q, attn.to_k, attn.to_v = to_q, to_k, to_v
    attn.to_out[0] = to_out
    attn.inner_dim = attn.inner_kv_dim = heads * width
    attn.scale = width**-0.5  # what AttnProcessor2_0 applies to the wider heads; AttnProcessor then agrees
