"""``PruningTrainer``: UVC (unified structured pruning + block skipping + distillation) as a Trainer.

    trainer = PruningTrainer(model=dense, teacher=dense_teacher, compression_config=config, args=..., train_dataset=...)
    trainer.train()            # warm-up, primal-dual search, projection onto the budget, post-training
    pruned = trainer.export()  # physically smaller model, plan in its config

Stages are fractions of ``max_steps`` (``CompressionConfig.pruning_warmup_ratio`` and
``pruning_search_ratio``; the rest is post-training with the structure fixed). The controller's state
(stage, pruned fractions, gate logits, multipliers, the final structure) is saved in every checkpoint
as ``pruning_state.json`` and restored on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...configuration import CompressionConfig
from ...modeling_utils import CompressedModelMixin
from ...training.callbacks import CompressionCallback
from ...training.trainer import DistillationTrainer
from .export import export_pruned
from .search import UVCController
from .structure import PrunableModel

STATE_FILE = "pruning_state.json"


class PruningTrainer(DistillationTrainer):
    """:class:`~hf_vitcompress.DistillationTrainer` that learns which heads, value dims, MLP neurons and blocks
    to remove under ``compression_config.target_flops_ratio``, then :meth:`export` removes them."""

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | None = None,
        compression_config: CompressionConfig | None = None,
        args=None,
        callbacks: list | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(compression_config, CompressionConfig) or compression_config.method != "pruning":
            raise ValueError(
                "PruningTrainer needs compression_config=CompressionConfig(method='pruning', target_flops_ratio=...)."
            )
        if model is None or isinstance(model, CompressedModelMixin):
            raise ValueError("PruningTrainer prunes a dense model: pass the original (uncompressed) checkpoint.")
        self.compression_config = compression_config
        if args is not None:
            if args.fp16:
                raise NotImplementedError(
                    "PruningTrainer does not support fp16 yet: the gradient scaler scales the search variables' gradients "
                    "too (and skips steps). Train in bf16 or fp32."
                )
            if args.load_best_model_at_end:
                raise ValueError(
                    "load_best_model_at_end would reload weights from a checkpoint of another stage (the best score usually "
                    "comes from before pruning) under the final structure; PruningTrainer does not support it."
                )
            if args.world_size > 1:
                raise NotImplementedError(
                    "PruningTrainer runs in one process for now: the search variables (pruned fractions, gates, "
                    "multipliers) are not yet synchronized across processes, so each would prune differently."
                )
        self.structure = PrunableModel.of(model)
        budget = self.structure.check_budget(compression_config.target_flops_ratio, compression_config.skip_blocks)
        self.controller = UVCController(self.structure, compression_config, budget)
        callbacks = [*(callbacks or []), CompressionCallback(controllers=[self.controller])]
        super().__init__(model=model, teacher=teacher, args=args, callbacks=callbacks, **kwargs)
        self.controller.attach(model)

    def export(self) -> nn.Module:
        """The pruned model, physically sliced, as the family's compressed class (``save_pretrained`` ready).

        If training stopped before the search ended (or has not started), the current search state is
        projected onto the budget (the result then had no post-training); the controller is left as it
        is, so training can go on and a later export reflects it.
        """
        model = self.accelerator.unwrap_model(self.model)
        state = self.controller.projected_state(model)
        self.controller.detach()
        try:
            args = self.args
            pruned = export_pruned(
                model,
                self.structure,
                state,
                self.compression_config,
                provenance={
                    "pruning": {
                        "algorithm": "uvc",
                        "steps": self.state.global_step,
                        "warmup_ratio": self.compression_config.pruning_warmup_ratio,
                        "search_ratio": self.compression_config.pruning_search_ratio,
                        "skipped_blocks": sum(block.skipped for block in state),
                    },
                    "finetuning": {
                        "steps": self.state.global_step,
                        "alpha": args.alpha if self.teacher is not None else 0.0,
                        "kind": args.kind,
                        "temperature": args.temperature,
                        "learning_rate": args.learning_rate,
                        "batch_size": args.per_device_train_batch_size
                        * max(args.world_size, 1)
                        * args.gradient_accumulation_steps,
                    },
                },
            )
        finally:
            self.controller.attach(model)
        return pruned

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.controller.state_dict(), handle)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {STATE_FILE}: it was not written by PruningTrainer, so the search "
                "state (pruned fractions, multipliers, final structure) cannot be restored."
            )
        with open(path, encoding="utf-8") as handle:
            self.controller.load_state_dict(json.load(handle))


__all__ = ["PruningTrainer"]
