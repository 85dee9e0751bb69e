"""What every model family adapter provides: where the blocks and their linears live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..modeling_utils import make_compressed_model_class, register_family_classes


@dataclass(frozen=True)
class FamilyAdapter:
    """Family-specific facts, nothing else. Adding a family is one short file that builds one of these.

    ``linear_groups`` lists a block's linears in the order data flows through them; linears in one
    group read the same input (q/k/v), so sequential calibration handles them together.
    Paths in ``linear_groups`` that a block does not have are skipped, so one adapter can list the
    variants of a family (DINOv2's GELU MLP ``fc1``/``fc2`` and its SwiGLU ``gate_proj``/``up_proj``/``down_proj``).
    ``block_path`` is where the ``ModuleList`` of blocks lives in the bare model (``layers`` for ViT,
    ``encoder.layer`` for DINOv2); a task model holds the bare one at ``backbone_attr``. A ``*`` in it stands
    for every entry of a ``ModuleList`` (Swin's ``encoder.layers.*.blocks``: stages of blocks): the blocks are
    then those of every stage, in order, and not one chain (a stage ends in a patch merging that changes
    width and token count), so block-by-block calibration refuses such a family (:attr:`chained`).
    ``extra_linear_paths`` are linears outside the blocks that are compressed by default too (Swin's patch
    merging ``reduction``), with the same ``*`` rule.
    ``shared_input_groups`` are the indices of groups that are *all* the input projections of their
    parent module, whose ``forward`` reads its input only through them and its leading shape (ViT's
    attention): those may share one down-projection (:mod:`hf_vitcompress.shared_input`).
    """

    name: str
    base_model_type: str
    pretrained_class: type
    backbone_attr: str
    linear_groups: tuple[tuple[str, ...], ...]
    compressed_classes: dict[type, type] = field(default_factory=dict)
    config_class: type | None = None
    shared_input_groups: tuple[int, ...] = ()
    block_path: str = "layers"
    extra_linear_paths: tuple[str, ...] = ()
    # Attributes the family's own forward overwrites (Swin's layers clamp shift_size / window_size to the first
    # small input they see, and keep the clamp): compress() and count_macs() put them back after their forwards.
    forward_state: tuple[str, ...] = ()
    # What a block returns beside the residual stream, which a SkippedBlock must return too (as Nones): a ViT
    # block returns the hidden states only (0); Swin's layers return (hidden_states, attention weights) (1).
    block_extra_outputs: int = 0
    # A two-tower model (CLIPModel, SiglipModel) compresses its image tower only: ``image_tower(model)`` is a
    # model of a tower family made of the full model's own modules, ``image_tower_parts`` maps each full-model
    # child it holds to where the tower holds it ("" for the tower itself). See compress.compress_image_tower.
    image_tower: Callable[[nn.Module], nn.Module] | None = None
    image_tower_parts: tuple[tuple[str, str], ...] = ()
    # The compression methods that handle this family's blocks (the head methods need a dot-product attention with
    # q_proj/k_proj/v_proj and o_proj or out_proj; pruning also an mlp with fc1/fc2 or gate/up/down_proj).
    methods: tuple[str, ...] = ("activation_aware", "head_factorization", "pruning")

    @property
    def roles(self) -> tuple[str, ...]:
        """Short names users may pass in ``target_modules`` (``q_proj``, ``fc1``, ...)."""
        return tuple(path.rsplit(".", 1)[-1] for group in self.linear_groups for path in group)

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, self.pretrained_class)

    @property
    def chained(self) -> bool:
        """Whether each block's output is the next block's input (false for stages of blocks, see ``block_path``)."""
        return "*" not in self.block_path

    def block_list_name(self, model: nn.Module) -> str:
        """Where the blocks of ``model`` are: ``block_path``, or ``{backbone_attr}.{block_path}`` in a task model."""
        for path in (self.block_path, f"{self.backbone_attr}.{self.block_path}"):
            if _expand(model, path):
                return path
        raise ValueError(
            f"Cannot find the encoder blocks of {type(model).__name__} (expected `.{self.block_path}` or "
            f"`.{self.backbone_attr}.{self.block_path}`)."
        )

    def block_names(self, model: nn.Module) -> list[str]:
        """Full module names of the encoder blocks of ``model``, in the order data flows through them."""
        return [
            f"{prefix}.{index}"
            for prefix in _expand(model, self.block_list_name(model))
            for index in range(len(model.get_submodule(prefix)))
        ]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(name) for name in self.block_names(model)]

    def extra_linear_names(self, model: nn.Module) -> list[str]:
        """Full names of the ``extra_linear_paths`` linears of ``model`` (its default targets outside the blocks)."""
        root = self.block_list_name(model)[: -len(self.block_path)]  # "" or "{backbone_attr}."
        names = []
        for path in self.extra_linear_paths:
            parent, _, leaf = path.rpartition(".")
            for prefix in _expand(model, f"{root}{parent}", kind=nn.Module):
                if isinstance(getattr(model.get_submodule(prefix), leaf, None), nn.Linear):
                    names.append(f"{prefix}.{leaf}")
        return names

    def forward_state_of(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """The ``forward_state`` attributes of every module of ``model`` that has them, by module name."""
        if not self.forward_state:
            return {}
        return {
            name: {attribute: getattr(module, attribute) for attribute in self.forward_state}
            for name, module in model.named_modules()
            if all(hasattr(module, attribute) for attribute in self.forward_state)
        }

    def restore_forward_state(self, model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
        """Put back what :meth:`forward_state_of` recorded (in ``model`` or a compressed copy, same module names)."""
        for name, attributes in state.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            for attribute, value in attributes.items():
                setattr(module, attribute, value)

    def block_linear_names(self, model: nn.Module) -> list[list[list[str]]]:
        """``[block][group][linear]`` full module names, in data-flow order."""
        names = self.block_names(model)
        blocks = [model.get_submodule(name) for name in names]

        def is_linear(index: int, path: str) -> bool:  # a user may have replaced a linear with something else
            try:
                return isinstance(blocks[index].get_submodule(path), nn.Linear)
            except AttributeError:
                return False

        return [
            [[f"{names[index]}.{path}" for path in group if is_linear(index, path)] for group in self.linear_groups]
            for index in range(len(blocks))
        ]

    def shareable_groups(self, model: nn.Module, block_groups: list[list[list[str]]]) -> list[tuple[str, ...]]:
        """The groups of ``block_groups`` (targets, as :meth:`block_linear_names` lays them out) that may share
        one down-projection: a shared-input group with every one of its linears targeted."""
        everything = self.block_linear_names(model)
        return [
            tuple(block[g])
            for block, full in zip(block_groups, everything, strict=True)
            for g in self.shared_input_groups
            if g < len(block) and len(block[g]) > 1 and block[g] == full[g]
        ]

    def compressed_class_for(self, model: nn.Module) -> type:
        cls = type(model)
        if cls in self.compressed_classes.values():
            return cls
        if cls not in self.compressed_classes:
            supported = ", ".join(sorted(c.__name__ for c in self.compressed_classes))
            raise TypeError(
                f"{cls.__name__} is a {self.name} model, but only these classes can be compressed: {supported}. "
                "Load the checkpoint with one of them (AutoModelForImageClassification or AutoModel)."
            )
        return self.compressed_classes[cls]


def _expand(model: nn.Module, path: str, kind: type = nn.ModuleList) -> list[str]:
    """The module names ``path`` stands for in ``model`` (each ``*`` is every index of a ``ModuleList``), keeping
    those that are a ``kind``; ``[]`` where the path does not exist."""
    names = [""]
    for part in path.split("."):
        expanded = []
        for name in names:
            try:
                module = model.get_submodule(name) if name else model
            except AttributeError:
                continue
            if part == "*":
                if isinstance(module, nn.ModuleList):
                    expanded.extend(f"{name}.{index}" if name else str(index) for index in range(len(module)))
            elif isinstance(getattr(module, part, None), nn.Module):
                expanded.append(f"{name}.{part}" if name else part)
        names = expanded
    return [name for name in names if isinstance(model.get_submodule(name), kind)]


def build_family(
    module: str,
    config_class: type,
    classes: dict[type, str | None],
    **facts,
) -> FamilyAdapter:
    """The adapter of a family whose dense classes are ``classes`` (each with the Auto class it registers with,
    or ``None``): makes their compressed classes in ``module``, registers them, and records the ``facts``
    (the other :class:`FamilyAdapter` fields). The compressed classes are ``adapter.compressed_classes``."""
    compressed = {dense: make_compressed_model_class(dense, config_class, module) for dense in classes}
    autos: dict[str, list[type]] = {}
    for dense, auto in classes.items():
        if auto:
            autos.setdefault(auto, []).append(compressed[dense])
    # several classes for one Auto class register as a tuple: transformers builds the one `architectures` names
    register_family_classes(config_class, {auto: c[0] if len(c) == 1 else tuple(c) for auto, c in autos.items()})
    return FamilyAdapter(compressed_classes=compressed, config_class=config_class, **facts)
