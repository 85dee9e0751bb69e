"""Compressed models load, initialize, record outputs and introspect like the transformers classes they extend.

Strictness is kept only where it protects something: the weights of planned modules. Everything else
(a new label set, a head missing from a backbone checkpoint, a classifier loaded as a backbone) behaves as
transformers behaves for the dense classes.
"""

import inspect
import json

import pytest
import safetensors.torch
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.utils import output_capturing

from hf_vitcompress import (
    CompressedDeiTForImageClassification,
    CompressedDeiTForImageClassificationWithTeacher,
    CompressedDeiTModel,
    CompressedViTForImageClassification,
    CompressedViTModel,
    CompressionConfig,
    LowRankLinear,
    PlanMismatchError,
    SkippedBlock,
    compress,
    count_parameters,
)
from hf_vitcompress.attention import HeadFactorizedAttention
from hf_vitcompress.families import family_for

from .conftest import TINY, tiny_vit, tiny_vit_model

FAST = CompressionConfig(compensation_rank=0, calibration_samples=16)
PRUNE_WITH_SKIP = CompressionConfig(method="pruning", target_flops_ratio=0.3, skip_blocks=True, calibration_samples=16)
METHODS = {
    "activation_aware": FAST,
    "head_factorization": CompressionConfig(method="head_factorization", calibration_samples=16),
    "pruning": PRUNE_WITH_SKIP,  # at 0.3 the tiny model skips a block (asserted below)
}
COMPRESSED_CLASSES = {
    ViTModel: CompressedViTModel,
    ViTForImageClassification: CompressedViTForImageClassification,
    DeiTModel: CompressedDeiTModel,
    DeiTForImageClassification: CompressedDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: CompressedDeiTForImageClassificationWithTeacher,
}


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def dense_of(cls: type) -> torch.nn.Module:
    torch.manual_seed(0)
    config_class = DeiTConfig if cls.__name__.startswith("DeiT") else ViTConfig
    return cls(config_class(**TINY, num_labels=5)).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    a_state, b_state = a.state_dict(), b.state_dict()
    return a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    small = compress(tiny_vit(), FAST, images(), progress=False)
    path = tmp_path_factory.mktemp("classifier")
    small.save_pretrained(path)
    return small, path


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory):
    small = compress(tiny_vit_model(), FAST, images(), progress=False)
    path = tmp_path_factory.mktemp("backbone")
    small.save_pretrained(path)
    return small, path


# -- 2. every compressed class comes back as itself through the Auto class a user would use ---------------
@pytest.mark.parametrize(
    ("dense_class", "method"),
    [
        (ViTModel, None),  # the saved_backbone fixture
        (ViTForImageClassification, None),  # the saved_classifier fixture
        (DeiTModel, "pruning"),
        (DeiTForImageClassification, "activation_aware"),
        (DeiTForImageClassificationWithTeacher, "activation_aware"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_every_compressed_class_reloads_through_its_auto_class(request, tmp_path, dense_class, method):
    if method is None:
        small, path = request.getfixturevalue("saved_backbone" if dense_class is ViTModel else "saved_classifier")
    else:
        small, path = compress(dense_of(dense_class), METHODS[method], images(), progress=False), tmp_path
        small.save_pretrained(path)
    assert type(small) is COMPRESSED_CLASSES[dense_class]
    auto = AutoModel if dense_class in (ViTModel, DeiTModel) else AutoModelForImageClassification
    loaded = auto.from_pretrained(path)
    assert type(loaded) is type(small)
    assert loaded.compression_plan.to_dict() == small.compression_plan.to_dict()
    assert same_weights(loaded, small)
    with torch.no_grad():
        got, want = loaded(pixel_values=images(4)), small(pixel_values=images(4))
    key = "last_hidden_state" if auto is AutoModel else "logits"
    assert torch.equal(got[key], want[key])
    # Before any save too: the config names its class, so from_config picks it among those registered.
    assert type(auto.from_config(small.config)) is type(small)


# -- 4. output_attentions / output_hidden_states as for the dense model ---------------------------------
@pytest.fixture(scope="module")
def compressed_by_method():
    dense = tiny_vit()
    return dense, {name: compress(dense, config, images(), progress=False) for name, config in METHODS.items()}


def attention_outputs_by_hook(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """What each attention module itself returns as weights, in forward order (the ground truth)."""
    seen, handles = [], []
    for module in model.modules():
        dense = type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")  # ViT/DeiT/Dinov2...
        if dense or isinstance(module, HeadFactorizedAttention):
            handles.append(module.register_forward_hook(lambda _m, _a, output: seen.append(output[1])))
    with torch.no_grad():
        model(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    return seen


def check_recorded_outputs(small, dense, implementation: str) -> None:
    pixels = images(3)
    for model in (small, dense):
        model.set_attn_implementation(implementation)
    with torch.no_grad():
        got = small(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        want = dense(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    layers = dense.config.num_hidden_layers
    blocks = family_for(small).blocks(small)
    assert len(got.hidden_states) == len(want.hidden_states) == layers + 1
    torch.testing.assert_close(got.hidden_states[0], want.hidden_states[0])  # the embeddings are not compressed
    for index, block in enumerate(blocks):
        if isinstance(block, SkippedBlock):  # the residual stream passes through unchanged
            assert torch.equal(got.hidden_states[index + 1], got.hidden_states[index])
    if implementation == "sdpa":  # SDPA computes no attention weights: the dense model returns none either
        assert got.attentions == want.attentions == ()
        return
    attentions = [  # ViT/DeiT/DINOv2 name it attention, CLIP/SigLIP self_attn
        getattr(block, "attention", None) or block.self_attn for block in blocks if not isinstance(block, SkippedBlock)
    ]
    assert len(got.attentions) == len(attentions) and len(want.attentions) == layers
    tokens = want.attentions[0].shape[-1]
    for recorded, truth, attention in zip(got.attentions, attention_outputs_by_hook(small, pixels), attentions):
        heads = getattr(attention, "num_heads", None) or attention.num_attention_heads
        assert recorded.shape == (len(pixels), heads, tokens, tokens)
        assert torch.equal(recorded, truth)
        torch.testing.assert_close(recorded.sum(-1), torch.ones(recorded.shape[:-1]))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(METHODS))
def test_output_attentions_and_hidden_states_come_back_as_for_the_dense_model(
    compressed_by_method, method, implementation
):
    dense, compressed = compressed_by_method
    small = compressed[method]
    if method == "pruning":
        assert any(isinstance(block, SkippedBlock) for block in small.vit.layers)
    if method != "activation_aware":
        assert any(isinstance(m, HeadFactorizedAttention) for m in small.modules())
    check_recorded_outputs(small, dense, implementation)


def test_outputs_are_recorded_by_reloaded_and_bare_models(tmp_path, compressed_by_method):
    dense, compressed = compressed_by_method
    compressed["pruning"].save_pretrained(tmp_path / "pruned")
    check_recorded_outputs(AutoModelForImageClassification.from_pretrained(tmp_path / "pruned"), dense, "eager")
    # compress() makes its result a CompressedViTModel by changing __class__, never running __init__, which is
    # what registers a class with transformers' output recording: forget the registration other tests made, as
    # in a fresh process.
    output_capturing._CAN_RECORD_REGISTRY.pop(str(CompressedViTModel), None)
    bare_dense = tiny_vit_model()
    bare = compress(bare_dense, PRUNE_WITH_SKIP, images(), progress=False)
    assert any(isinstance(block, SkippedBlock) for block in bare.layers)
    check_recorded_outputs(bare, bare_dense, "eager")


# -- 5. strict for the plan, transformers' behaviour everywhere else ------------------------------------
def test_a_new_label_set_raises_transformers_error_and_loads_with_ignore_mismatched_sizes(saved_classifier):
    small, path = saved_classifier
    with pytest.raises(RuntimeError, match="You set `ignore_mismatched_sizes` to `False`"):
        AutoModelForImageClassification.from_pretrained(path, num_labels=42)
    tuned, info = AutoModelForImageClassification.from_pretrained(
        path, num_labels=42, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert tuned.classifier.out_features == 42
    assert {key for key, *_ in info["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}
    assert same_weights(tuned.vit, small.vit)


def planned_names_are_modules(model) -> None:
    """``config.compression_plan`` names the model's own modules, of the planned kinds."""
    kinds = {"low_rank": LowRankLinear, "head_factorized": HeadFactorizedAttention, "skipped_block": SkippedBlock}
    plan = model.compression_plan
    assert plan.layers
    for name, layer in plan.layers.items():
        assert isinstance(model.get_submodule(name), kinds.get(layer.kind, torch.nn.Linear)), name
    assert plan.parameters == count_parameters(model)


def test_a_head_class_loads_a_backbone_checkpoint_with_a_fresh_head(saved_backbone):
    backbone, path = saved_backbone
    model, info = AutoModelForImageClassification.from_pretrained(path, output_loading_info=True)
    assert type(model) is CompressedViTForImageClassification
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert info["unexpected_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(name.startswith("vit.layers.") for name in model.compression_plan.layers)
    planned_names_are_modules(model)
    assert model.classifier.weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)
    with torch.no_grad():
        assert torch.equal(
            model.vit(pixel_values=images(4)).last_hidden_state, backbone(pixel_values=images(4)).last_hidden_state
        )
    model(pixel_values=images(2), labels=torch.tensor([0, 1])).loss.backward()  # ready to fine-tune


def test_a_compressed_classifier_loads_as_a_backbone(saved_classifier, tmp_path):
    small, path = saved_classifier  # an existing checkpoint: its plan is keyed "vit.layers.N..."
    assert all(
        name.startswith("vit.") for name in json.loads((path / "config.json").read_text())["compression_plan"]["layers"]
    )
    backbone, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert type(backbone) is CompressedViTModel
    assert info["unexpected_keys"] == {"classifier.weight", "classifier.bias"}
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(name.startswith("layers.") for name in backbone.compression_plan.layers)
    planned_names_are_modules(backbone)
    with torch.no_grad():
        want = small.vit(pixel_values=images(4)).last_hidden_state
        assert torch.equal(backbone(pixel_values=images(4)).last_hidden_state, want)
    # ... and saved again, it is a backbone checkpoint like any other.
    backbone.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert again.compression_plan.to_dict() == backbone.compression_plan.to_dict()
    assert same_weights(again, backbone)


def test_a_planned_head_is_dropped_with_the_head(tmp_path):
    config = CompressionConfig(
        target_param_ratio=0.9, compensation_rank=0, calibration_samples=16, target_modules=["fc1", "classifier"]
    )
    small = compress(tiny_vit(num_labels=48), config, images(), progress=False)  # 48 labels: worth factorizing
    assert isinstance(small.classifier, LowRankLinear)
    small.save_pretrained(tmp_path)
    backbone, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert "classifier" not in backbone.compression_plan.layers
    assert {key.split(".")[0] for key in info["unexpected_keys"]} == {"classifier"}
    planned_names_are_modules(backbone)


def test_an_early_backbone_checkpoint_with_new_key_names_still_loads(saved_backbone, tmp_path):
    backbone, _ = saved_backbone
    backbone.save_pretrained(tmp_path)  # then the weights as releases before 0.2 wrote them (5.x names)
    safetensors.torch.save_file(backbone.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert same_weights(AutoModel.from_pretrained(tmp_path), backbone)


def test_keys_outside_the_plan_are_reported_and_planned_ones_refused(saved_classifier, tmp_path):
    small, path = saved_classifier
    state = safetensors.torch.load_file(path / "model.safetensors")
    small.save_pretrained(tmp_path)
    checkpoint = tmp_path / "model.safetensors"

    def load_with(weights, **kwargs):
        safetensors.torch.save_file(weights, checkpoint, metadata={"format": "pt"})
        return AutoModelForImageClassification.from_pretrained(tmp_path, **kwargs)

    outside = {key: value for key, value in state.items() if key != "vit.layernorm.weight"}
    outside["extra.weight"] = torch.zeros(2)
    model, info = load_with(outside, output_loading_info=True)
    assert info["missing_keys"] == {"vit.layernorm.weight"}
    assert info["unexpected_keys"] == {"extra.weight"}
    load_with(outside)  # transformers only warns, and so does the plugin

    planned = next(key for key in state if "lowrank_down" in key)
    with pytest.raises(PlanMismatchError, match="missing weights"):
        load_with({key: value for key, value in state.items() if key != planned}, output_loading_info=True)
    with pytest.raises(PlanMismatchError, match="wrong shape"):
        load_with({**state, planned: state[planned][:-1]}, ignore_mismatched_sizes=True)
    dense_key = planned.replace("lowrank_down.", "")
    with pytest.raises(PlanMismatchError, match="no place for"):
        load_with({**state, dense_key: torch.zeros(48, 48)}, output_loading_info=True)


# -- 6. the base class's signatures ------------------------------------------------------------------
@pytest.mark.parametrize("dense_class", list(COMPRESSED_CLASSES), ids=lambda cls: cls.__name__)
def test_compressed_classes_show_the_base_signatures(dense_class):
    compressed = COMPRESSED_CLASSES[dense_class]
    assert inspect.signature(compressed.__init__) == inspect.signature(dense_class.__init__)
    assert inspect.signature(compressed.forward) == inspect.signature(dense_class.forward)


def test_base_init_arguments_reach_the_base_class(saved_backbone):
    backbone, _ = saved_backbone
    config = type(backbone.config).from_dict(backbone.config.to_dict())
    model = CompressedViTModel(config, add_pooling_layer=False, use_mask_token=True)
    assert model.pooler is None and model.embeddings.mask_token is not None
    for name in model.compression_plan.layers:
        assert isinstance(model.get_submodule(name), LowRankLinear)


# -- 7. planned modules initialized as transformers initializes linears --------------------------------
@pytest.mark.parametrize("method", ["activation_aware", "pruning"])
def test_planned_modules_built_from_a_config_get_transformers_initialization(compressed_by_method, method):
    _, compressed = compressed_by_method
    config = type(compressed[method].config).from_dict(compressed[method].config.to_dict())
    config.initializer_range = 0.05
    torch.manual_seed(0)
    model = CompressedViTForImageClassification(config)
    planned = [model.get_submodule(name) for name in model.compression_plan.layers]
    linears = [m for module in planned for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    weights = torch.cat([linear.weight.detach().flatten() for linear in linears])
    assert weights.std().item() == pytest.approx(0.05, rel=0.1)
    assert all(linear.bias is None or not linear.bias.any() for linear in linears)
