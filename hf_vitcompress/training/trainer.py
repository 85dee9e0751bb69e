"""``DistillationTrainer``: recover a compressed model's accuracy from its dense teacher.

A ``transformers.Trainer`` subclass, because only ``compute_loss`` can change the loss (callbacks
cannot). The teacher is frozen, in eval mode, on the student's device and dtype, and is an attribute
of the trainer, never a submodule of the student: it is not in the student's checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, PreTrainedModel, Trainer
from transformers.trainer_pt_utils import nested_gather

from ..calibration.validation import output_of
from .arguments import DistillationArguments
from .callbacks import CompressionCallback
from .losses import distillation_loss, feature_alignment_loss
from .schedules import training_progress


def _num_labels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher that cannot teach this student, naming the problem and the fix."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module (a transformers model); got {type(teacher).__name__}.")
    if teacher is student:
        raise ValueError("The teacher is the student itself: pass the dense model the student was compressed from.")
    student_labels, teacher_labels = _num_labels(student), _num_labels(teacher)
    if student_labels is not None and teacher_labels is not None and student_labels != teacher_labels:
        raise ValueError(
            f"The teacher predicts {teacher_labels} classes but the student {student_labels}: distillation needs "
            "the same label space. Use the dense model the student was compressed from (or one fine-tuned on the same labels)."
        )
    student_map = getattr(getattr(student, "config", None), "id2label", None)
    teacher_map = getattr(getattr(teacher, "config", None), "id2label", None)
    if (
        student_map
        and teacher_map
        and {int(k): v for k, v in student_map.items()} != {int(k): v for k, v in teacher_map.items()}
    ):
        raise ValueError(
            "The teacher's id2label differs from the student's: the same class index would mean different "
            f"classes (e.g. {next(iter(teacher_map.items()))} vs {next(iter(student_map.items()))})."
        )
    devices = {p.device for p in teacher.parameters()}
    if any(device.type == "meta" for device in devices):
        raise ValueError(
            "The teacher has weights on the 'meta' device (not loaded): load it fully, without device_map offloading."
        )
    if len(devices) > 1 or len(set((getattr(teacher, "hf_device_map", None) or {}).values())) > 1:
        raise ValueError(
            f"The teacher is spread over several devices ({sorted(map(str, devices))}); DistillationTrainer runs it "
            "on the student's device. Load it on a single device (no device_map)."
        )


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``(1-α)·CE + α·KD(teacher) + w(t)·feature MSE`` (+ controller terms).

    ``teacher=None`` with ``alpha=0`` is plain fine-tuning with the same logging and hooks.
    ``CompressionCallback`` instances among ``callbacks`` may contribute loss terms through their
    controllers. Checkpoints hold only the student; resuming reloads it through ``from_pretrained``
    (so compressed layers and transformers' renamed weights load correctly).
    """

    def __init__(self, model: nn.Module | None = None, teacher: nn.Module | None = None, args=None, **kwargs: Any):
        if args is None:
            args = DistillationArguments(output_dir="tmp_trainer")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"DistillationTrainer needs DistillationArguments (got {type(args).__name__}); they extend "
                "TrainingArguments with alpha, temperature, kind and feature alignment options."
            )
        if teacher is None and (args.alpha > 0 or args.feature_weight > 0):
            raise ValueError(
                f"alpha={args.alpha}, feature_weight={args.feature_weight} need a teacher; pass teacher=<dense model> "
                "or set alpha=0 and feature_weight=0."
            )
        if args.label_smoothing_factor:
            raise ValueError("DistillationTrainer computes its own loss; label_smoothing_factor is not supported.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; do not pass compute_loss_func.")
        problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        if problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"DistillationTrainer supports single-label classification; the model's problem_type is {problem_type!r}."
            )
        if teacher is not None:
            check_teacher(model, teacher)
            teacher.eval()
            teacher.requires_grad_(False)
        if args.alpha == 0 and teacher is not None and not args.feature_weight:
            teacher = None  # nothing to learn from it; don't pay for its forward passes
        self.teacher = teacher
        if args.label_names is None:
            # Models whose forward takes no labels (DeiT with a distillation token) would otherwise have
            # their labels dropped as an "unused column"; the loss here reads them.
            args.label_names = ["labels"]
        super().__init__(model=model, args=args, **kwargs)
        # Our loss is a per-batch mean: let the Trainer divide it by the gradient-accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        sharded = (
            self.is_fsdp_enabled
            or getattr(getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3
        )
        if sharded and (self.teacher is not None or self.compression_callbacks):
            raise NotImplementedError(
                "DistillationTrainer and CompressionCallback need whole (unsharded) models on every process; FSDP and "
                "DeepSpeed ZeRO-3 are not supported yet. Use DDP (plain multi-GPU) or ZeRO-1/2."
            )
        for callback in self.compression_callbacks:
            callback.supports_auxiliary_loss = True
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self._teacher_metrics: list[tuple[Any, dict[str, float]]] = []  # (dataset, metrics): identity, not id()

    @property
    def compression_callbacks(self) -> list[CompressionCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, CompressionCallback)]

    # -- loss --------------------------------------------------------------------------------------
    def _teacher_on(self, reference: torch.Tensor) -> nn.Module:
        """The teacher on the student's device. Its dtype is left alone: casting a user's model back and forth
        (e.g. for bf16 evaluation) would round its weights; the losses compare logits in float32."""
        if next(self.teacher.parameters()).device != reference.device:
            self.teacher.to(device=reference.device)
        return self.teacher

    def _add_to_log(self, **values: torch.Tensor | float) -> None:
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._loss_sums[key] = self._loss_sums.get(key, 0) + value
        self._loss_count += 1

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        args: DistillationArguments = self.args
        labels = inputs.get("labels")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        progress = training_progress(self.state.global_step, self.state.max_steps)
        feature_weight = args.feature_schedule.value(progress) if args.feature_weight > 0 and model.training else 0.0
        if feature_weight > 0:
            model_inputs["output_hidden_states"] = True
        outputs = model(**model_inputs)
        # A backbone (ViTModel, a DINOv2-style feature extractor) has no logits: it learns its teacher's
        # last_hidden_state (mean squared error), the output its users consume.
        backbone = getattr(outputs, "logits", None) is None
        if backbone and args.alpha < 1:
            raise ValueError(
                f"{type(model).__name__} outputs no logits (a backbone), so there is no cross-entropy to weigh with "
                f"1 - alpha = {1 - args.alpha:g}: it is distilled on the teacher's last_hidden_state. Set alpha=1.0."
            )
        if labels is None and args.alpha < 1:
            raise ValueError(
                f"The batch has no 'labels' but alpha={args.alpha} < 1 weighs cross-entropy on labels. Add a "
                "'labels' column, or set alpha=1.0 to learn from the teacher alone."
            )

        terms: dict[str, torch.Tensor] = {}
        teacher_outputs = None
        if self.teacher is not None:
            teacher = self._teacher_on(next(p for p in model.parameters()))
            with torch.no_grad():
                teacher_outputs = teacher(**model_inputs)
        if backbone:
            if args.alpha > 0:
                # last_hidden_state, or a ...Backbone's feature maps: what its users consume (output_of)
                terms["kd"] = nn.functional.mse_loss(
                    output_of(outputs)[1].float(), output_of(teacher_outputs)[1].float()
                )
        else:
            # DeiT's distillation head learns from the teacher, its class head from the labels.
            task_logits = getattr(outputs, "cls_logits", None)
            task_logits = outputs.logits if task_logits is None else task_logits
            kd_logits = getattr(outputs, "distillation_logits", None)
            kd_logits = outputs.logits if kd_logits is None else kd_logits
            if args.alpha < 1:
                terms["ce"] = nn.functional.cross_entropy(task_logits.float(), labels)
            if args.alpha > 0:
                terms["kd"] = distillation_loss(kd_logits, teacher_outputs.logits, args.kind, args.temperature)
        loss = (1 - args.alpha) * terms.get("ce", 0) + args.alpha * terms.get("kd", 0)
        if feature_weight > 0:
            terms["feature"] = feature_alignment_loss(
                outputs.hidden_states, teacher_outputs.hidden_states, args.feature_layers
            )
            loss = loss + feature_weight * terms["feature"]
        if model.training:
            for callback in self.compression_callbacks:
                extra = callback.auxiliary_loss(model, self.state)
                if extra is not None:
                    terms["auxiliary"] = terms.get("auxiliary", 0) + extra
                    loss = loss + extra
            self._add_to_log(**terms, **({"feature_weight": feature_weight} if args.feature_weight > 0 else {}))
        if not torch.is_tensor(loss):
            raise ValueError("Nothing to train on: alpha=0 without labels, or no loss terms enabled.")
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``, then record the recipe in the model's ``compression_provenance`` (for its card)."""
        output = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        provenance = getattr(getattr(model, "config", None), "compression_provenance", None)
        if isinstance(provenance, dict):
            args_: DistillationArguments = self.args
            provenance["finetuning"] = {
                "steps": self.state.global_step,
                "examples": len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None,
                "alpha": args_.alpha if self.teacher is not None else 0.0,
                "kind": args_.kind,
                "temperature": args_.temperature,
                "learning_rate": args_.learning_rate,
                "batch_size": args_.per_device_train_batch_size
                * max(args_.world_size, 1)
                * args_.gradient_accumulation_steps,
            }
        return output

    # -- logging -----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (not evaluation results, which hyper-parameter search sums up)
            if self._loss_count:  # the loss parts since the last log, averaged over steps and processes
                for key, total in sorted(self._loss_sums.items()):
                    value = nested_gather(total.reshape(1).to(self.args.device), self.args.parallel_mode).mean()
                    logs[f"distill/{key}"] = round(float(value) / self._loss_count, 6)
                self._loss_sums, self._loss_count = {}, 0
            model = self.accelerator.unwrap_model(self.model)
            for callback in self.compression_callbacks:
                logs.update(callback.metrics(model, self.state))
        super().log(logs, start_time)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate`` plus, once per evaluation set, the teacher's metrics (``eval_teacher_*``)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # Trainer's per-name call for a dict of evaluation sets
            dataset = self.eval_dataset[dataset]
        for callback in self.compression_callbacks:  # only the configured set may carry the configured name
            callback.evaluating_default_set = eval_dataset is None and metric_key_prefix == "eval"
        if (
            isinstance(dataset, dict)  # Trainer calls back here once per named set
            or not self.args.evaluate_teacher
            or self.teacher is None
            or self.compute_metrics is None
        ):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        teacher_metrics = next((m for d, m in self._teacher_metrics if d is dataset), None)
        if teacher_metrics is None:
            teacher_metrics = self._evaluate_teacher(dataset)
            self._teacher_metrics.append((dataset, teacher_metrics))
        teacher_metrics = {f"teacher_{k}": v for k, v in teacher_metrics.items()}
        # The metrics dict that on_evaluate and the loggers see is built from compute_metrics' output:
        # hand the teacher's numbers over through it (Trainer adds the key prefix).
        compute_metrics = self.compute_metrics

        def with_teacher(prediction, **kwargs):
            result = compute_metrics(prediction, **kwargs)
            if kwargs.get("compute_result", True):
                result = {**result, **teacher_metrics}
            return result

        self.compute_metrics = with_teacher
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics

    @torch.no_grad()
    def _evaluate_teacher(self, eval_dataset) -> dict[str, float]:
        dataloader = self.get_eval_dataloader(eval_dataset)
        student = self.accelerator.unwrap_model(self.model)
        teacher = self._teacher_on(next(student.parameters()))
        logits, labels = [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            if "labels" not in batch:
                return {}
            output = teacher(**{k: v for k, v in batch.items() if k != "labels"})
            logits.append(self.accelerator.gather_for_metrics(output.logits.float()).cpu())
            labels.append(self.accelerator.gather_for_metrics(batch["labels"]).cpu())
        if not logits:
            return {}
        prediction = EvalPrediction(predictions=torch.cat(logits).numpy(), label_ids=torch.cat(labels).numpy())
        kwargs = {"compute_result": True} if self.args.batch_eval_metrics else {}
        return {k: float(v) for k, v in self.compute_metrics(prediction, **kwargs).items() if np.isscalar(v)}

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """For a compressed model, the hf_vitcompress card (measured numbers only) instead of the Trainer's draft,
        which is built from the log history without checking which weights were measured."""
        model = self.accelerator.unwrap_model(self.model)
        if not getattr(getattr(model, "config", None), "compression_plan", None):
            return super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return None
        from ..hub import build_model_card

        card = build_model_card(
            model, repo_id=self.hub_model_id if self.args.push_to_hub else None, license=kwargs.get("license")
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
        return None

    # -- checkpoints ---------------------------------------------------------------------------------
    def _reload_weights(self, folder: str, model: nn.Module | None = None) -> None:
        """Load a checkpoint's weights through ``from_pretrained``.

        transformers 5.x saves ViT weights under the classic names and renames them only inside
        ``from_pretrained``; the Trainer's own ``load_state_dict`` therefore loads almost nothing when
        resuming. Going through ``from_pretrained`` also rebuilds and checks compressed layers.
        """
        model = model if model is not None else self.model
        target = self.accelerator.unwrap_model(model)
        loaded = type(target).from_pretrained(folder, dtype=next(target.parameters()).dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)
        if hasattr(target, "evaluation_report"):  # the checkpoint's own measurement, if any, matches it again
            target.evaluation_report = getattr(loaded, "evaluation_report", None)

    def _can_reload(self, folder: str, model: nn.Module | None) -> bool:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        return (
            isinstance(target, PreTrainedModel)
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and os.path.isfile(os.path.join(folder, "config.json"))
            and any(
                os.path.isfile(os.path.join(folder, name))
                for name in ("model.safetensors", "model.safetensors.index.json")
            )
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._can_reload(resume_from_checkpoint, model):
            self._reload_weights(resume_from_checkpoint, model)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self._can_reload(self.state.best_model_checkpoint, None):
            self._reload_weights(self.state.best_model_checkpoint)
        else:
            super()._load_best_model()


__all__ = ["DistillationTrainer", "check_teacher"]
