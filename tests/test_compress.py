import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, Trainer, TrainingArguments

import hf_vitcompress
from hf_vitcompress import (
    CalibrationDataError,
    CompressionConfig,
    LowRankLinear,
    NonFiniteActivationError,
    PlanMismatchError,
    compress,
)

from .conftest import tiny_deit, tiny_vit, tiny_vit_model

CONFIG = CompressionConfig(target_param_ratio=0.6)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    current = model.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "factory, auto",
    [
        (tiny_vit, AutoModelForImageClassification),
        (tiny_deit, AutoModelForImageClassification),
        (tiny_vit_model, AutoModel),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, pixels, factory, auto):
    small = compress(factory(), CONFIG, pixels, progress=False)
    small.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"].startswith("vitcompress_")
    assert saved["compression_plan"]["layers"] and saved["compression_config"]["target_param_ratio"] == 0.6
    assert saved["auto_map"]["AutoConfig"].startswith("vitcompress_loader.")
    again = auto.from_pretrained(tmp_path).eval()
    assert type(again) is type(small)
    out_small, out_again = small(pixel_values=pixels), again(pixel_values=pixels)
    key = "logits" if hasattr(out_small, "logits") else "last_hidden_state"
    assert torch.equal(out_small[key], out_again[key])


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_loading_without_plugin_fails_loudly(tmp_path, pixels, family):
    from transformers import Dinov2Model

    from .conftest import tiny_dinov2

    dense, auto = (
        (tiny_vit(), "AutoModelForImageClassification") if family == "vit" else (tiny_dinov2(Dinov2Model), "AutoModel")
    )
    compress(dense, CONFIG, pixels, progress=False).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import {auto}
        for kwargs in ({{}}, {{"trust_remote_code": True}}):
            try:
                {auto}.from_pretrained({str(tmp_path)!r}, **kwargs)
            except Exception as error:
                print("FAILED", type(error).__name__, str(error).replace(chr(10), " "))
            else:
                print("LOADED")
        assert "hf_vitcompress" not in sys.modules
        """
    )
    # The same interpreter as if the plugin were not installed: importing it fails like a missing package.
    hide_plugin = textwrap.dedent(
        """
        import importlib.abc, sys
        class HidePlugin(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "hf_vitcompress":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, HidePlugin())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_plugin + script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    outcomes = re.findall(r"(?:FAILED|LOADED)[^\n]*", result.stdout)  # transformers' prompt may share the line
    assert len(outcomes) == 2 and "LOADED" not in result.stdout, result.stdout + result.stderr
    assert "trust_remote_code" in outcomes[0]  # plain load: refuses custom model_type
    assert "ImportError" in outcomes[1] and "hf_vitcompress" in outcomes[1]  # shim names the missing plugin


def test_input_model_is_never_modified(pixels):
    model = tiny_vit()
    before = _state(model)
    compress(
        model,
        CompressionConfig(target_param_ratio=0.5, sequential=True, compensation_rank=2, compensation_epochs=1),
        pixels,
        progress=False,
    )
    assert type(model).__name__ == "ViTForImageClassification" and model.config.model_type == "vit"
    assert _same_state(model, before)
    with pytest.raises(CalibrationDataError):
        compress(model, CONFIG, torch.randn(4, 2, 16, 16), progress=False)
    assert _same_state(model, before) and not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_replaced_classifier_and_final_norm_are_kept(pixels):
    model = tiny_vit()
    model.classifier = nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 5))
    model.vit.layernorm = nn.Identity()
    small = compress(model, CONFIG, pixels, progress=False)
    assert isinstance(small.classifier, nn.Sequential) and isinstance(small.vit.layernorm, nn.Identity)
    assert all(name.startswith("vit.layers.") for name in small.compression_plan.layers)
    assert small(pixel_values=pixels).logits.shape == (48, 5)


def test_target_modules_roles_and_named_modules(pixels):
    small = compress(
        tiny_vit(), CompressionConfig(target_param_ratio=0.7, target_modules=["fc1", "fc2"]), pixels, progress=False
    )
    assert small.compression_plan.layers and all(
        name.rsplit(".", 1)[-1] in ("fc1", "fc2") for name in small.compression_plan.layers
    )
    with pytest.raises(ValueError, match="'nonexistent' matches no nn.Linear"):
        compress(tiny_vit(), CompressionConfig(target_modules=["nonexistent"]), pixels, progress=False)


def test_plain_svd_needs_no_calibration_data():
    small = compress(
        tiny_vit(),
        CompressionConfig(target_param_ratio=0.5, whitening="none", rank_allocation="global", loss_weighting="none"),
        None,
        progress=False,
    )
    assert small.compression_plan.param_ratio <= 0.5


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "No calibration data"),
        ([], "empty"),
        (torch.randn(0, 3, 16, 16), "empty"),
        (torch.randn(4, 1, 16, 16), r"shape \(batch, 3, height, width\)"),
        (torch.randn(4, 3, 18, 18), "not a multiple of the model's patch size"),
        ([{"image": torch.randn(2, 3, 16, 16)}], "pixel_values"),
        (torch.full((2, 3, 16, 16), float("nan")), "NaN"),
    ],
)
def test_bad_calibration_data(data, message):
    with pytest.raises(CalibrationDataError, match=message):
        compress(tiny_vit(), CONFIG, data, progress=False)


def test_non_finite_activations_are_reported(pixels):
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[1].layernorm_after.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteActivationError, match="vit.layers.1.mlp.fc1"):
        compress(model, CONFIG, pixels, progress=False)


def test_model_without_supported_layers(pixels):
    with pytest.raises(ValueError, match="no encoder blocks"):
        compress(tiny_vit(num_hidden_layers=0), CONFIG, pixels, progress=False)
    with pytest.raises(TypeError, match="no adapter for Linear"):
        compress(nn.Linear(3, 3), CONFIG, pixels, progress=False)


def test_already_compressed_model_is_refused(pixels):
    small = compress(tiny_vit(), CONFIG, pixels, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress(small, CONFIG, pixels, progress=False)


def test_checkpoint_whose_plan_does_not_match_weights(tmp_path, pixels):
    compress(tiny_vit(), CONFIG, pixels, progress=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    name, layer = next(iter(config["compression_plan"]["layers"].items()))
    layer["rank"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanMismatchError, match="does not match its compression plan"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    config["compression_plan"]["layers"]["vit.layers.9.mlp.fc1"] = dict(layer, rank=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanMismatchError, match="vit.layers.9.mlp.fc1"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_trainer_trains_a_compressed_model(tmp_path, pixels):
    small = compress(tiny_vit(), CONFIG, pixels, progress=False).train()
    labels = torch.arange(len(pixels)) % 5
    dataset = [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]
    before = small.vit.layers[0].attention.q_proj.lowrank_down.weight.clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
    )
    Trainer(model=small, args=args, train_dataset=dataset).train()
    assert not torch.equal(before, small.vit.layers[0].attention.q_proj.lowrank_down.weight)


def test_public_api_is_exported():
    for name in hf_vitcompress.__all__:
        assert hasattr(hf_vitcompress, name)


def test_model_in_training_mode_is_calibrated_without_dropout(pixels):
    config = CompressionConfig(target_param_ratio=0.5, sequential=True, compensation_rank=2, compensation_epochs=1)
    in_training = tiny_vit(hidden_dropout_prob=0.5).train()
    small = compress(in_training, config, pixels, progress=False)
    assert in_training.training and small.training  # modes restored / inherited
    reference = compress(tiny_vit(hidden_dropout_prob=0.5).eval(), config, pixels, progress=False)
    assert _same_state(small, _state(reference))


def _layers_of_different_spectra():
    """tiny_vit whose block 0 has rank-2 ``v_proj`` and ``fc1`` weights (so ``o_proj`` also reads a rank-2 input),
    block 1 full-rank ones: a good allocation gives block 0 far fewer ranks than block 1."""
    model = tiny_vit()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for index, rank in ((0, 2), (1, 40)):
            for name in ("attention.v_proj", "mlp.fc1"):
                linear = model.vit.layers[index].get_submodule(name)
                out_features, in_features = linear.weight.shape
                left = torch.randn(out_features, rank, generator=generator)
                right = torch.randn(rank, in_features, generator=generator)
                linear.weight.copy_(left @ right / (rank * in_features) ** 0.5)
    return model


def _summed_relative_output_error(dense, small, pixels):
    """Σ over every block linear of ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the dense model's own inputs X (what global
    allocation with error_normalization='relative' minimizes), computed here from the weights alone."""
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    inputs = {}
    hooks = [
        dense.get_submodule(n).register_forward_hook(
            lambda _m, args, _o, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        dense(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    total = 0.0
    with torch.no_grad():
        for name in names:
            module = small.get_submodule(name)
            weight = dense.get_submodule(name).weight.double()
            approximation = (module.dense_weight() if isinstance(module, LowRankLinear) else module.weight).double()
            x = inputs[name]
            total += float((x @ (weight - approximation).T).square().sum() / (x @ weight.T).square().sum())
    return total


def test_global_allocation_through_compress_gives_mixed_ranks_and_lower_error(pixels):
    config = dict(target_param_ratio=0.5, whitening="gram", loss_weighting="none", shared_qkv=False)
    dense = _layers_of_different_spectra()
    global_ = compress(dense, CompressionConfig(**config, rank_allocation="global"), pixels, progress=False)
    uniform = compress(dense, CompressionConfig(**config, rank_allocation="uniform"), pixels, progress=False)
    assert global_.compression_plan.parameters == pytest.approx(uniform.compression_plan.parameters, abs=2 * 48 + 1)

    def rank(model, name):
        layer = model.compression_plan.layers.get(f"vit.layers.{name}")
        return None if layer is None else layer.rank  # None: kept dense

    # uniform: every linear at the same rank (to one step); global: the rank-2 layers get rank 2, block 1 far more
    assert (
        max(layer.rank for layer in uniform.compression_plan.layers.values())
        - min(layer.rank for layer in uniform.compression_plan.layers.values())
        <= 2
    )
    for name in ("0.attention.v_proj", "0.attention.o_proj", "0.mlp.fc1"):
        assert rank(global_, name) == 2
    for name in ("1.attention.v_proj", "1.mlp.fc1"):
        assert rank(global_, name) is None or rank(global_, name) >= 3 * rank(uniform, name) // 4
    assert global_.compression_plan.layers != uniform.compression_plan.layers
    # ... and spends the same budget for much less error: measured 0.42 (global) against 1.21 (uniform)
    global_error = _summed_relative_output_error(dense, global_, pixels)
    uniform_error = _summed_relative_output_error(dense, uniform, pixels)
    assert global_error < 0.5 * uniform_error
