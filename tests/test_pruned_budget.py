"""A pruned checkpoint meets its FLOPs budget under every attention implementation it may be loaded with.

Pruned attentions keep full-width query/key heads and narrower value heads. Fused kernels (SDPA, the
transformers default) zero-pad the value heads to the query/key width and multiply the zeros; eager
attention does not. A model pruned under eager attention and counted for it used to run over its budget
once reloaded under SDPA (issue 14, defect 3). Each case here prunes a model *loaded* with one
implementation, saves it, reloads it through the Auto class with each implementation and counts it.
"""

import pytest
from transformers import AutoModelForImageClassification

from hf_vitcompress import CompressionConfig, DistillationArguments, PruningTrainer, build_model_card, compress
from hf_vitcompress.attention import HeadFactorizedAttention
from hf_vitcompress.evaluation import count_macs

from .conftest import tiny_vit

IMPLEMENTATIONS = ("eager", "sdpa")
RATIO = 0.6  # every eager-pruned case here ran over budget under SDPA before the fix (e.g. 438,576 > 431,568)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    tiny_vit().save_pretrained(folder)
    return folder


def load(folder, implementation):
    model = AutoModelForImageClassification.from_pretrained(folder, attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    return model


def prune_one_shot(dense_dir, implementation, skip_blocks, pixels, _tmp_path):
    config = CompressionConfig(method="pruning", target_flops_ratio=RATIO, skip_blocks=skip_blocks)
    return compress(load(dense_dir, implementation), config, pixels[:16], progress=False)


def prune_with_trainer(dense_dir, implementation, skip_blocks, pixels, tmp_path):
    config = CompressionConfig(
        method="pruning",
        target_flops_ratio=RATIO,
        skip_blocks=skip_blocks,
        pruning_warmup_ratio=0.25,
        pruning_search_ratio=0.5,
        pruning_count_lr=0.5,
        pruning_dual_lr=5.0,
        pruning_proximal_lr=0.2,
    )
    args = DistillationArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    data = [{"pixel_values": p, "labels": i % 5} for i, p in enumerate(pixels[:16])]
    trainer = PruningTrainer(
        model=load(dense_dir, implementation),
        teacher=load(dense_dir, implementation),
        compression_config=config,
        args=args,
        train_dataset=data,
    )
    trainer.train()
    return trainer.export()


@pytest.mark.parametrize("skip_blocks", [False, True])
@pytest.mark.parametrize("pruned_under", IMPLEMENTATIONS)
@pytest.mark.parametrize("route", [prune_one_shot, prune_with_trainer], ids=["one_shot", "trainer"])
def test_pruned_model_meets_its_budget_under_every_implementation(
    tmp_path, dense_dir, pixels, route, pruned_under, skip_blocks
):
    example = pixels[:1]
    dense_macs = count_macs(tiny_vit(), example)
    budget = int(RATIO * dense_macs)
    pruned = route(dense_dir, pruned_under, skip_blocks, pixels, tmp_path)
    attentions = [m for m in pruned.modules() if isinstance(m, HeadFactorizedAttention)]
    # Narrowed value heads (value width below the query/key width): the case where the implementations differ.
    assert any(m.vo_width < m.qk_width for m in attentions)
    card_before_saving = str(build_model_card(pruned))  # what push_to_hub would publish
    pruned.save_pretrained(tmp_path / "pruned")

    counts, cards = {}, {"before saving": card_before_saving}
    for implementation in IMPLEMENTATIONS:
        loaded = load(tmp_path / "pruned", implementation)
        counts[implementation] = macs = count_macs(loaded, example)
        assert macs <= budget, f"pruned under {pruned_under}, loaded under {implementation}: {macs:,} > {budget:,}"
        cards[implementation] = card = str(build_model_card(loaded))
        assert f"| {macs / dense_macs:.3f} |" in card  # the table's ratio: the model as loaded
    assert counts["eager"] < counts["sdpa"]  # eager really skips the padded value columns
    # Every card (the one push_to_hub would publish, and each reloaded model's) states both real figures.
    for name, card in cards.items():
        assert f"Exactly {counts['sdpa']:,} of the dense model's {dense_macs:,} multiply-accumulates" in card, name
        assert f'and {counts["eager"]:,} with `attn_implementation="eager"`' in card, name
    provenance = pruned.config.compression_provenance
    assert (provenance["macs"], provenance["macs_eager"]) == (counts["sdpa"], counts["eager"])
    assert budget - counts["sdpa"] < 2 * 17 * 48  # the budget is used up to one MLP neuron


def test_count_macs_under_another_implementation_matches_a_reload(tmp_path, pixels):
    """``count_macs(..., attn_implementation=...)`` (what the card uses) agrees with a model really set to it."""
    pruned = compress(
        tiny_vit(), CompressionConfig(method="pruning", target_flops_ratio=RATIO), pixels[:16], progress=False
    )
    pruned.save_pretrained(tmp_path)
    for implementation in IMPLEMENTATIONS:
        real = count_macs(load(tmp_path, implementation), pixels[:1])
        assert count_macs(pruned, pixels[:1], attn_implementation=implementation) == real
