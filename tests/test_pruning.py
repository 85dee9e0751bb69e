"""Structured pruning (UVC and one-shot baselines): FLOPs accounting, physical export, budget, trainer."""

import json

import pytest
import torch

from hf_vitcompress import CompressionConfig, DistillationArguments, PruningError, PruningTrainer, compress
from hf_vitcompress.evaluation import count_macs
from hf_vitcompress.methods.pruning.export import export_pruned
from hf_vitcompress.methods.pruning.importance import magnitude_scores, taylor_scores
from hf_vitcompress.methods.pruning.projection import project_to_budget
from hf_vitcompress.methods.pruning.search import UVCController
from hf_vitcompress.methods.pruning.structure import BlockPruning, PrunableModel

from .conftest import tiny_deit, tiny_vit


def with_biases(model):
    with torch.no_grad():  # random init has zero biases: make every bias matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.3)
    return model


def irregular_state():
    """Block 0 loses head 1, keeps 5 of 12 value dims per head (different ones) and 40 of 96 neurons; block 1 is skipped."""
    generator = torch.Generator().manual_seed(4)
    heads = [0, 2, 3]
    dims = [sorted(torch.randperm(12, generator=generator)[:5].tolist()) for _ in heads]
    neurons = sorted(torch.randperm(96, generator=generator)[:40].tolist())
    return [
        BlockPruning(heads, dims, neurons),
        BlockPruning([0, 1, 2, 3], [list(range(12))] * 4, list(range(96)), True),
    ]


def test_flops_counter_matches_a_hand_count():
    model = tiny_vit()  # 16x16 image, patch 4: 16 patches + CLS = 17 tokens; width 48, 4 heads of 12, MLP 96
    n, d, blocks = 17, 48, 2
    per_block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * 96
    fixed = 16 * 48 * (3 * 4 * 4) + 48 * 5  # patch-embedding conv + classifier
    assert count_macs(model, torch.zeros(1, 3, 16, 16)) == fixed + blocks * per_block
    structure = PrunableModel.of(model)
    assert structure.fixed_macs == fixed
    assert all((b.tokens, b.attention_tokens, b.span, b.hidden) == (n, n, n, d) for b in structure.blocks)  # global
    assert structure.dense_macs == fixed + blocks * per_block
    # Pruned by hand: 3 heads, value width 5 (padded to 12 for SDPA), 40 neurons; block 1 gone.
    state = irregular_state()
    attention = 3 * (2 * n * d * 12 + n * n * 12) + 3 * (2 * n * d * 5 + n * n * 12)
    assert structure.macs(state) == fixed + attention + 2 * n * d * 40
    pruned = export_pruned(model, structure, state, CompressionConfig(method="pruning", target_flops_ratio=0.5))
    assert count_macs(pruned, torch.zeros(1, 3, 16, 16)) == structure.macs(state)
    pruned.config._attn_implementation = "eager"  # eager attention really skips the padded value columns
    eager = fixed + 3 * (2 * n * d * 12 + n * n * 12) + 3 * (2 * n * d * 5 + n * n * 5) + 2 * n * d * 40
    assert count_macs(pruned, torch.zeros(1, 3, 16, 16)) == eager


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_exported_model_equals_the_masked_model(pixels, implementation):
    model = with_biases(tiny_vit())
    model.config._attn_implementation = implementation
    structure = PrunableModel.of(model)
    config = CompressionConfig(method="pruning", target_flops_ratio=0.5, skip_blocks=True)
    controller = UVCController(structure, config, structure.dense_macs)
    controller.attach(model)
    controller.set_final_state(irregular_state())
    with torch.no_grad():
        masked = model(pixel_values=pixels).logits
    controller.detach()
    pruned = export_pruned(model, structure, irregular_state(), config)
    with torch.no_grad():
        torch.testing.assert_close(pruned(pixel_values=pixels).logits, masked, rtol=1e-5, atol=1e-5)
    assert pruned.vit.layers[0].attention.num_heads == 3
    assert pruned.vit.layers[0].mlp.fc1.out_features == 40
    assert not list(pruned.vit.layers[1].parameters())  # the skipped block holds no weights


def test_a_skipped_block_is_an_exact_identity(pixels):
    model = tiny_vit()
    structure = PrunableModel.of(model)
    state = structure.full_state()
    state[0].skipped = True
    pruned = export_pruned(model, structure, state, CompressionConfig(method="pruning", target_flops_ratio=0.9))
    with torch.no_grad():
        hidden = model.vit.embeddings(pixel_values=pixels)
        expected = model.classifier(model.vit.layernorm(model.vit.layers[1](hidden))[:, 0])
        torch.testing.assert_close(pruned(pixel_values=pixels).logits, expected)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("skip_blocks", [False, True])
def test_one_shot_pruning_meets_the_budget_exactly_and_round_trips(tmp_path, pixels, importance, skip_blocks):
    from transformers import AutoModelForImageClassification

    model = tiny_vit()
    structure = PrunableModel.of(model)
    config = CompressionConfig(
        method="pruning", target_flops_ratio=0.45, skip_blocks=skip_blocks, pruning_importance=importance
    )
    pruned = compress(model, config, pixels, progress=False)
    macs = count_macs(pruned, pixels[:1])
    budget = int(0.45 * structure.dense_macs)
    assert macs <= budget
    assert budget - macs < structure.mlp_macs(structure.blocks[0], 1)  # within one MLP neuron of the budget
    assert pruned.config.compression_provenance["macs"] == macs
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.compression_plan.to_dict() == pruned.compression_plan.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, pruned(pixel_values=pixels).logits)


def test_round_trip_with_irregular_widths_and_a_skipped_block(tmp_path, pixels):
    from transformers import AutoModelForImageClassification

    model = with_biases(tiny_deit())
    structure = PrunableModel.of(model)
    pruned = export_pruned(
        model, structure, irregular_state(), CompressionConfig(method="pruning", target_flops_ratio=0.5)
    )
    kinds = {name: layer.kind for name, layer in pruned.compression_plan.layers.items()}
    assert kinds == {
        "deit.layers.0.attention": "head_factorized",
        "deit.layers.0.mlp.fc1": "pruned_linear",
        "deit.layers.0.mlp.fc2": "pruned_linear",
        "deit.layers.1": "skipped_block",
    }
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, pruned(pixel_values=pixels).logits)


def test_projection_prefers_unimportant_groups():
    model = tiny_vit()
    structure = PrunableModel.of(model)
    scores = magnitude_scores(model, structure)
    scores.neurons[0][:48] = 0.0  # half of block 0's neurons are worthless: they go first
    budget = structure.dense_macs - 48 * structure.mlp_macs(structure.blocks[0], 1)
    state = project_to_budget(structure, scores, budget)
    assert state[0].neurons == list(range(48, 96))
    assert structure.macs(state) == budget


def test_taylor_uses_labels_when_given(pixels):
    model = tiny_vit()
    structure = PrunableModel.of(model)
    labels = torch.arange(len(pixels)) % 5
    with_labels = taylor_scores(model, structure, [{"pixel_values": pixels, "labels": labels}])
    pseudo = taylor_scores(model, structure, [pixels])
    assert not torch.allclose(with_labels.neurons[0], pseudo.neurons[0])
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_bad_input_is_refused(pixels):
    with pytest.raises(ValueError, match="budgeted in FLOPs: set target_flops_ratio"):
        CompressionConfig(method="pruning", target_param_ratio=0.5)
    with pytest.raises(ValueError, match="needs target_flops_ratio"):
        CompressionConfig(method="pruning")
    with pytest.raises(ValueError, match="belong to method='pruning'"):
        CompressionConfig(target_flops_ratio=0.5)
    model = tiny_vit()
    with pytest.raises(PruningError, match="out of reach.*skip_blocks=True"):
        compress(model, CompressionConfig(method="pruning", target_flops_ratio=0.05), pixels, progress=False)
    with pytest.raises(PruningError, match="in a single block"):
        compress(
            model,
            CompressionConfig(method="pruning", target_flops_ratio=0.01, skip_blocks=True),
            pixels,
            progress=False,
        )
    fused = tiny_vit()
    fused.vit.layers[1].attention.q_proj = torch.nn.Identity()  # e.g. a family with one fused qkv projection
    with pytest.raises(PruningError, match="vit.layers.1 .*not a dense attention"):
        compress(fused, CompressionConfig(method="pruning", target_flops_ratio=0.5), pixels, progress=False)
    factorized = compress(model, CompressionConfig(compensation_rank=0), pixels, progress=False)
    with pytest.raises(ValueError, match="dense model"):
        PruningTrainer(
            model=factorized,
            teacher=model,
            compression_config=CompressionConfig(method="pruning", target_flops_ratio=0.5),
            args=DistillationArguments(output_dir="unused", report_to=[], use_cpu=True),
        )
    with pytest.raises(ValueError, match="need a teacher"):
        PruningTrainer(
            model=tiny_vit(),
            compression_config=CompressionConfig(method="pruning", target_flops_ratio=0.5),
            args=DistillationArguments(output_dir="unused", report_to=[], use_cpu=True),
        )


# -- the trainer ----------------------------------------------------------------------------------
def dataset(pixels):
    labels = torch.arange(len(pixels)) % 5
    return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]


def run_trainer(
    tmp_path, pixels, max_steps=8, resume=None, skip_blocks=True, build=tiny_vit, train_dataset=None, **overrides
):
    """A short UVC run (warm-up, search, post-training) with fast rates, on ``build()`` distilled from another."""
    config = CompressionConfig(
        method="pruning",
        target_flops_ratio=0.5,
        skip_blocks=skip_blocks,
        pruning_warmup_ratio=0.25,
        pruning_search_ratio=0.5,
        pruning_count_lr=0.5,
        pruning_dual_lr=5.0,
        pruning_proximal_lr=0.2,
    )
    args = DistillationArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        **overrides,
    )
    trainer = PruningTrainer(
        model=build(),
        teacher=build(),
        compression_config=config,
        args=args,
        train_dataset=dataset(pixels) if train_dataset is None else train_dataset,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_pruning_trainer_searches_projects_and_exports(tmp_path, pixels):
    trainer = run_trainer(tmp_path, pixels, save_strategy="no")
    logs = [entry for entry in trainer.state.log_history if "compression/pruning/stage" in entry]
    stages = [entry["compression/pruning/stage"] for entry in logs]
    assert stages[0] == 0 and 1 in stages and stages[-1] == 2  # warm-up, search, post-training
    assert max(entry["compression/pruning/flops_multiplier"] for entry in logs) > 0  # the dual variable moved
    pruned = trainer.export()
    macs = count_macs(pruned, pixels[:1])
    budget = int(0.5 * trainer.structure.dense_macs)
    assert budget - trainer.structure.mlp_macs(trainer.structure.blocks[0], 1) < macs <= budget
    model = trainer.model.eval()
    with torch.no_grad():  # the masked model the trainer evaluated is the exported one
        torch.testing.assert_close(pruned.eval()(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    provenance = pruned.config.compression_provenance
    assert provenance["pruning"]["algorithm"] == "uvc" and provenance["finetuning"]["steps"] == 8


def test_export_before_training_does_not_freeze_the_structure(tmp_path, pixels):
    config = CompressionConfig(method="pruning", target_flops_ratio=0.5)
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=4, report_to=[], use_cpu=True, save_strategy="no")
    trainer = PruningTrainer(
        model=tiny_vit(), teacher=tiny_vit(), compression_config=config, args=args, train_dataset=dataset(pixels)
    )
    early = trainer.export()  # one-shot magnitude projection of the untrained model
    assert count_macs(early, pixels[:1]) <= int(0.5 * trainer.structure.dense_macs)
    assert trainer.controller.final_state is None and trainer.controller.stage == "warmup"
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        PruningTrainer(
            model=tiny_vit(),
            teacher=tiny_vit(),
            compression_config=config,
            args=DistillationArguments(
                output_dir=str(tmp_path),
                report_to=[],
                use_cpu=True,
                eval_strategy="steps",
                save_strategy="steps",
                load_best_model_at_end=True,
            ),
        )


def test_resume_keeps_multipliers_counts_and_the_final_structure(tmp_path, pixels):
    full = run_trainer(tmp_path, pixels, save_strategy="steps", save_steps=4, skip_blocks=False)
    saved = json.loads((tmp_path / "run" / "checkpoint-4" / "pruning_state.json").read_text())
    assert saved["stage"] == "search" and saved["flops_multiplier"] > 0
    resumed = run_trainer(
        tmp_path,
        pixels,
        save_strategy="steps",
        save_steps=4,
        skip_blocks=False,
        resume=str(tmp_path / "run" / "checkpoint-4"),
    )
    assert resumed.controller.flops_multiplier == pytest.approx(full.controller.flops_multiplier, rel=1e-4)
    torch.testing.assert_close(resumed.controller.fractions, full.controller.fractions, rtol=1e-4, atol=1e-5)
    assert resumed.controller.final_state == full.controller.final_state


def test_model_card_of_a_pruned_model(pixels):
    from hf_vitcompress import build_model_card

    model = tiny_vit()
    structure = PrunableModel.of(model)
    config = CompressionConfig(method="pruning", target_flops_ratio=0.5, skip_blocks=True)
    pruned = export_pruned(model, structure, irregular_state(), config)
    card = str(build_model_card(pruned))
    assert "structured pruning under a FLOPs budget" in card
    assert "`vit.layers.1` | skipped |" in card
    dense_block = sum(p.numel() for p in model.vit.layers[1].parameters())
    assert f"{dense_block:,} → 0" in card
    assert "`vit.layers.0.mlp.fc1` | 48→40 (pruned) |" in card
