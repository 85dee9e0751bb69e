"""``tune()``: per-layer choice of dense / factorized / fused, recorded in the plan and reloaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification

import hf_vitcompress.tuning as tuning
from hf_vitcompress import CompressionConfig, LowRankLinear, TuningError, compress, tune
from hf_vitcompress.kernels.lowrank import fused_lowrank_linear

from .conftest import tiny_vit

CONFIG = CompressionConfig(target_param_ratio=0.6, whitening="none", rank_allocation="global", loss_weighting="none")


@pytest.fixture
def compressed():
    return compress(tiny_vit(), CONFIG, progress=False)


def _logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_tune_keeps_the_faster_form_and_records_timings(compressed, pixels):
    before = _logits(compressed, pixels)
    factorized = [n for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)]
    timings = tune(compressed, pixels[:8], repeats=3, warmup=1)
    layers = [n for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)]
    plan = compressed.compression_plan
    assert [t.name for t in timings] == factorized and {t.choice for t in timings} <= {"dense", "factorized"}
    for timing in timings:
        assert set(timing.milliseconds) == {"dense", "factorized"}  # no kernel timing on a CPU
        assert timing.choice == min(timing.milliseconds, key=timing.milliseconds.get)
        assert (timing.name in layers) == (timing.choice == "factorized") == (timing.name in plan.layers)
    assert plan.tuning["device"] == "cpu" and plan.tuning["example_inputs_shape"] == [8, 3, 16, 16]
    assert plan.parameters == sum(p.numel() for p in compressed.parameters())
    torch.testing.assert_close(_logits(compressed, pixels), before, rtol=1e-4, atol=1e-5)


def test_merged_layers_reload_dense(compressed, pixels, tmp_path):
    tune(compressed, pixels[:4], choices=("dense",), repeats=1, warmup=0)
    assert not compressed.compression_plan.layers and not any(
        isinstance(m, LowRankLinear) for m in compressed.modules()
    )
    compressed.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded.vit.layers[0].mlp.fc1, nn.Linear)
    torch.testing.assert_close(_logits(loaded, pixels), _logits(compressed, pixels))
    assert loaded.compression_plan.tuning["merged_to_dense"]


def test_fused_choice_runs_the_kernel_and_survives_a_reload(compressed, pixels, tmp_path, monkeypatch):
    # The kernel is never *timed* on a CPU; here the interpreter stands in for a GPU to check the wiring.
    monkeypatch.setattr(tuning, "candidates_for", lambda device, dtype: tuning.CHOICES)
    reference = _logits(compressed, pixels[:4])
    tune(compressed, pixels[:4], choices=("fused",), repeats=1, warmup=0)
    fused = [m for m in compressed.modules() if isinstance(m, LowRankLinear)]
    assert fused and all(m.implementation == "fused" for m in fused)
    calls = []
    monkeypatch.setattr(
        "hf_vitcompress.kernels.lowrank.fused_lowrank_linear", lambda *a: calls.append(1) or _KERNEL(*a)
    )
    torch.testing.assert_close(_logits(compressed, pixels[:4]), reference, rtol=1e-4, atol=1e-5)
    assert len(calls) == len(fused)
    compressed.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert all(m.implementation == "fused" for m in loaded.modules() if isinstance(m, LowRankLinear))
    with torch.enable_grad():  # training falls back to the two GEMMs, with gradients
        loaded(pixel_values=pixels[:2]).logits.sum().backward()
    assert loaded.vit.layers[0].mlp.fc1.lowrank_down.weight.grad is not None


_KERNEL = fused_lowrank_linear  # the kernel itself, taken before a test wraps it to count its calls


def _fused_layer() -> LowRankLinear:
    torch.manual_seed(0)
    layer = LowRankLinear(32, 24, 5)
    layer.implementation = "fused"
    return layer


def test_fused_layer_falls_back_wherever_the_kernel_would_differ(monkeypatch):
    x = torch.randn(3, 7, 32)
    layer = _fused_layer()
    kernel_calls = []
    monkeypatch.setattr(
        "hf_vitcompress.kernels.lowrank.fused_lowrank_linear", lambda *a: kernel_calls.append(1) or _KERNEL(*a)
    )
    expected = layer.lowrank_up(layer.lowrank_down(x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)  # the kernel (interpreter) serves a plain call
    assert len(kernel_calls) == 1
    # autocast: the input arrives in bf16 while the weights stay fp32; two GEMMs, in autocast's dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    # an input dtype other than the weights': the factors' own modules decide (here: they refuse)
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(x.double())
    # hooks, and Accelerate's hooks (which replace forward), still see their calls
    seen = []
    handle = layer.lowrank_down.register_forward_hook(lambda *a: seen.append("hook"))
    with torch.no_grad():
        layer(x)
    handle.remove()
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Record(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append("accelerate")
            return args, kwargs

    add_hook_to_module(layer.lowrank_up, Record())
    with torch.no_grad():
        layer(x)
    remove_hook_from_module(layer.lowrank_up)
    assert seen == ["hook", "accelerate"] and len(kernel_calls) == 1
    with torch.no_grad():
        layer(x)
    assert len(kernel_calls) == 2  # hooks gone: the kernel again


def test_plans_are_written_as_version_1_unless_they_need_2(compressed, pixels):
    from hf_vitcompress import CompressionPlan

    plan = compressed.compression_plan.to_dict()
    assert plan["version"] == 1 and "tuning" not in plan
    assert CompressionPlan.from_dict(plan).to_dict() == plan  # a version-1 plan reads back as it was
    tune(compressed, pixels[:4], choices=("factorized",), repeats=1, warmup=0)
    assert compressed.config.compression_plan["version"] == 2


def test_tune_refuses_what_it_cannot_time(compressed, pixels):
    with pytest.raises(TuningError, match="Compress it first"):
        tune(tiny_vit(), pixels[:2])
    with pytest.raises(TuningError, match="fused kernel is timed only on a CUDA GPU"):
        tune(compressed, pixels[:2], choices=("fused",))
    with pytest.raises(TuningError, match="model's device"):
        tune(compressed, [pixels[:2]])


def test_the_model_card_says_how_layers_run(compressed, pixels):
    from hf_vitcompress import build_model_card

    tune(compressed, pixels[:4], repeats=1, warmup=0)
    choices = [layer["choice"] for layer in compressed.compression_plan.tuning["layers"].values()]
    card = str(build_model_card(compressed))
    assert "timed on cpu (float32, input 4×3×16×16) as dense and as two factor matmuls, and run the fastest way" in card
    assert f"{choices.count('factorized')} as two matmuls, 0 fused, {choices.count('dense')} merged" in card
    assert "Triton" not in card


def test_the_model_card_names_only_what_was_timed(compressed, pixels):
    from hf_vitcompress import build_model_card

    tune(compressed, pixels[:4], choices=("dense",), repeats=1, warmup=0)
    merged = len(compressed.compression_plan.tuning["merged_to_dense"])
    card = str(build_model_card(compressed))
    assert f"{merged} factorized layers were then set, without a comparison, on cpu" in card
    assert f"0 as two matmuls, 0 fused, {merged} merged back to dense" in card
    assert "the parameter count above includes them" in card and "fastest" not in card


def test_a_layer_that_would_fall_back_is_not_timed_as_fused(compressed, pixels, monkeypatch):
    from hf_vitcompress import build_model_card

    monkeypatch.setattr(tuning, "candidates_for", lambda device, dtype: tuning.CHOICES)
    hooked = compressed.vit.layers[0].mlp.fc1
    hooked.lowrank_down.register_forward_hook(lambda *args: None)  # e.g. a MAC counter: the kernel would skip it
    with pytest.warns(UserWarning, match="none of .* can run vit.layers.0.mlp.fc1"):
        timings = tune(compressed, pixels[:4], choices=("fused",), repeats=1, warmup=0)
    by_name = {timing.name: timing for timing in timings}
    assert by_name["vit.layers.0.mlp.fc1"].milliseconds == {"fused": float("inf")}
    assert by_name["vit.layers.0.mlp.fc1"].choice == "factorized" and hooked.implementation == "factorized"
    others = [timing for name, timing in by_name.items() if name != "vit.layers.0.mlp.fc1"]
    assert others and all(timing.choice == "fused" for timing in others)
    card = str(build_model_card(compressed))
    assert f"1 as two matmuls, {len(others)} fused, 0 merged" in card
    assert "run the kernel for inference on a CUDA GPU with Triton installed" in card


def test_every_fused_candidate_that_cannot_run_is_recorded_as_infinite(compressed, pixels, monkeypatch):
    monkeypatch.setattr(tuning, "candidates_for", lambda device, dtype: tuning.CHOICES)
    monkeypatch.setattr("hf_vitcompress.layers._fused_can_run", lambda x, *ranks: False)  # e.g. rank > 256
    timings = tune(compressed, pixels[:4], choices=("factorized", "fused"), repeats=1, warmup=0)
    assert all(t.milliseconds["fused"] == float("inf") and t.choice == "factorized" for t in timings)
