"""Training-time hooks for compression, designed once for every method.

``CompressionCallback`` is the one ``TrainerCallback`` a compression run needs. It

* logs what the model being trained costs: parameters, multiply-accumulates per image and the plan's
  ranks, as ``compression/*`` scalars to every logger the Trainer reports to;
* records the numbers ``Trainer.evaluate`` measures on the model (``model.evaluation_report``), so a
  model card pushed after training shows them;
* drives :class:`CompressionController` objects, the plug-in point for methods that change the model
  while it trains (the pattern of PEFT's AdaLoRA callback):

  ================================  =====================================================================
  ``on_train_begin``                check / initialise (e.g. apply masks once)
  ``on_step_begin``                 schedule updates (Gumbel temperature, budget multipliers)
  ``on_pre_optimizer_step``         gradients are still there (gradient-based importance scores)
  ``on_optimizer_step``             re-apply masks, proximal steps, dual ascent
  ``auxiliary_loss``                a term added to the training loss (budget penalties, Lagrangians);
                                    callbacks cannot change the loss, so only ``DistillationTrainer``
                                    (which overrides ``compute_loss``) can honour it
  ``metrics``                       scalars logged with the rest
  ================================  =====================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..calibration.data import image_size_of
from ..evaluation import EvaluationReport, count_macs, weights_fingerprint
from ..layers import LowRankLinear
from ..plan import count_parameters

logger = logging.getLogger(__name__)


class CompressionController:
    """Base class for whatever acts on the model during training. Override only what you need."""

    name = "controller"

    def on_train_begin(self, model: nn.Module, state: TrainerState) -> None:
        pass

    def on_step_begin(self, model: nn.Module, state: TrainerState) -> None:
        pass

    def on_pre_optimizer_step(self, model: nn.Module, state: TrainerState) -> None:
        pass

    def on_optimizer_step(self, model: nn.Module, state: TrainerState) -> None:
        pass

    def auxiliary_loss(self, model: nn.Module, state: TrainerState) -> torch.Tensor | None:
        return None

    def metrics(self, model: nn.Module, state: TrainerState) -> dict[str, float]:
        return {}

    @property
    def adds_loss(self) -> bool:
        return type(self).auxiliary_loss is not CompressionController.auxiliary_loss


class FixedMasks(CompressionController):
    """Keep pruned weights at zero: multiply each named parameter by its 0/1 mask after every optimizer step.

    The post-training stage of structured pruning trains with masks fixed; without this, weight decay
    and momentum would bring pruned entries back.
    """

    name = "masks"

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        if not masks:
            raise ValueError("FixedMasks needs at least one {parameter name: mask} entry.")
        self.masks = {name: mask.detach().bool() for name, mask in masks.items()}

    def on_train_begin(self, model: nn.Module, state: TrainerState) -> None:
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in parameters:
                raise ValueError(f"FixedMasks: the model has no parameter {name!r}.")
            if mask.shape != parameters[name].shape:
                raise ValueError(
                    f"FixedMasks: mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(parameters[name].shape)}."
                )
        self.apply(model)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            parameter = parameters[name]
            parameter.mul_(mask.to(device=parameter.device, dtype=parameter.dtype))

    def on_optimizer_step(self, model: nn.Module, state: TrainerState) -> None:
        self.apply(model)

    def metrics(self, model: nn.Module, state: TrainerState) -> dict[str, float]:
        kept = sum(int(mask.sum()) for mask in self.masks.values())
        total = sum(mask.numel() for mask in self.masks.values())
        return {"masks/kept_fraction": kept / total}


def plan_summary(model: nn.Module) -> dict[str, float]:
    """Scalars describing the factorized layers actually in ``model`` (not just what the config says)."""
    ranks = [module.rank for module in model.modules() if isinstance(module, LowRankLinear)]
    if not ranks:
        return {"factorized_layers": 0}
    return {
        "factorized_layers": len(ranks),
        "rank_mean": sum(ranks) / len(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
    }


class CompressionCallback(TrainerCallback):
    """Log the size and cost of the model being trained and drive :class:`CompressionController` hooks.

    ``example_pixels``: one input used to count multiply-accumulates (default: zeros of the model's
    image size). The count is redone only when the model's structure changes. ``eval_dataset_name``,
    ``eval_dataset_id`` (a Hub dataset id) and ``eval_dataset_split`` name the evaluation data on the
    model card.
    """

    def __init__(
        self,
        controllers: Iterable[CompressionController] = (),
        example_pixels: torch.Tensor | None = None,
        *,
        eval_dataset_name: str | None = None,
        eval_dataset_id: str | None = None,
        eval_dataset_split: str | None = None,
    ) -> None:
        self.controllers = list(controllers)
        self.example_pixels = example_pixels
        self.eval_dataset = {
            "dataset": eval_dataset_name,
            "dataset_id": eval_dataset_id,
            "dataset_split": eval_dataset_split,
        }
        self.supports_auxiliary_loss = False  # set by DistillationTrainer, which adds the terms to its loss
        self._structure_key: tuple | None = None
        self._static_metrics: dict[str, float] = {}
        self._dense_parameters: int | None = None

    # -- what gets logged ---------------------------------------------------------------------------
    def _example(self, model: nn.Module) -> torch.Tensor:
        parameter = next(model.parameters())
        if self.example_pixels is not None:
            return self.example_pixels[:1].to(device=parameter.device, dtype=parameter.dtype)
        config = model.config
        return torch.zeros(
            1, config.num_channels, *image_size_of(config), device=parameter.device, dtype=parameter.dtype
        )

    def metrics(self, model: nn.Module, state: TrainerState) -> dict[str, float]:
        """``compression/*`` scalars for the current model plus each controller's metrics."""
        key = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        if key != self._structure_key:
            was_training = model.training
            model.eval()
            try:
                macs = count_macs(model, self._example(model))
            finally:
                model.train(was_training)
            parameters = count_parameters(model)
            plan = getattr(model.config, "compression_plan", None) or {}
            if self._dense_parameters is None:
                self._dense_parameters = plan.get("dense_parameters") or parameters
            self._static_metrics = {
                "compression/parameters": parameters,
                "compression/param_ratio": parameters / self._dense_parameters,
                "compression/gmacs_per_image": macs / 1e9,
                **{f"compression/{k}": v for k, v in plan_summary(model).items()},
            }
            self._structure_key = key
        values = dict(self._static_metrics)
        for controller in self.controllers:
            values.update({f"compression/{k}": v for k, v in controller.metrics(model, state).items()})
        return values

    def auxiliary_loss(self, model: nn.Module, state: TrainerState) -> torch.Tensor | None:
        terms = [term for c in self.controllers if (term := c.auxiliary_loss(model, state)) is not None]
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    # -- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        needs_loss = [c.name for c in self.controllers if c.adds_loss]
        if needs_loss and not self.supports_auxiliary_loss:
            raise ValueError(
                f"Controllers {needs_loss} add a loss term, which a TrainerCallback cannot do: train with "
                "hf_vitcompress.DistillationTrainer (it adds their terms in compute_loss)."
            )
        for controller in self.controllers:
            controller.on_train_begin(model, state)
        start = self.metrics(model, state)
        logger.info("compression at train start: %s", {k: round(v, 4) for k, v in start.items()})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for controller in self.controllers:
            controller.on_step_begin(model, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for controller in self.controllers:
            controller.on_pre_optimizer_step(model, state)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        for controller in self.controllers:
            controller.on_optimizer_step(model, state)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # DistillationTrainer merges these before logging (so log_history has them too); a plain
        # Trainer gets them here, for the loggers that run after this callback.
        training_log = logs is not None and "loss" in logs  # evaluation results stay metrics only
        if training_log and model is not None and "compression/parameters" not in logs:
            logs.update(self.metrics(model, state))

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        """Keep what ``Trainer.evaluate`` measured on exactly these weights, for the model card."""
        if not metrics or model is None:
            return
        prefix = next(
            (key[: -len("_top1")] for key in metrics if key.endswith("_top1") and "_teacher_" not in key), None
        )
        if prefix is None:
            return
        named = self.evaluating_default_set and prefix == "eval"
        attribution = self.eval_dataset if named else {"dataset": None if prefix == "eval" else prefix[len("eval_") :]}
        measured = {k: float(metrics[f"{prefix}_{k}"]) for k in ("top1", "top5") if f"{prefix}_{k}" in metrics}
        reference = {
            k: float(metrics[f"{prefix}_teacher_{k}"]) for k in ("top1", "top5") if f"{prefix}_teacher_{k}" in metrics
        }
        measured["parameters"] = count_parameters(model)
        dataset = getattr(eval_dataloader, "dataset", None)
        model.evaluation_report = EvaluationReport(
            model=measured,
            weights_fingerprint=weights_fingerprint(model),
            reference=reference or None,
            reference_name="teacher" if reference else None,
            num_images=len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None,
            source=f"Trainer.evaluate at step {state.global_step}",
            **attribution,
        )


__all__ = ["CompressionCallback", "CompressionController", "FixedMasks", "plan_summary"]
