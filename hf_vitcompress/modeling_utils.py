"""What all compressed model classes share: rebuild from the plan, strict loading, the loader shim.

Each family file defines a config subclass with its own ``model_type`` and gets its model classes from
:func:`make_compressed_model_class`. Registering them with the Auto classes happens once, on
``import hf_vitcompress``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .evaluation import EvaluationReport
from .plan import CompressionPlan, PlanMismatchError, apply_plan_structure

LOADER_SHIM_NAME = "vitcompress_loader"

_SHIM_TEMPLATE = '''"""Loader shim written by hf_vitcompress.

This checkpoint is a Vision Transformer compressed with hf_vitcompress: some linears are factor
pairs, so a plain transformers model cannot hold its weights. Install the plugin and load normally:

    pip install hf-vitcompress
    import hf_vitcompress
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained("<this folder or repo>")

(or pass trust_remote_code=True, which runs this file, which imports the plugin).
"""

from hf_vitcompress import {names}  # noqa: F401
'''


class CompressedConfigMixin:
    """Mixed into a family's config class: a new compressed config points ``auto_map`` at the loader shim.

    ``_auto_classes`` is filled by :func:`register_family_classes` once the model classes exist.
    """

    _auto_classes: dict[str, type] = {}

    @classmethod
    def default_auto_map(cls) -> dict[str, str]:
        return auto_map_for(cls, cls._auto_classes) if cls._auto_classes else {}

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if not getattr(self, "auto_map", None):
            self.auto_map = self.default_auto_map() or None


class CompressedModelMixin:
    """Mixed into a transformers model class: the architecture follows ``config.compression_plan``."""

    evaluation_report: EvaluationReport | None = None

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if getattr(config, "compression_plan", None):
            apply_plan_structure(self, CompressionPlan.from_dict(config.compression_plan))

    @property
    def compression_plan(self) -> CompressionPlan:
        return CompressionPlan.from_dict(self.config.compression_plan or {"layers": {}})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose weights do not fit the plan.

        transformers only logs a warning for missing or unexpected weights and initializes the missing
        ones randomly; for a compressed model that would be a silently broken model.
        """
        want_info = kwargs.pop("output_loading_info", False)
        user_ignores_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # Let transformers report shape mismatches instead of raising its generic error, so the message
        # below can say which planned layers disagree with the weights.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        problems = []
        if info.get("missing_keys"):
            problems.append(f"missing weights: {_preview(info['missing_keys'])}")
        if info.get("unexpected_keys"):
            problems.append(f"weights the plan has no place for: {_preview(info['unexpected_keys'])}")
        if info.get("mismatched_keys") and not user_ignores_mismatch:
            problems.append(f"weights of the wrong shape: {_preview([key for key, *_ in info['mismatched_keys']])}")
        if problems:
            raise PlanMismatchError(
                f"The checkpoint does not match its compression plan ({'; '.join(problems)}). "
                "It was probably edited or saved from a different model; re-run compression or restore the original files."
            )
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and Path(source).is_dir():
            model.evaluation_report = EvaluationReport.load(source)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as transformers does, plus the loader shim that ``auto_map`` points at and, when one was
        measured on exactly these weights, the evaluation report (which the model card reads)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_loader_shim(save_directory, self.config)
            report = getattr(self, "evaluation_report", None)
            if report is not None and report.matches(self):
                report.save(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload weights, config (with the plan and ``auto_map``), loader shim and a model card.

        The card holds the counted size and only the numbers measured on these weights (see
        :func:`hf_vitcompress.hub.build_model_card`); pass ``model_card=`` to upload your own. Needs a
        token (``hf auth login``, ``HF_TOKEN`` or ``token=``). Returns the ``CommitInfo``.
        """
        from .hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)


def _preview(keys: Any, limit: int = 4) -> str:
    keys = sorted(set(keys))
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def make_compressed_model_class(base_class: type, config_class: type, module: str) -> type:
    """``Compressed<Base>``: ``base_class`` whose listed linears are rebuilt from the plan."""
    name = f"Compressed{base_class.__name__}"
    cls = type(name, (CompressedModelMixin, base_class), {"config_class": config_class, "__module__": module})
    cls.__doc__ = (
        f"A {base_class.__name__} compressed by hf_vitcompress (architecture from ``config.compression_plan``)."
    )
    return cls


def auto_map_for(config_class: type, model_classes: dict[str, type]) -> dict[str, str]:
    """``auto_map`` entries pointing the Auto classes at the loader shim."""
    entries = {"AutoConfig": f"{LOADER_SHIM_NAME}.{config_class.__name__}"}
    entries.update({auto: f"{LOADER_SHIM_NAME}.{cls.__name__}" for auto, cls in model_classes.items()})
    return entries


def write_loader_shim(save_directory: str | os.PathLike, config: Any) -> None:
    names = sorted({entry.split(".", 1)[1] for entry in (getattr(config, "auto_map", None) or {}).values()})
    if names:
        Path(save_directory, f"{LOADER_SHIM_NAME}.py").write_text(_SHIM_TEMPLATE.format(names=", ".join(names)))


def register_family_classes(config_class: type, model_classes: dict[str, type]) -> None:
    """Register the compressed classes with the Auto factories (once, at import)."""
    config_class._auto_classes = dict(model_classes)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    autos = {"AutoModel": AutoModel, "AutoModelForImageClassification": AutoModelForImageClassification}
    for auto_name, model_class in model_classes.items():
        autos[auto_name].register(config_class, model_class, exist_ok=True)


__all__ = [
    "CompressedConfigMixin",
    "CompressedModelMixin",
    "LOADER_SHIM_NAME",
    "PlanMismatchError",
    "auto_map_for",
    "make_compressed_model_class",
    "register_family_classes",
    "write_loader_shim",
]
