"""What compress() accepts as its inputs beyond the plain case.

* calibration images at another resolution than ``config.image_size`` (users calibrate at the size they
  serve, with ``interpolate_pos_encoding=True``), for every method, the pruning FLOPs budget included;
* models whose weights are not in memory (meta device, Accelerate offloading): refused up front, the
  model untouched;
* the rank search's re-factorization of the attentions: recorded in the provenance.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from accelerate import cpu_offload, dispatch_model, init_empty_weights
from transformers import ViTConfig, ViTForImageClassification

from hf_vitcompress import CalibrationDataError, CompressionConfig, compress, count_parameters, search_ranks
from hf_vitcompress.calibration.gram import collect_linear_statistics
from hf_vitcompress.cli import build_parser
from hf_vitcompress.methods.head_factorization.factorization import build_head_factorized, factorize_attention
from hf_vitcompress.methods.pruning.structure import PrunableModel

from .conftest import TINY, tiny_deit, tiny_vit

FAST = dict(calibration_samples=16)
METHODS = {
    "activation_aware": CompressionConfig(target_param_ratio=0.7, compensation_rank=8, compensation_epochs=1, **FAST),
    "sequential": CompressionConfig(target_param_ratio=0.7, sequential=True, compensation_rank=0, **FAST),
    "head_factorization": CompressionConfig(method="head_factorization", target_param_ratio=0.7, **FAST),
    "pruning_magnitude": CompressionConfig(method="pruning", target_flops_ratio=0.7),
    "pruning_taylor": CompressionConfig(method="pruning", target_flops_ratio=0.7, pruning_importance="taylor", **FAST),
}
FULL = {  # budgets that keep everything: the result must be the dense model
    "activation_aware": CompressionConfig(target_param_ratio=1.0, **FAST),
    "head_factorization": CompressionConfig(method="head_factorization", target_param_ratio=1.0, **FAST),
    "pruning_magnitude": CompressionConfig(method="pruning", target_flops_ratio=1.0),
    "pruning_taylor": CompressionConfig(method="pruning", target_flops_ratio=1.0, pruning_importance="taylor", **FAST),
}


def _images(size: int, count: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(2))


def _native_at(model, size: int):
    """The same model built for ``size``: its position embeddings are the interpolated ones, precomputed."""
    config = copy.deepcopy(model.config)
    config.image_size = size
    native = type(model)(config).eval()
    state = model.state_dict()
    embeddings = model.base_model.embeddings
    special = embeddings.position_embeddings.shape[1] - embeddings.patch_embeddings.num_patches
    tokens = (size // config.patch_size) ** 2 + special
    key = next(k for k in state if k.endswith("position_embeddings"))
    with torch.no_grad():
        state[key] = embeddings.interpolate_pos_encoding(torch.zeros(1, tokens, config.hidden_size), size, size)
    native.load_state_dict(state)
    return native


def _logits(model, pixels, **kwargs):
    with torch.no_grad():
        return model(pixel_values=pixels, **kwargs).logits


# -- calibration at the resolution the model serves ------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_calibrating_at_another_resolution_is_calibrating_the_model_built_for_it(name):
    """A 16-px ViT calibrated on 24-px images gives what the same ViT built for 24 px gives: same plan,
    same function at 24 px, and (pruning) the FLOPs budget counted at 24 px."""
    model, pixels = tiny_vit(), _images(24)
    native = _native_at(model, 24)
    assert torch.equal(_logits(model, pixels, interpolate_pos_encoding=True), _logits(native, pixels))
    config = METHODS[name]
    small = compress(model, config, pixels, progress=False)
    if config.method != "pruning":  # the same parameter budget: the native model has more position embeddings
        target = math.floor(config.target_param_ratio * count_parameters(model)) - count_parameters(model)
        target += count_parameters(native)
        config = dataclasses.replace(config, target_param_ratio=(target + 0.5) / count_parameters(native))
    reference = compress(native, config, pixels, progress=False)
    assert small.compression_plan.layers == reference.compression_plan.layers
    assert small.compression_plan.layers  # something was compressed
    torch.testing.assert_close(
        _logits(small, pixels, interpolate_pos_encoding=True), _logits(reference, pixels), rtol=1e-4, atol=1e-5
    )
    provenance = small.config.compression_provenance
    if name.startswith("pruning"):
        assert provenance["macs_image_size"] == [24, 24]
        assert provenance["dense_macs"] == PrunableModel.of(native).dense_macs != PrunableModel.of(model).dense_macs
        assert provenance["macs"] == reference.config.compression_provenance["macs"]
        assert provenance["macs"] <= 0.7 * provenance["dense_macs"]
    if name != "pruning_magnitude":
        assert provenance["calibration_image_sizes"] == [[24, 24]]
        assert provenance["calibration_images"] == 16


@pytest.mark.parametrize("name", list(FULL))
@pytest.mark.parametrize("factory", [tiny_vit, tiny_deit])
def test_full_budget_at_another_resolution_keeps_the_dense_function(name, factory):
    model, pixels = factory(), _images(24)
    small = compress(model, FULL[name], pixels, progress=False)
    torch.testing.assert_close(
        _logits(small, pixels, interpolate_pos_encoding=True),
        _logits(model, pixels, interpolate_pos_encoding=True),
        rtol=1e-4,
        atol=1e-5,
    )


def test_mixed_resolutions_are_recorded_and_refused_for_a_flops_budget():
    batches = [{"pixel_values": _images(24, 8)}, {"pixel_values": _images(16, 8)}]
    small = compress(tiny_vit(), METHODS["head_factorization"], batches, progress=False)
    assert small.config.compression_provenance["calibration_image_sizes"] == [[24, 24], [16, 16]]
    with pytest.raises(CalibrationDataError, match="one resolution"):
        compress(tiny_vit(), METHODS["pruning_taylor"], batches, progress=False)


@pytest.mark.parametrize(
    "data, message",
    [
        (_images(18), r"\(18, 18\).*not a multiple of the model's patch size \(4, 4\)"),
        (torch.randn(4, 3, 24, 18), r"\(24, 18\).*not a multiple"),
        (torch.randn(4, 3, 2, 2), "not a multiple"),  # smaller than one patch
        (_images(24, channels=1), r"shape \(batch, 3, height, width\)"),
        (torch.randn(0, 3, 24, 24), "empty"),
        ([], "empty"),
    ],
)
@pytest.mark.parametrize("name", ["activation_aware", "pruning_magnitude"])
def test_misshaped_calibration_data_is_still_refused(data, message, name):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationDataError, match=message):
        compress(model, METHODS[name], data, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- weights that are not in memory ----------------------------------------------------------------------
def test_a_model_on_the_meta_device_is_refused_up_front(pixels):
    with init_empty_weights():
        empty = ViTForImageClassification(ViTConfig(**TINY, num_labels=5))
    for config in (CompressionConfig(), METHODS["pruning_magnitude"], METHODS["head_factorization"]):
        with pytest.raises(ValueError, match=r"meta device.*init_empty_weights.*from_pretrained"):
            compress(empty, config, pixels, progress=False)
    assert all(p.is_meta for p in empty.parameters())


def _offloaded_cpu(tmp_path):
    model = tiny_vit()
    cpu_offload(model, execution_device="cpu")
    return model


def _offloaded_disk(tmp_path):
    return dispatch_model(tiny_vit(), device_map={"vit": "cpu", "classifier": "disk"}, offload_dir=str(tmp_path))


@pytest.mark.parametrize("offload", [_offloaded_cpu, _offloaded_disk])
def test_an_accelerate_offloaded_model_is_refused_up_front_and_untouched(tmp_path, pixels, offload):
    model = offload(tmp_path)
    expected = _logits(tiny_vit(), pixels)
    for config in (CompressionConfig(), METHODS["pruning_taylor"]):
        with pytest.raises(ValueError, match=r"offloaded by Accelerate.*without offloading"):
            compress(model, config, pixels, progress=False)
    assert any(hasattr(module, "_hf_hook") for module in model.modules())  # still the user's offloaded model
    torch.testing.assert_close(_logits(model, pixels), expected)  # and it still runs as before


# -- the rank search's own statistics ------------------------------------------------------------------------
def test_rank_search_records_which_statistics_it_refactorized_on(pixels):
    dense = tiny_vit()
    small = compress(
        dense, CompressionConfig(method="head_factorization", target_param_ratio=0.6), pixels, progress=False
    )
    labels = torch.arange(len(pixels)) % 5
    data = [{"pixel_values": pixels[i : i + 8], "labels": labels[i : i + 8]} for i in range(0, 48, 8)]
    searched = search_ranks(small, dense, data, steps=2, calibration_batches=2, progress=False)
    record = searched.config.compression_provenance["rank_search"]["attention_statistics"]
    assert record["source"] == "search_data" and record["images"] == 16
    assert "re-factorized" in record["note"]

    # With the compression's calibration images, the attentions are factorized on its very statistics.
    again = search_ranks(small, dense, data, steps=2, calibration_data=pixels, progress=False)
    record = again.config.compression_provenance["rank_search"]["attention_statistics"]
    assert record["source"] == "calibration_data" and record["images"] == len(pixels)
    name = "vit.layers.0.attention"
    statistics = collect_linear_statistics(dense, [f"{name}.q_proj"], [pixels])[f"{name}.q_proj"]
    layer = again.compression_plan.layers[name]
    expected = build_head_factorized(
        dense.get_submodule(name),
        factorize_attention(dense.get_submodule(name), statistics),
        layer.qk_ranks,
        layer.vo_ranks,
    )
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(again.get_submodule(name).state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_search_ranks_cli_help_says_it_refactorizes(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search-ranks", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "re-factorized" in help_text and "--calibration" in help_text


def test_the_card_counts_macs_at_the_resolution_the_budget_was_counted_at():
    """Pruned on 24-px images, the budget is 24-px MACs: the card must state those, not 16-px ones."""
    from hf_vitcompress.calibration.data import interpolated_positions
    from hf_vitcompress.evaluation import count_macs
    from hf_vitcompress.hub import build_model_card

    pruned = compress(tiny_vit(), METHODS["pruning_magnitude"], _images(24), progress=False)
    assert pruned.config.compression_provenance["macs_image_size"] == [24, 24]
    with interpolated_positions(pruned):
        at_24 = count_macs(pruned, _images(24, count=1))
    at_16 = count_macs(pruned, _images(16, count=1))
    assert at_24 != at_16
    card = str(build_model_card(pruned))
    assert f"Exactly {at_24:,} of the dense model's" in card
    assert "per 24x24 image" in card
    assert f"{at_16:,}" not in card
