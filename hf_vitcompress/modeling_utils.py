"""What all compressed model classes share: rebuild from the plan, strict loading, the loader shim.

Each family file defines a config subclass with its own ``model_type`` and gets its model classes from
:func:`make_compressed_model_class`. Registering them with the Auto classes happens once, on
``import hf_vitcompress``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.utils import output_capturing

from .attention import HeadFactorizedAttention
from .evaluation import EvaluationReport
from .layers import SkippedBlock
from .plan import CompressionPlan, PlanMismatchError, apply_plan_structure, count_parameters, rekey_plan

LOADER_SHIM_NAME = "vitcompress_loader"

# What transformers raises (after logging its load report) when weights have the wrong shape and the caller did not
# pass ``ignore_mismatched_sizes=True`` (transformers/utils/loading_report.py, 5.x). Raised for weights outside the
# plan, so that code written against transformers (``except RuntimeError``, fine-tuning recipes) behaves the same.
MISMATCHED_SIZES_MESSAGE = (
    "You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look at the above report!"
)

# transformers 5.x spells it this way; accept the corrected spelling should a release fix it.
_install_output_hook = (
    getattr(output_capturing, "install_output_capuring_hook", None) or output_capturing.install_output_capturing_hook
)

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

    _auto_classes: dict[str, type | tuple[type, ...]] = {}

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
            self._build_planned_modules(config)
        install_output_recorders(self)

    def _build_planned_modules(self, config) -> None:
        """Swap in the planned modules, named as this model names them, and initialize them as transformers would.

        The plan is re-keyed first (see :func:`~hf_vitcompress.plan.rekey_plan`): a classifier's plan says
        ``vit.layers.0...``, its backbone loaded alone says ``layers.0...``. ``config.compression_plan`` is
        rewritten to match, since tuning, model cards and evaluation read module names from it; when the model
        is not the kind that was compressed (backbone of a classifier, or a different head), the parameter
        counts are recounted for this model.
        """
        stored = CompressionPlan.from_dict(config.compression_plan)
        plan = rekey_plan(stored, self)
        compressed_class = (getattr(config, "compression_provenance", None) or {}).get("base_model_class")
        recount = plan.layers.keys() != stored.layers.keys() or (
            compressed_class is not None and compressed_class != self._dense_class.__name__
        )
        dense_parameters = count_parameters(self) if recount else plan.dense_parameters
        apply_plan_structure(self, plan)
        if recount:
            plan = replace(plan, dense_parameters=dense_parameters, parameters=count_parameters(self))
            config.compression_plan = plan.to_dict()
        # post_init() initialized the dense modules the plan just replaced; the new ones carry torch's default
        # init (std ~ 1/sqrt(3·fan_in), about 0.1 at these widths). Running transformers' initialization again
        # reaches only them: every module it already initialized carries `_is_hf_initialized`. Under
        # from_pretrained the model is built on the meta device, where init_weights does nothing and the
        # loader initializes whatever the checkpoint did not fill, the same way.
        self.init_weights()

    @property
    def compression_plan(self) -> CompressionPlan:
        return CompressionPlan.from_dict(self.config.compression_plan or {"layers": {}})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose weights do not fit the plan.

        For the planned modules, transformers would only log a warning for missing or unexpected weights and
        initialize the missing ones randomly: a silently broken model. Those raise :class:`PlanMismatchError`.
        Every other weight is handled exactly as transformers handles it: a new classifier size
        (``num_labels=``) raises transformers' size-mismatch error unless ``ignore_mismatched_sizes=True``, a head
        missing from a backbone-only checkpoint is freshly initialized with transformers' warning, and
        ``output_loading_info=True`` reports those keys.
        """
        want_info = kwargs.pop("output_loading_info", False)
        user_ignores_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers raises its generic error for any mismatch; let it report them instead, so that
        # planned layers get the message below and the others transformers' own error.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        in_plan = planned_key_filter(model)
        missing = [key for key in info.get("missing_keys", ()) if in_plan(key)]
        unexpected = [key for key in info.get("unexpected_keys", ()) if in_plan(key)]
        mismatched = [key for key, *_ in info.get("mismatched_keys", ()) if in_plan(key)]
        problems = []
        if missing:
            problems.append(f"missing weights: {_preview(missing)}")
        if unexpected:
            problems.append(f"weights the plan has no place for: {_preview(unexpected)}")
        if mismatched:
            problems.append(f"weights of the wrong shape: {_preview(mismatched)}")
        if problems:
            raise PlanMismatchError(
                f"The checkpoint does not match its compression plan ({'; '.join(problems)}). "
                "It was probably edited or saved from a different model; re-run compression or restore the original files."
            )
        if info.get("mismatched_keys") and not user_ignores_mismatch:
            raise RuntimeError(MISMATCHED_SIZES_MESSAGE)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and Path(source).is_dir():
            model.evaluation_report = EvaluationReport.load(source)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as transformers does, plus the loader shim that ``auto_map`` points at and, when one was
        measured on exactly these weights, the evaluation report (which the model card reads).

        Keys are saved with transformers' renamings (the classic names) but without its converters: DINOv2's
        concatenates ``gate_proj`` and ``up_proj`` into one ``weights_in`` on save and splits it on load, which
        takes whatever of the two is dense, so a plan that factorized one and not the other saved a ``weights_in``
        of the wrong size that came back as two half-sized dense linears (refused by the plan check). A saved
        compressed checkpoint has no fused key, so the load-side converter finds nothing to split."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter

        conversions = getattr(self, "_weight_conversions", None)
        if conversions is None:  # built in memory (compress): what transformers would reconstruct for the save
            conversions = get_model_conversion_mapping(self, add_legacy=False)
            conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
        had, kept = "_weight_conversions" in vars(self), vars(self).get("_weight_conversions")
        self._weight_conversions = [c for c in conversions if not isinstance(c, WeightConverter)]
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had:
                self._weight_conversions = kept
            else:
                del self._weight_conversions
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


def planned_key_filter(model: nn.Module) -> Callable[[str], bool]:
    """``in_plan(key)``: whether a weight name belongs to one of ``model``'s planned modules.

    transformers reports missing and mismatched keys in the model's names, unexpected ones as the checkpoint
    names them, which may lack or carry ``base_model_prefix``; both sides are compared without it (a head
    module never shares a name with a backbone module).
    """
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def strip(name: str) -> str:
        return name[len(prefix) :] if prefix != "." and name.startswith(prefix) else name

    planned = {strip(name) for name in (getattr(model.config, "compression_plan", None) or {}).get("layers", {})}

    def in_plan(key: str) -> bool:
        parts = strip(key).split(".")
        return any(".".join(parts[:end]) in planned for end in range(1, len(parts) + 1))

    return in_plan


# -- output recording -------------------------------------------------------------------------------
def install_output_recorders(model: nn.Module) -> None:
    """Make ``output_attentions`` / ``output_hidden_states`` see the modules compression put in.

    transformers records those outputs with forward hooks on the classes a model lists in
    ``_can_record_outputs`` (``ViTAttention``, ``ViTLayer``, ...), looked up per model *class* and installed
    by the backbone (``model.vit``, a plain ``ViTModel`` even inside a compressed classifier). A
    :class:`HeadFactorizedAttention` or a :class:`SkippedBlock` is not among them, so head-factorized and
    pruned models returned no attention maps and too few hidden states. This puts transformers' own hook on
    each of them, once (the hook does nothing unless a forward asks for outputs), so that they record just
    as the modules they replace: attention weights (``None`` under SDPA, which computes none, as for the
    dense model) and one hidden state per block, ``num_hidden_layers + 1`` in all. A skipped block has no
    attention and records none.

    Also registers compressed classes that were never constructed (``compress()`` changes ``__class__``)
    in the per-class registry transformers reads, as ``PreTrainedModel.__init__`` would have.
    """
    containers: dict[str, list[str]] = {}  # per output, found once, and only when a module needs a hook
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not output_capturing._CAN_RECORD_REGISTRY.get(module):
            output_capturing._CAN_RECORD_REGISTRY[module] = module._can_record_outputs
        if getattr(module, "_vitcompress_records_outputs", False):
            continue
        if isinstance(module, HeadFactorizedAttention):
            output, index = "attentions", 1
        elif isinstance(module, SkippedBlock):
            output, index = "hidden_states", 0
        else:
            continue
        if output not in containers:
            containers[output] = _recording_containers(model, output)
        # a module around it (Swin's stage) records what it returns (the attention weights, the hidden states of
        # the stage): then nothing to add
        if not any(name.startswith(f"{container}.") for container in containers[output]):
            _install_output_hook(module, output, index)
        module._vitcompress_records_outputs = True


def _recording_containers(model: nn.Module, output: str) -> list[str]:
    """Names of the modules of ``model`` that transformers records ``output`` (``attentions``, ``hidden_states``)
    from. Usually those are the modules compression replaces (``ViTAttention``, ``ViTLayer``); Swin records each
    stage's last attention weights and its hidden states from the ``SwinStage`` output, and a head-factorized
    attention or a skipped block inside one must not record as well."""
    classes = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            recorder = (getattr(module, "_can_record_outputs", None) or {}).get(output)
            target = getattr(recorder, "target_class", recorder)
            if isinstance(target, type):
                classes.add(target)
    return [name for name, module in model.named_modules() if classes and isinstance(module, tuple(classes))]


def _asks_for_outputs(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    if isinstance(model, BackboneMixin):  # a ...Backbone builds its feature maps from the hidden states, always
        return True
    for name in ("output_attentions", "output_hidden_states"):
        value = kwargs.get(name, getattr(model.config, name, None))
        if value is not None and value is not False:  # an index (even 0) or a list selects hidden states
            return True
    return False


def _recording_forward(base_forward: Callable) -> Callable:
    """``base_forward`` that first hooks modules swapped in since construction (``compress()`` builds the
    model without ``__init__``; ``tune`` and ``search_ranks`` replace modules); same signature, so that
    ``Trainer`` and PEFT, which read it, see the base class's arguments."""

    @functools.wraps(base_forward)
    def forward(self, *args: Any, **kwargs: Any):
        if _asks_for_outputs(self, kwargs):
            install_output_recorders(self)
        return base_forward(self, *args, **kwargs)

    return forward


# -- classes and registration -----------------------------------------------------------------------
def make_compressed_config_class(base_config: type, model_type: str, module: str) -> type:
    """``Compressed<BaseConfig>``: ``base_config`` plus the compression config, plan and provenance, under its own
    ``model_type`` (so that a plain transformers install refuses the checkpoint instead of loading it wrong).
    Assign it to a module-level name equal to its ``__name__`` in ``module``."""
    fields = ("compression_config", "compression_plan", "compression_provenance")
    namespace = {
        "__module__": module,
        "__doc__": f"``{base_config.__name__}`` plus the compression config and plan, under its own ``model_type``.",
        "__annotations__": dict.fromkeys(fields, dict | None),
        "model_type": model_type,
        **dict.fromkeys(fields),
    }
    return strict(type(f"Compressed{base_config.__name__}", (CompressedConfigMixin, base_config), namespace))


def make_compressed_model_class(base_class: type, config_class: type, module: str) -> type:
    """``Compressed<Base>``: ``base_class`` whose listed linears are rebuilt from the plan.

    ``__init__`` and ``forward`` show the base class's signatures (``ViTModel``'s ``add_pooling_layer`` and
    ``use_mask_token``, ...): transformers' tests, ``Trainer`` and PEFT inspect them.
    """
    name = f"Compressed{base_class.__name__}"

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        CompressedModelMixin.__init__(self, config, *args, **kwargs)

    __init__.__signature__ = inspect.signature(base_class.__init__)
    __init__.__doc__ = base_class.__init__.__doc__
    __init__.__qualname__ = f"{name}.__init__"
    forward = _recording_forward(base_class.forward)
    forward.__qualname__ = f"{name}.forward"
    namespace = {
        "config_class": config_class,
        "__module__": module,
        "__init__": __init__,
        "forward": forward,
        "_dense_class": base_class,
    }
    cls = type(name, (CompressedModelMixin, base_class), namespace)
    cls.__doc__ = (
        f"A {base_class.__name__} compressed by hf_vitcompress (architecture from ``config.compression_plan``)."
    )
    _share_weight_renaming(base_class.__name__, name)
    return cls


def _share_weight_renaming(dense_name: str, compressed_name: str) -> None:
    """Give the compressed class (or ``model_type``) the checkpoint key renaming transformers has for the dense one.

    transformers looks renamings up by class name, then ``model_type``, for the model and each sub-model:
    ``ViTModel``'s maps the classic names (``encoder.layer.N.attention.attention.query``) to 5.x ones, both
    ways. A compressed classifier's backbone is a plain ``ViTModel`` and gets it, but a bare
    ``CompressedViTModel`` did not: it saved 5.x names, and a classifier checkpoint (classic names) loaded
    into it as a backbone found none of its weights. Renaming an already renamed key is a no-op, so bare
    checkpoints saved without it still load.
    """
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping(dense_name)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(compressed_name, mapping, overwrite=True)


def auto_map_for(config_class: type, model_classes: dict[str, type | tuple[type, ...]]) -> dict[str, str]:
    """``auto_map`` entries pointing the Auto classes at the loader shim (the default class where an Auto class
    has several; with the plugin imported, transformers picks among them by ``config.architectures``)."""
    entries = {"AutoConfig": f"{LOADER_SHIM_NAME}.{config_class.__name__}"}
    for auto, classes in model_classes.items():
        default = classes[0] if isinstance(classes, tuple) else classes
        entries[auto] = f"{LOADER_SHIM_NAME}.{default.__name__}"
    return entries


def write_loader_shim(save_directory: str | os.PathLike, config: Any) -> None:
    names = sorted({entry.split(".", 1)[1] for entry in (getattr(config, "auto_map", None) or {}).values()})
    if names:
        Path(save_directory, f"{LOADER_SHIM_NAME}.py").write_text(_SHIM_TEMPLATE.format(names=", ".join(names)))


def register_family_classes(config_class: type, model_classes: dict[str, type | tuple[type, ...]]) -> None:
    """Register the compressed classes with the Auto factories (once, at import).

    A tuple registers several classes for one Auto class: transformers then builds the one named in the
    checkpoint's ``config.architectures`` (the first when none matches), as its own mapping does for
    ``deit``. That is how a distilled DeiT reloads as ``...WithTeacher`` through
    ``AutoModelForImageClassification`` under the same ``model_type``.
    """
    config_class._auto_classes = dict(model_classes)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    dense_config = next(c for c in config_class.__mro__[1:] if getattr(c, "model_type", "") and "model_type" in vars(c))
    _share_weight_renaming(dense_config.model_type, config_class.model_type)
    autos = {
        "AutoModel": AutoModel,
        "AutoModelForImageClassification": AutoModelForImageClassification,
        "AutoBackbone": AutoBackbone,
    }
    for auto_name, classes in model_classes.items():
        autos[auto_name].register(config_class, classes, exist_ok=True)


__all__ = [
    "CompressedConfigMixin",
    "CompressedModelMixin",
    "LOADER_SHIM_NAME",
    "MISMATCHED_SIZES_MESSAGE",
    "PlanMismatchError",
    "auto_map_for",
    "install_output_recorders",
    "make_compressed_config_class",
    "make_compressed_model_class",
    "planned_key_filter",
    "register_family_classes",
    "write_loader_shim",
]
