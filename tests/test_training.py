"""DistillationTrainer, DistillationArguments, CompressionCallback, controllers and schedules."""

import math

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hf_vitcompress import (
    CompressionCallback,
    CompressionConfig,
    CompressionController,
    DistillationArguments,
    DistillationTrainer,
    FixedMasks,
    Schedule,
    compress,
    metrics,
)
from hf_vitcompress.training import distillation_loss, feature_alignment_loss

from .conftest import tiny_deit, tiny_vit

STUDENT_CONFIG = CompressionConfig(target_param_ratio=0.5, compensation_rank=0)


def make_dataset(pixels, num_labels=5):
    labels = torch.arange(len(pixels)) % num_labels
    return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationArguments(**values)


@pytest.fixture
def pair(pixels):
    teacher = tiny_vit()
    return compress(teacher, STUDENT_CONFIG, pixels, progress=False), teacher


# -- losses in closed form -----------------------------------------------------------------------
def test_soft_kd_equals_closed_form():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 2.5]])
    temperature = 2.0
    p = np.exp(teacher.numpy() / temperature)
    p /= p.sum(1, keepdims=True)
    q = np.exp(student.numpy() / temperature)
    q /= q.sum(1, keepdims=True)
    expected = (p * (np.log(p) - np.log(q))).sum(1).mean() * temperature**2
    assert distillation_loss(student, teacher, "soft", temperature).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(teacher, teacher, "soft", 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_kd_is_cross_entropy_to_teacher_argmax():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[0.0, 4.0, 0.0], [5.0, 0.5, 2.5]])  # argmax 1, 0
    expected = -(F.log_softmax(student, -1)[0, 1] + F.log_softmax(student, -1)[1, 0]) / 2
    assert distillation_loss(student, teacher, "hard").item() == pytest.approx(expected.item(), rel=1e-6)


def test_kd_refuses_different_label_spaces():
    with pytest.raises(ValueError, match="same label space"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), "soft")


def test_feature_alignment_is_mean_mse_and_names_bad_layers():
    student = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]
    teacher = [torch.ones(2, 3, 4), torch.ones(2, 3, 4) * 3]
    assert feature_alignment_loss(student, teacher, [0, -1]).item() == pytest.approx((1 + 4) / 2)
    with pytest.raises(ValueError, match="feature layer 5 does not exist"):
        feature_alignment_loss(student, teacher, [5])


def test_schedules():
    assert Schedule(1.0, 0.0, "linear").value(0.25) == pytest.approx(0.75)
    assert Schedule(1.0, 0.0, "cosine").value(0.5) == pytest.approx(0.5)
    assert Schedule(5.0, 0.1, "exponential").value(1.0) == pytest.approx(0.1)
    assert Schedule(5.0, 0.1, "exponential").value(0.5) == pytest.approx(math.sqrt(0.5))
    assert Schedule(2.0, kind="constant").value(0.9) == 2.0
    assert Schedule(1.0, 0.0).value(7.0) == 0.0  # progress is clamped
    with pytest.raises(ValueError, match="non-zero start and end"):
        Schedule(1.0, 0.0, "exponential")


# -- arguments and bad input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"kind": "medium"}, "kind must be one of"),
        ({"feature_weight": 1.0}, "needs feature_layers"),
        ({"feature_weight": 1.0, "feature_layers": [1], "feature_weight_schedule": "sometimes"}, "Unknown schedule"),
    ],
)
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_bad_teachers(tmp_path, pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="predicts 7 classes but the student 5"):
        DistillationTrainer(model=student, teacher=tiny_vit(num_labels=7), args=make_args(tmp_path))
    renamed = tiny_vit()
    renamed.config.id2label = {i: f"other{i}" for i in range(5)}
    with pytest.raises(ValueError, match="id2label differs"):
        DistillationTrainer(model=student, teacher=renamed, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="meta"):
        DistillationTrainer(model=student, teacher=tiny_vit().to("meta"), args=make_args(tmp_path))
    with pytest.raises(ValueError, match="teacher is the student"):
        DistillationTrainer(model=student, teacher=student, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="need a teacher"):
        DistillationTrainer(model=student, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="need a teacher"):  # feature alignment needs one too
        DistillationTrainer(model=student, args=make_args(tmp_path, alpha=0.0, feature_weight=1.0, feature_layers=[-1]))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(TypeError, match="needs DistillationArguments"):
        DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(str(tmp_path), report_to=[]))


def test_missing_labels_is_a_clear_error(tmp_path, pair, pixels):
    student, teacher = pair
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=make_args(tmp_path), train_dataset=[{"pixel_values": p} for p in pixels]
    )
    with pytest.raises(ValueError, match="no 'labels'.*alpha=1.0"):
        trainer.train()
    # Label-free distillation works.
    DistillationTrainer(
        model=student,
        teacher=teacher,
        args=make_args(tmp_path, alpha=1.0, max_steps=1),
        train_dataset=[{"pixel_values": p} for p in pixels],
    ).train()


# -- training -------------------------------------------------------------------------------------
@torch.no_grad()
def kd_on(student, teacher, pixels, kind="soft"):
    student.eval()
    return distillation_loss(student(pixel_values=pixels).logits, teacher(pixel_values=pixels).logits, kind).item()


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_lowers_kd_loss_and_leaves_teacher_alone(tmp_path, pair, pixels, kind):
    student, teacher = pair
    with torch.no_grad():  # a confident teacher and a student that starts far from it
        teacher.classifier.weight.mul_(20)
        student.classifier.weight.normal_(0, 1.0)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = kd_on(student, teacher, pixels, kind)
    args = make_args(
        tmp_path, alpha=1.0, kind=kind, max_steps=15, learning_rate=1e-2, save_strategy="steps", save_steps=15
    )
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=make_dataset(pixels))
    trainer.train()
    assert kd_on(student, teacher, pixels, kind) < 0.7 * before
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    saved = safetensors.torch.load_file(tmp_path / "out" / "checkpoint-15" / "model.safetensors")
    assert len(saved) == len(student.state_dict())  # the student only: no teacher weights
    assert not any("teacher" in key for key in saved)
    assert sum(v.numel() for v in saved.values()) == sum(v.numel() for v in student.state_dict().values())


def test_loss_parts_feature_alignment_and_compression_logs(tmp_path, pair, pixels):
    student, teacher = pair
    args = make_args(tmp_path, alpha=0.5, feature_layers=[-1], feature_weight=1.0, max_steps=3)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=make_dataset(pixels),
        callbacks=[CompressionCallback()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    first = logs[0]
    # The logged loss is exactly the weighted sum of its logged parts.
    total = (
        0.5 * first["distill/ce"]
        + 0.5 * first["distill/kd"]
        + first["distill/feature_weight"] * first["distill/feature"]
    )
    assert first["loss"] == pytest.approx(total, rel=1e-3)
    weights = [entry["distill/feature_weight"] for entry in logs]
    assert weights[0] == 1.0 and weights[0] > weights[1] > weights[2]  # linear decay towards 0
    assert first["compression/parameters"] == sum(p.numel() for p in student.parameters())
    assert first["compression/param_ratio"] == pytest.approx(student.compression_plan.param_ratio)
    assert first["compression/factorized_layers"] == len(student.compression_plan.layers)
    assert first["compression/gmacs_per_image"] > 0
    recipe = student.config.compression_provenance["finetuning"]
    assert recipe["steps"] == 3 and recipe["alpha"] == 0.5 and recipe["examples"] == len(pixels)
    from hf_vitcompress import build_model_card

    assert "fine-tuned for 3 steps, batch 8" in str(build_model_card(student))


def test_plain_trainer_gets_compression_logs_too(tmp_path, pair, pixels):
    student, _ = pair
    seen = {}

    class Spy(CompressionCallback.__mro__[1]):  # a TrainerCallback that runs after ours, like a logger
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.update(logs)

    args = TrainingArguments(
        str(tmp_path), max_steps=1, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no"
    )
    Trainer(
        model=student.train(), args=args, train_dataset=make_dataset(pixels), callbacks=[CompressionCallback(), Spy()]
    ).train()
    assert seen["compression/parameters"] == sum(p.numel() for p in student.parameters())


def test_deit_with_distillation_token_trains_both_heads(tmp_path, pixels):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from .conftest import TINY

    torch.manual_seed(0)
    dense = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, num_labels=5)).eval()
    student = compress(dense, STUDENT_CONFIG, pixels, progress=False)
    heads = {
        n: p.clone()
        for n, p in student.named_parameters()
        if n.startswith(("cls_classifier", "distillation_classifier"))
    }
    trainer = DistillationTrainer(
        model=student,
        teacher=tiny_deit(),
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=make_dataset(pixels),
    )
    trainer.train()
    changed = {n for n, p in student.named_parameters() if n in heads and not torch.equal(p, heads[n])}
    assert any(n.startswith("cls_classifier") for n in changed)
    assert any(n.startswith("distillation_classifier") for n in changed)


def test_deit_class_head_learns_from_labels_and_distillation_head_from_the_teacher(tmp_path, pixels):
    """DeiT's two heads are not interchangeable: cross-entropy on the labels trains ``cls_classifier`` only, the
    distillation term ``distillation_classifier`` only (a swap would still train both, on the wrong targets)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from .conftest import TINY

    torch.manual_seed(0)
    student = compress(
        DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, num_labels=5)).eval(),
        STUDENT_CONFIG,
        pixels,
        progress=False,
    )
    teacher = tiny_deit()
    batch = {"pixel_values": pixels[:16], "labels": torch.arange(16) % 5}
    with torch.no_grad():
        outputs = student(pixel_values=batch["pixel_values"])
        teacher_logits = teacher(pixel_values=batch["pixel_values"]).logits
    # The two heads disagree on this batch, so a swapped loss has a different value, not only other gradients.
    assert not torch.allclose(outputs.cls_logits, outputs.distillation_logits, atol=1e-3)
    expected = {
        0.0: F.cross_entropy(outputs.cls_logits, batch["labels"]),
        1.0: distillation_loss(outputs.distillation_logits, teacher_logits, "soft", 2.0),
    }
    for alpha, trained, untouched in (
        (0.0, "cls_classifier", "distillation_classifier"),
        (1.0, "distillation_classifier", "cls_classifier"),
    ):
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=make_args(tmp_path, alpha=alpha, temperature=2.0),
            train_dataset=make_dataset(pixels),
        )
        student.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(student, dict(batch))
        torch.testing.assert_close(loss, expected[alpha])
        loss.backward()
        assert student.get_submodule(trained).weight.grad.abs().sum() > 0
        assert student.get_submodule(untouched).weight.grad is None


def test_evaluate_reports_teacher_and_records_measurement(tmp_path, pair, pixels):
    student, teacher = pair
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(pixels),
        eval_dataset=make_dataset(pixels),
        compute_metrics=metrics.top1,
        callbacks=[CompressionCallback(eval_dataset_name="random pixels")],
    )
    trainer.train()
    result = trainer.evaluate()
    with torch.no_grad():
        labels = torch.arange(len(pixels)) % 5
        teacher_top1 = (teacher(pixel_values=pixels).logits.argmax(-1) == labels).float().mean().item()
        student_top1 = (student.eval()(pixel_values=pixels).logits.argmax(-1) == labels).float().mean().item()
    assert result["eval_teacher_top1"] == pytest.approx(teacher_top1)
    assert result["eval_top1"] == pytest.approx(student_top1)
    report = student.evaluation_report
    assert report.model["top1"] == pytest.approx(student_top1)
    assert report.reference == {"top1": pytest.approx(teacher_top1)}
    assert report.num_images == len(pixels) and report.dataset == "random pixels"
    assert report.matches(student)


# -- hooks ----------------------------------------------------------------------------------------
def test_fixed_masks_stay_zero_through_training(tmp_path, pair, pixels):
    student, teacher = pair
    name = "vit.layers.0.mlp.fc1.lowrank_down.weight"
    weight = dict(student.named_parameters())[name]
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    callback = CompressionCallback([FixedMasks({name: mask})])
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=make_args(tmp_path, max_steps=3, weight_decay=0.1),
        train_dataset=make_dataset(pixels),
        callbacks=[callback],
    )
    trainer.train()
    weight = dict(student.named_parameters())[name]
    assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["compression/masks/kept_fraction"] == pytest.approx(mask.float().mean().item())
    with pytest.raises(ValueError, match="has no parameter"):
        FixedMasks({"nope": mask}).on_train_begin(student, trainer.state)


class L2Penalty(CompressionController):
    name = "l2"

    def __init__(self, weight):
        self.weight = weight

    def auxiliary_loss(self, model, state):
        return self.weight * sum(p.pow(2).sum() for p in model.parameters())


def test_controller_loss_terms_reach_the_loss(tmp_path, pair, pixels):
    student, teacher = pair
    args = make_args(tmp_path, max_steps=1)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=make_dataset(pixels),
        callbacks=[CompressionCallback([L2Penalty(1e-3)])],
    )
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    penalty = first["distill/auxiliary"]
    assert penalty > 0
    assert first["loss"] == pytest.approx(0.5 * first["distill/ce"] + 0.5 * first["distill/kd"] + penalty, rel=1e-3)
    # A plain Trainer cannot add loss terms: it says so instead of silently ignoring them.
    plain = Trainer(
        model=student,
        args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
        train_dataset=make_dataset(pixels),
        callbacks=[CompressionCallback([L2Penalty(1e-3)])],
    )
    with pytest.raises(ValueError, match="DistillationTrainer"):
        plain.train()


# -- resuming -------------------------------------------------------------------------------------
def test_interrupted_finetune_resumes_with_plan_intact(tmp_path, pixels):
    def run(output, resume=None, max_steps=4):
        teacher = tiny_vit()
        student = compress(teacher, STUDENT_CONFIG, pixels, progress=False)
        args = make_args(
            tmp_path,
            output_dir=str(output),
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-2,
        )
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=make_dataset(pixels))
        trainer.train(resume_from_checkpoint=resume)
        return student

    full = run(tmp_path / "full")
    # "Interrupt" after 2 steps: a second run restarts from a fresh compressed model and resumes.
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.compression_plan.to_dict() == full.compression_plan.to_dict()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # A checkpoint whose weights do not fit the plan is refused, not loaded half-way.
    checkpoint = tmp_path / "full" / "checkpoint-2" / "model.safetensors"
    state = safetensors.torch.load_file(checkpoint)
    key = next(k for k in state if "lowrank_down" in k)
    state[key] = state[key][:-1]
    safetensors.torch.save_file(state, checkpoint, metadata={"format": "pt"})
    from hf_vitcompress import PlanMismatchError

    with pytest.raises(PlanMismatchError, match="wrong shape"):
        run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2"))


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, pixels):
    def one_step(batch_size, accumulation):
        teacher = tiny_vit()
        student = compress(teacher, STUDENT_CONFIG, pixels, progress=False)
        args = make_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",  # Adam's first step hides the gradient's scale
            learning_rate=0.5,
        )
        DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=make_dataset(pixels)).train()
        return student.state_dict()

    whole, accumulated = one_step(16, 1), one_step(8, 2)
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(
            whole.values(), compress(tiny_vit(), STUDENT_CONFIG, pixels, progress=False).state_dict().values()
        )
    )
    assert moved
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_several_eval_sets_batch_metrics_and_attribution(tmp_path, pair, pixels):
    student, teacher = pair
    teacher.double()  # the teacher keeps its own dtype: nothing casts the user's model back and forth
    sets = {"a": make_dataset(pixels[:24]), "b": make_dataset(pixels[24:])}
    callback = CompressionCallback(eval_dataset_name="configured", eval_dataset_id="org/data")
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(pixels),
        eval_dataset=sets,
        compute_metrics=metrics.top1,
        callbacks=[callback],
    )
    trainer.train()
    result = trainer.evaluate()
    assert {"eval_a_top1", "eval_b_top1", "eval_a_teacher_top1", "eval_b_teacher_top1"} <= set(result)
    assert not any(key.startswith("compression/") for key in result)  # counts stay out of evaluation results
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert student.evaluation_report.dataset == "b" and student.evaluation_report.dataset_id is None
    # An explicitly passed set is not credited to the configured data set either.
    trainer.eval_dataset = sets["a"]
    trainer.evaluate(make_dataset(pixels[:16]))
    assert student.evaluation_report.dataset is None and student.evaluation_report.num_images == 16
    trainer.evaluate()
    assert student.evaluation_report.dataset == "configured" and student.evaluation_report.dataset_id == "org/data"

    def batched_top1(prediction, compute_result=False):  # the Trainer's batch_eval_metrics protocol
        batched_top1.seen += len(prediction.label_ids)
        return metrics.top1(prediction) if compute_result else {}

    batched_top1.seen = 0
    trainer.compute_metrics = batched_top1
    trainer.args.batch_eval_metrics = True
    trainer._teacher_metrics.clear()
    result = trainer.evaluate()
    assert "eval_top1" in result and "eval_teacher_top1" in result


def test_load_best_model_at_end_restores_the_best_weights_and_their_report(tmp_path, pair, pixels):
    student, teacher = pair
    args = make_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
        learning_rate=5e-2,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=make_dataset(pixels),
        eval_dataset=make_dataset(pixels),
        compute_metrics=metrics.top1,
        callbacks=[CompressionCallback()],
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = safetensors.torch.load_file(f"{best}/model.safetensors")
    reference = type(student).from_pretrained(best)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, msg=name)
    assert len(saved) == len(student.state_dict())
    assert student.evaluation_report is not None and student.evaluation_report.matches(student)


@pytest.mark.parametrize("backbone", ["ViTModel", "Dinov2Backbone"])
def test_a_backbone_is_distilled_on_its_features(tmp_path, pixels, backbone):
    """A ViTModel (no logits, no labels) learns its teacher's last_hidden_state, a Dinov2Backbone its feature
    maps: the feature error drops, and asking for cross-entropy on a backbone is a clear error."""
    from transformers import Dinov2Backbone

    from hf_vitcompress.calibration.validation import output_of

    from .conftest import tiny_dinov2, tiny_vit_model

    teacher = tiny_vit_model() if backbone == "ViTModel" else tiny_dinov2(Dinov2Backbone)
    student = compress(teacher, CompressionConfig(target_param_ratio=0.4), pixels, progress=False)
    data = [{"pixel_values": p} for p in pixels]

    @torch.no_grad()
    def feature_error():
        student.eval()
        reference = output_of(teacher(pixel_values=pixels))[1]
        return float((output_of(student(pixel_values=pixels))[1] - reference).norm() / reference.norm())

    before = feature_error()
    with pytest.raises(ValueError, match="no logits.*alpha=1.0"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path), train_dataset=data).train()
    # 3e-3 overshoots the tiny DINOv2 (random LayerScale and biases), which starts closer to its teacher
    args = make_args(tmp_path, alpha=1.0, max_steps=40, learning_rate=3e-3 if backbone == "ViTModel" else 3e-4)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    trainer.train()
    assert feature_error() < 0.8 * before
    logged = [entry["distill/kd"] for entry in trainer.state.log_history if "distill/kd" in entry]
    assert logged and logged[-1] < logged[0]


@pytest.mark.parametrize("family", ["swin", "clip"])
def test_a_swin_and_a_two_tower_clip_are_distilled_and_tuned(tmp_path, family):
    """The families whose blocks come in stages (Swin) or sit in one tower of two (CLIPModel) train with
    DistillationTrainer like a ViT (the kd error on what users consume drops), and tune merges their factor pairs
    back without changing the function."""
    from hf_vitcompress import tune
    from hf_vitcompress.calibration.validation import output_of

    from .test_families import images, tiny_swin, tiny_two_towers

    pixels = images(32, 32, 32) if family == "swin" else images(32)
    if family == "swin":  # features (a tiny random classifier's class distribution is nearly uniform)
        from transformers import SwinModel

        teacher = tiny_swin(SwinModel)
    else:
        from transformers import CLIPModel

        teacher = tiny_two_towers(CLIPModel)
    student = compress(teacher, CompressionConfig(target_param_ratio=0.3), pixels, progress=False)

    def outputs(model):
        if family == "clip":  # the image embeddings a zero-shot classifier compares with the text ones
            return model.get_image_features(pixel_values=pixels).pooler_output
        return output_of(model(pixel_values=pixels))[1]

    @torch.no_grad()
    def error():
        student.eval()
        reference = outputs(teacher)
        return float((outputs(student) - reference).norm() / reference.norm())

    before = error()
    data = [{"pixel_values": p} for p in pixels]
    args = make_args(tmp_path, alpha=1.0, max_steps=30, learning_rate=3e-4)
    if family == "clip":  # the image tower alone: DistillationTrainer calls the model with images only
        trainer = DistillationTrainer(
            model=student.vision_model, teacher=teacher.vision_model, args=args, train_dataset=data
        )
    else:
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    trainer.train()
    assert error() < 0.9 * before
    with torch.no_grad():
        tuned_before = outputs(student)
    timings = tune(student, {"pixel_values": pixels[:4]}, choices=("dense",), repeats=1, warmup=0)  # as a batch
    assert timings and student.compression_plan.tuning["merged_to_dense"]
    with torch.no_grad():
        torch.testing.assert_close(outputs(student), tuned_before, rtol=1e-4, atol=1e-5)
