"""Saving and loading a head low-rank adapter: one small safetensors file and a JSON config.

The JSON records, beside the adapter config, the shape of every attention the adapter was trained on
(heads, head width, query/context/output widths), so loading onto a different base model fails with
the module and the mismatch named instead of producing garbage or a bare shape error. Both files are
written under temporary names and moved into place, so an interrupted save leaves no half-written
file; the JSON carries the SHA-256 of the weights it belongs with, so a save interrupted between the
two moves (new weights, old config) is detected on load. Other files in the folder (a LoRA saved
beside it) are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterError, HeadLowRankAdapterConfig
from .model import (
    adapter_config,
    add_head_lowrank_adapter,
    attention_modules,
    check_adapter_name,
    refuse_distributed_wrapper,
    unwrap,
)
from .processor import HeadLowRankAttnProcessor

WEIGHTS_NAME = "head_lowrank_adapter.safetensors"
CONFIG_NAME = "head_lowrank_adapter_config.json"
FORMAT = "hf_vitcompress.head_lowrank_adapter"
FORMAT_VERSION = 1


def _shape_of(attn: nn.Module) -> dict[str, int]:
    return {
        "heads": attn.heads,
        "head_dim": attn.to_q.out_features // attn.heads,
        "query_dim": attn.to_q.in_features,
        "context_dim": attn.to_k.in_features,
        "out_dim": attn.to_out[0].out_features,
    }


def _branch_shapes(shape: dict[str, int], rank_per_head: int) -> dict[str, tuple[int, int]]:
    width = shape["heads"] * rank_per_head
    return {
        "query_lowrank.weight": (width, shape["query_dim"]),
        "key_lowrank.weight": (width, shape["context_dim"]),
        "value_lowrank.weight": (width, shape["context_dim"]),
        "output_lowrank.weight": (shape["out_dim"], width),
    }


def save_head_lowrank_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_name``'s weights (``head_lowrank_adapter.safetensors``) and config into ``directory``."""
    model = unwrap(model)
    config = adapter_config(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, int]] = {}
    for name, attn in model.named_modules():
        processor = getattr(attn, "processor", None)
        if isinstance(processor, HeadLowRankAttnProcessor) and adapter_name in processor.branches:
            modules[name] = _shape_of(attn)
            for key, tensor in processor.branches[adapter_name].state_dict().items():
                tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "modules": modules,
    }

    def write_weights(path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})
        document["weights_sha256"] = _sha256(path)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for final, write in (
            (WEIGHTS_NAME, write_weights),
            (CONFIG_NAME, lambda path: path.write_text(json.dumps(document, indent=2) + "\n")),
        ):
            handle, temporary = tempfile.mkstemp(prefix=f".{final}-", dir=directory)
            os.close(handle)
            staged.append((Path(temporary), directory / final))
            write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        for temporary, final in staged:
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes private files; these are ordinary outputs
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_document(document: Any, path: Path) -> None:
    """The config's structure, so that a damaged or hand-edited file fails with its name, not a KeyError."""

    def damaged(what: str) -> AdapterError:
        return AdapterError(f"{path}: {what}; the adapter config is damaged (save it again).")

    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a head low-rank adapter config (no format {FORMAT!r}).")
    version = document.get("format_version")
    if not isinstance(version, int):
        raise damaged(f"format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format version {version}; this hf_vitcompress reads up to {FORMAT_VERSION}. Upgrade hf_vitcompress."
        )
    if not isinstance(document.get("adapter_name"), str) or not isinstance(document.get("config"), dict):
        raise damaged("adapter_name (a string) or config (an object) is missing")
    if not isinstance(document.get("weights_sha256"), str):
        raise damaged("weights_sha256 (the weights file's checksum) is missing")
    modules = document.get("modules")
    keys = {"heads", "head_dim", "query_dim", "context_dim", "out_dim"}
    if not isinstance(modules, dict) or not modules:
        raise damaged("modules (attention name → shape) is missing or empty")
    for name, shape in modules.items():
        if (
            not isinstance(shape, dict)
            or set(shape) != keys
            or not all(type(v) is int and v > 0 for v in shape.values())
        ):
            raise damaged(f"the shape of {name} is {shape!r}, not positive integers {sorted(keys)}")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise AdapterError(
            f"{directory} is not a saved head low-rank adapter: {', '.join(missing)} missing "
            "(save_head_lowrank_adapter writes both files)."
        )
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_path} is not valid JSON ({error}); the adapter folder is damaged.") from error
    _check_document(document, config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{weights_path} cannot be read as safetensors ({error}); the file is damaged.") from error
    if document["weights_sha256"] != _sha256(weights_path):
        raise AdapterError(
            f"{weights_path} is not the weights file {config_path.name} was saved with (its SHA-256 differs): an "
            "interrupted save, a damaged file, or files copied from different adapters. Save the adapter again."
        )
    return document, tensors


def load_head_lowrank_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    trainable: bool = False,
) -> str:
    """Add the adapter saved in ``directory`` to ``model`` as ``adapter_name`` (default: its saved name)
    and make it active. Everything is checked before the model changes: the files, every attention's
    shape against the one it was trained on, and every tensor's shape. Returns the adapter name.

    ``trainable=False`` (the default, for inference) leaves every ``requires_grad`` as it was except the
    adapter's own, which is off; ``True`` continues training as :func:`add_head_lowrank_adapter` does.
    """
    refuse_distributed_wrapper(model)
    model = unwrap(model)
    directory = Path(directory)
    document, tensors = _read(directory)
    config = HeadLowRankAdapterConfig.from_dict(document["config"], complete=True)
    adapter_name = document["adapter_name"] if adapter_name is None else adapter_name
    check_adapter_name(adapter_name)
    saved_modules: dict[str, dict[str, int]] = document["modules"]
    try:
        present = attention_modules(model, saved_modules, exact=True)
    except AdapterError as error:
        raise AdapterError(f"The adapter in {directory} does not fit this model: {error}") from error
    absent = sorted(set(saved_modules) - set(present))
    if absent:
        raise AdapterError(
            f"The adapter in {directory} was trained on a model with attention {absent[0]} "
            f"({len(absent)} such modules in all); this model has none of that name. Load it onto the base model it was trained on."
        )
    for name, saved in saved_modules.items():
        here = _shape_of(present[name])
        if here != saved:
            different = {k: (saved[k], here[k]) for k in saved if saved[k] != here.get(k)}
            details = ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in different.items())
            raise AdapterError(
                f"The adapter in {directory} was trained on a model whose {name} differs from this one's ({details}). "
                "Load it onto the base model it was trained on."
            )
        for key, shape in _branch_shapes(saved, config.rank_per_head).items():
            tensor = tensors.get(f"{name}.{key}")
            if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
                found = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
                raise AdapterError(
                    f"{directory / WEIGHTS_NAME}: {name}.{key} should be {shape} floating point, is {found}; the file "
                    "is damaged."
                )
            if not torch.isfinite(tensor).all():
                raise AdapterError(
                    f"{directory / WEIGHTS_NAME}: {name}.{key} holds NaN or infinite values; the adapter diverged in "
                    "training or the file is damaged."
                )
    extra = sorted(set(tensors) - {f"{m}.{k}" for m in saved_modules for k in _branch_shapes(saved_modules[m], 1)})
    if extra:
        raise AdapterError(
            f"{directory / WEIGHTS_NAME} holds tensors no adapter module uses, e.g. {extra[0]}; the file is damaged."
        )

    add_head_lowrank_adapter(model, config, adapter_name, trainable=trainable, modules=list(saved_modules))
    with torch.no_grad():
        for name in saved_modules:
            branch = present[name].processor.branches[adapter_name]
            for key, parameter in branch.named_parameters():
                parameter.copy_(tensors[f"{name}.{key}"])
    return adapter_name
