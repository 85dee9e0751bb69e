"""What every model family adapter provides: where the blocks and their linears live."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """Family-specific facts, nothing else. Adding a family is one short file that builds one of these.

    ``linear_groups`` lists a block's linears in the order data flows through them; linears in one
    group read the same input (q/k/v), so sequential calibration handles them together.
    Paths in ``linear_groups`` that a block does not have are skipped, so one adapter can list the
    variants of a family (DINOv2's GELU MLP ``fc1``/``fc2`` and its SwiGLU ``gate_proj``/``up_proj``/``down_proj``).
    ``block_path`` is where the ``ModuleList`` of blocks lives in the bare model (``layers`` for ViT,
    ``encoder.layer`` for DINOv2); a task model holds the bare one at ``backbone_attr``.
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
    # The compression methods that handle this family's blocks (pruning needs ViT's attention / mlp names).
    methods: tuple[str, ...] = ("activation_aware", "head_factorization", "pruning")

    @property
    def roles(self) -> tuple[str, ...]:
        """Short names users may pass in ``target_modules`` (``q_proj``, ``fc1``, ...)."""
        return tuple(path.rsplit(".", 1)[-1] for group in self.linear_groups for path in group)

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, self.pretrained_class)

    def block_list_name(self, model: nn.Module) -> str:
        """Dotted path of the ``ModuleList`` of encoder blocks inside ``model``."""
        for path in (self.block_path, f"{self.backbone_attr}.{self.block_path}"):
            try:
                if isinstance(model.get_submodule(path), nn.ModuleList):
                    return path
            except AttributeError:
                continue
        raise ValueError(
            f"Cannot find the encoder blocks of {type(model).__name__} (expected `.{self.block_path}` or "
            f"`.{self.backbone_attr}.{self.block_path}`)."
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.block_list_name(model))

    def block_linear_names(self, model: nn.Module) -> list[list[list[str]]]:
        """``[block][group][linear]`` full module names, in data-flow order."""
        prefix = self.block_list_name(model)
        blocks = self.blocks(model)

        def is_linear(index: int, path: str) -> bool:  # a user may have replaced a linear with something else
            try:
                return isinstance(blocks[index].get_submodule(path), nn.Linear)
            except AttributeError:
                return False

        return [
            [[f"{prefix}.{index}.{path}" for path in group if is_linear(index, path)] for group in self.linear_groups]
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
