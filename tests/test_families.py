"""DINOv2 (``Dinov2Model`` / ``...ForImageClassification`` / ``...Backbone``, with and without registers, GELU and
SwiGLU MLPs) through all three methods, as the ViT and DeiT classes are tested in test_loading / test_compress.

Each test compresses tiny random models built from configs; LayerScale is random (``tiny_dinov2``) so that a
method that dropped it or applied it twice would change the outputs checked here.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoModel,
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    Dinov2Backbone,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    Swinv2Backbone,
    Swinv2Config,
    Swinv2ForImageClassification,
    Swinv2Model,
)

from hf_vitcompress import CompressionConfig, PruningError, compress, count_parameters
from hf_vitcompress.attention import HeadFactorizedAttention
from hf_vitcompress.calibration.validation import output_of
from hf_vitcompress.compress import resolve_targets
from hf_vitcompress.evaluation import count_macs
from hf_vitcompress.families import family_for
from hf_vitcompress.methods.pruning.structure import PrunableModel

from .conftest import tiny_dinov2
from .test_loading import check_recorded_outputs, same_weights

# Fixed factorization settings: the self-chosen default is exercised once (test_the_default_chooses_on_dinov2),
# the rest of the file tests the family, not the selection.
FIXED = dict(whitening="gram", rank_allocation="global", loss_weighting="none", compensation_rank=0)
METHODS = {
    "activation_aware": CompressionConfig(target_param_ratio=0.6, calibration_samples=16, **FIXED),
    "head_factorization": CompressionConfig(
        method="head_factorization", target_param_ratio=0.6, calibration_samples=16
    ),
    "pruning": CompressionConfig(method="pruning", target_flops_ratio=0.3, skip_blocks=True, calibration_samples=16),
}
KEEP_ALL = {
    "activation_aware": CompressionConfig(target_param_ratio=1.0, calibration_samples=16, **FIXED),
    "head_factorization": CompressionConfig(
        method="head_factorization", target_param_ratio=1.0, calibration_samples=16
    ),
    "pruning": CompressionConfig(method="pruning", target_flops_ratio=1.0),
}
CLASSES = [
    Dinov2Model,
    Dinov2ForImageClassification,
    Dinov2Backbone,
    Dinov2WithRegistersModel,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersBackbone,
]


def images(n: int = 16, height: int = 16, width: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(1))


def features(model, pixels) -> torch.Tensor:
    """What users of this class consume: logits, last_hidden_state, or a backbone's feature maps."""
    with torch.no_grad():
        return output_of(model(pixel_values=pixels))[1]


def reload(small, path):
    """``small`` saved and loaded back through the Auto class a user would use, its weights then moved to freshly
    allocated memory: transformers leaves loaded tensors at addresses that are not 64-byte aligned, and on the CPU
    that alone can change which GEMM kernel runs and the last bit of an output (seen here: 2.4e-7 on a
    shared-q/k/v DINOv2 with registers, and 0 once the same weights were copied)."""
    small.save_pretrained(path)
    name = type(small).__name__
    if name.endswith(("Backbone", "WithProjection")):
        # transformers 5.24's AutoBackbone.from_pretrained takes every local folder for a timm model name (a dense
        # Dinov2Backbone fails the same way), and no Auto class maps to CLIPVisionModelWithProjection: the class
        # loads the folder itself.
        if name.endswith("Backbone"):
            assert type(AutoBackbone.from_config(small.config)) is type(small)
        loaded = type(small).from_pretrained(path)
    else:
        auto = AutoModelForImageClassification if "ForImageClassification" in name else AutoModel
        loaded = auto.from_pretrained(path)
    for tensor in (*loaded.parameters(), *loaded.buffers()):
        tensor.data = tensor.data.clone()
    return loaded


def compressed_as_its_family(dense, config):
    """``dense`` compressed, checked to be its family's compressed class with the family's own ``model_type``."""
    small, family = compress(dense, config, images(), progress=False), family_for(dense)
    assert type(small) is family.compressed_classes[type(dense)]
    assert small.config.model_type == family.config_class.model_type and family.config_class.model_type.startswith(
        "vitcompress_"
    )
    return small, family


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dense_class", CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_and_method_compresses_meets_its_budget_and_reloads_bit_exact(tmp_path, dense_class, method):
    dense, config = tiny_dinov2(dense_class), METHODS[method]
    small, family = compressed_as_its_family(dense, config)
    plan = small.compression_plan
    assert plan.layers and all(name.startswith(family.block_list_name(small)) for name in plan.layers)
    if method == "pruning":
        provenance = small.config.compression_provenance
        assert provenance["macs"] <= config.target_flops_ratio * provenance["dense_macs"]
    else:
        assert count_parameters(small) == plan.parameters <= config.target_param_ratio * count_parameters(dense)
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small)
    assert loaded.compression_plan.to_dict() == plan.to_dict()
    assert same_weights(loaded, small)
    pixels = images(3, 24, 32)  # DINOv2 interpolates its position embeddings to any size
    assert torch.equal(features(loaded, pixels), features(small, pixels))


@pytest.mark.parametrize("method", list(KEEP_ALL))
@pytest.mark.parametrize(
    "dense_class", [Dinov2WithRegistersForImageClassification, Dinov2Backbone], ids=lambda cls: cls.__name__
)
def test_a_budget_that_keeps_everything_keeps_the_dense_function(dense_class, method):
    """Full rank / every head and neuron: the dense function, LayerScale and registers included, at a size
    other than the one calibrated on."""
    dense = tiny_dinov2(dense_class)
    small = compress(dense, KEEP_ALL[method], images(), progress=False)
    if method == "head_factorization":  # full-rank heads (activation_aware keeps a linear dense at full rank)
        assert any(isinstance(module, HeadFactorizedAttention) for module in small.modules())
    pixels = images(3, 24, 32)
    torch.testing.assert_close(features(small, pixels), features(dense, pixels), rtol=1e-4, atol=1e-5)


def test_layerscale_is_kept_as_it_was():
    dense = tiny_dinov2(Dinov2Model)
    small = compress(dense, METHODS["activation_aware"], images(), progress=False)
    for block, dense_block in zip(small.encoder.layer, dense.encoder.layer, strict=True):
        assert torch.equal(block.layer_scale1.lambda1, dense_block.layer_scale1.lambda1)
        assert torch.equal(block.layer_scale2.lambda1, dense_block.layer_scale2.lambda1)


def test_the_swiglu_mlp_is_factorized_and_pruned(tmp_path):
    dense = tiny_dinov2(Dinov2Model, use_swiglu_ffn=True)
    for method in ("activation_aware", "head_factorization"):
        small = compress(dense, METHODS[method], images(), progress=False)
        planned = {name.rsplit(".", 1)[-1] for name in small.compression_plan.layers}
        assert {"gate_proj", "up_proj", "down_proj"} <= planned
        assert torch.equal(features(reload(small, tmp_path / method), images(2)), features(small, images(2)))
    # gate_proj factorized, up_proj dense: transformers' DINOv2 converter would fuse the two on save (see
    # CompressedModelMixin.save_pretrained); the checkpoint must come back as it was.
    only_gate = dataclasses.replace(METHODS["activation_aware"], target_param_ratio=0.9, target_modules=["gate_proj"])
    small = compress(dense, only_gate, images(), progress=False)
    assert {name.rsplit(".", 1)[-1] for name in small.compression_plan.layers} == {"gate_proj"}
    loaded = reload(small, tmp_path / "gate")
    assert same_weights(loaded, small) and torch.equal(features(loaded, images(2)), features(small, images(2)))
    full = compress(dense, KEEP_ALL["activation_aware"], images(), progress=False)
    torch.testing.assert_close(features(full, images(3)), features(dense, images(3)), rtol=1e-4, atol=1e-5)
    # pruning: a neuron is a row of gate_proj and of up_proj and a column of down_proj
    pruned = compress(dense, METHODS["pruning"], images(), progress=False)
    provenance = pruned.config.compression_provenance
    assert provenance["macs"] <= METHODS["pruning"].target_flops_ratio * provenance["dense_macs"]
    # the budget's count (3 matmuls per SwiGLU neuron) is what the pruned model really runs
    assert provenance["macs"] == count_macs(pruned, images(1))
    mlp = next(block.mlp for block in pruned.encoder.layer if hasattr(block, "mlp"))
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features
    loaded = reload(pruned, tmp_path / "pruned")
    assert same_weights(loaded, pruned) and torch.equal(features(loaded, images(2)), features(pruned, images(2)))
    keep_all = compress(dense, KEEP_ALL["pruning"], images(), progress=False)
    torch.testing.assert_close(features(keep_all, images(3)), features(dense, images(3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(METHODS))
def test_output_attentions_and_hidden_states_come_back_as_for_the_dense_model(method, implementation):
    dense = tiny_dinov2(Dinov2WithRegistersForImageClassification)
    small = compress(dense, METHODS[method], images(), progress=False)
    check_recorded_outputs(small, dense, implementation)


def test_the_default_chooses_on_dinov2():
    """The self-chosen factorization runs on a DINOv2 backbone: the held-out metric is the feature error."""
    dense = tiny_dinov2(Dinov2Model)
    small = compress(dense, CompressionConfig(target_param_ratio=0.6, calibration_samples=16), images(), progress=False)
    selection = small.compression_plan.selection
    assert selection["metric"] == "relative_squared_feature_error" and len(selection["candidates"]) > 1


def test_tune_times_a_compressed_backbone_and_its_choice_reloads(tmp_path):
    from hf_vitcompress import tune

    dense = tiny_dinov2(Dinov2Backbone)
    small = compress(dense, METHODS["activation_aware"], images(), progress=False)
    before = features(small, images(4))
    timings = tune(small, images(4), choices=("dense",), repeats=1, warmup=0)  # merge every factor pair back
    plan = small.compression_plan  # shared q/k/v attentions stay: tune times factor pairs only
    assert timings and plan.tuning["merged_to_dense"]
    assert not [layer for layer in plan.layers.values() if layer.kind == "low_rank"]
    torch.testing.assert_close(features(small, images(4)), before, rtol=1e-4, atol=1e-5)
    loaded = reload(small, tmp_path)
    assert isinstance(loaded.encoder.layer[0].mlp.fc1, torch.nn.Linear)
    assert torch.equal(features(loaded, images(4)), features(small, images(4)))


# -- CLIP and SigLIP vision towers (and the image towers of full CLIPModel / SiglipModel): every method ---------
VISION_TOWERS = [CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel]


def tiny_tower(cls: type) -> torch.nn.Module:
    torch.manual_seed(0)
    config_class = SiglipVisionConfig if cls is SiglipVisionModel else CLIPVisionConfig
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return with_random_biases(cls(config_class(**sizes, image_size=16, patch_size=4)).eval())


def with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its linears' biases random (transformers starts them at zero, where a dropped or misplaced
    bias would not show)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dense_class", VISION_TOWERS, ids=lambda cls: cls.__name__)
def test_a_vision_tower_is_compressed_meets_its_budget_and_reloads(tmp_path, dense_class, method):
    dense, config = tiny_tower(dense_class), METHODS[method]
    small, _ = compressed_as_its_family(dense, config)
    planned = {name.rsplit(".", 1)[-1]: layer.kind for name, layer in small.compression_plan.layers.items()}
    if method == "activation_aware":
        assert {"out_proj", "fc1", "fc2"} <= set(planned)
    elif method == "head_factorization":  # self_attn with its out_proj becomes one head-factorized attention
        assert planned["self_attn"] == "head_factorized" and "out_proj" not in planned
    if method == "pruning":  # heads and value dims of self_attn, MLP neurons, whole blocks
        provenance = small.config.compression_provenance
        assert provenance["macs"] == count_macs(small, images(1)) <= 0.3 * provenance["dense_macs"]
        assert provenance["dense_macs"] == count_macs(dense, images(1))
        assert set(planned) <= {"self_attn", "fc1", "fc2", "0", "1"} and planned
    else:
        assert count_parameters(small) == small.compression_plan.parameters <= 0.6 * count_parameters(dense)
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small) and same_weights(loaded, small)
    assert torch.equal(features(loaded, images(3)), features(small, images(3)))
    if dense_class is CLIPVisionModelWithProjection:  # the metric is what retrieval uses
        assert output_of(small(pixel_values=images(2)))[1].shape == (2, dense.config.projection_dim)
    keep_all = compress(dense, KEEP_ALL[method], images(), progress=False)  # full rank: the dense function
    torch.testing.assert_close(features(keep_all, images(3)), features(dense, images(3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_vision_tower_records_outputs_as_the_dense_one(method, implementation):
    dense = tiny_tower(SiglipVisionModel)
    small = compress(dense, METHODS[method], images(), progress=False)
    check_recorded_outputs(small, dense, implementation)


def tiny_two_towers(cls: type) -> torch.nn.Module:
    """A tiny CLIPModel / SiglipModel with random biases (a misplaced or dropped bias would show)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    text = dict(sizes, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(sizes, image_size=16, patch_size=4)
    if cls is CLIPModel:
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    else:
        config = SiglipConfig(text_config=text, vision_config=vision)
    return with_random_biases(cls(config).eval())


def zero_shot(model, pixels) -> torch.Tensor:
    """Image-text logits for three fixed prompts: what zero-shot classification ranks."""
    prompts = torch.randint(3, 99, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=prompts, pixel_values=pixels).logits_per_image


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dense_class", [CLIPModel, SiglipModel], ids=lambda cls: cls.__name__)
def test_the_image_tower_of_a_two_tower_model_is_compressed_and_zero_shot_still_runs(tmp_path, dense_class, method):
    dense = tiny_two_towers(dense_class)
    before = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    small, family = compressed_as_its_family(dense, METHODS[method])
    after = dense.state_dict()  # the user's model is not modified, nor left without a tower
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert type(small.vision_model) is type(dense.vision_model)  # the tower is the full model's child again
    # as in the dense model, the tower's modules read the full model's vision config (one object)
    assert dense.vision_model.config is dense.config.vision_config
    configs = {id(m.config) for m in small.vision_model.modules() if hasattr(m, "config")}
    assert configs == {id(small.config.vision_config)}
    plan = small.compression_plan
    assert plan.layers and all(name.startswith("vision_model.encoder.layers.") for name in plan.layers)
    # the budget is the image tower's; the plan counts the whole model
    provenance = small.config.compression_provenance
    tower = provenance["image_tower"]
    if method == "pruning":  # the FLOPs budget is the image path's, which is what count_macs measures here
        assert provenance["macs"] == count_macs(small, images(1)) <= 0.3 * provenance["dense_macs"]
        assert provenance["dense_macs"] == count_macs(dense, images(1))
    else:
        assert tower["parameters"] <= 0.6 * tower["dense_parameters"]
    assert count_parameters(small) == plan.parameters and plan.dense_parameters == count_parameters(dense)
    untouched = [name for name in before if not name.startswith("vision_model.")]  # text tower, projections
    kept = small.state_dict()
    assert untouched and all(torch.equal(kept[name], before[name]) for name in untouched)
    with torch.no_grad():
        text = dense.get_text_features(input_ids=torch.tensor([[3, 4, 5]]))
        assert torch.equal(
            small.get_text_features(input_ids=torch.tensor([[3, 4, 5]])).pooler_output, text.pooler_output
        )
    assert zero_shot(small, images(2)).shape == (2, 3)
    from hf_vitcompress.evaluation import measure_latency

    assert set(measure_latency({"dense": dense, "small": small}, images(2), repeats=1, warmup=0)) == {"dense", "small"}
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small) and same_weights(loaded, small)
    assert torch.equal(zero_shot(loaded, images(2)), zero_shot(small, images(2)))
    keep_all = compress(dense, KEEP_ALL[method], images(), progress=False)
    torch.testing.assert_close(zero_shot(keep_all, images(3)), zero_shot(dense, images(3)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dense_class", [CLIPModel, SiglipModel], ids=lambda cls: cls.__name__)
def test_a_two_tower_model_records_its_image_towers_outputs_as_the_dense_one(dense_class):
    """The compressed tower follows the full model's attention implementation and records its attentions."""
    dense = tiny_two_towers(dense_class)
    small = compress(dense, KEEP_ALL["head_factorization"], images(), progress=False)
    assert any(isinstance(module, HeadFactorizedAttention) for module in small.vision_model.modules())
    for model in (small, dense):
        model.set_attn_implementation("eager")
    prompts = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        got, want = (
            m(
                input_ids=prompts, pixel_values=images(2), output_attentions=True, output_hidden_states=True
            ).vision_model_output
            for m in (small, dense)
        )
    assert len(got.attentions) == len(want.attentions) == 2
    for recorded, truth in zip(
        (*got.attentions, *got.hidden_states), (*want.attentions, *want.hidden_states), strict=True
    ):
        torch.testing.assert_close(recorded, truth, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense_class", [CLIPModel, SiglipModel], ids=lambda cls: cls.__name__)
def test_target_modules_of_a_two_tower_model_name_its_own_modules(dense_class):
    """target_modules name the full model's modules (what the user sees), whatever the tower calls them."""
    dense = tiny_two_towers(dense_class)
    name = "vision_model.encoder.layers.1.mlp.fc1"
    config = dataclasses.replace(METHODS["activation_aware"], target_param_ratio=0.97, target_modules=[name])
    small = compress(dense, config, images(), progress=False)
    assert list(small.compression_plan.layers) == [name]
    assert small.config.compression_config["target_modules"] == [name]  # recorded as asked


def test_the_clip_image_tower_is_calibrated_on_the_image_embeddings():
    """CLIPModel's tower is compressed as a CLIPVisionModelWithProjection of its own modules: the same plan and
    image embeddings as compressing that tower class loaded from the same weights."""
    dense = tiny_two_towers(CLIPModel)
    small = compress(dense, METHODS["activation_aware"], images(), progress=False)
    tower = CLIPVisionModelWithProjection(dense.config.vision_config).eval()
    tower.vision_model.load_state_dict(dense.vision_model.state_dict())
    tower.visual_projection = copy.deepcopy(dense.visual_projection)  # CLIPModel's projection_dim, not the tower's
    small_tower = compress(tower, METHODS["activation_aware"], images(), progress=False)
    assert {layer.rank for layer in small.compression_plan.layers.values()} == {
        layer.rank for layer in small_tower.compression_plan.layers.values()
    }
    with torch.no_grad():
        torch.testing.assert_close(
            small.get_image_features(pixel_values=images(2)).pooler_output,
            small_tower(pixel_values=images(2)).image_embeds,
        )


@pytest.mark.parametrize("kind", ["clip_tower", "dinov2_swiglu", "swin"])
def test_the_pruning_trainer_searches_a_tower_and_a_swiglu_mlp_on_features(tmp_path, kind):
    """UVC's searched path (masks on out_proj / down_proj inputs, shrinking, export) on CLIP's self_attn and on
    DINOv2's SwiGLU MLP, distilled on features (no labels): the exported model is the masked model it trained."""
    from .test_pruning import run_trainer

    def build():
        if kind == "swin":  # windowed attention, two widths
            return tiny_swin(SwinForImageClassification)
        return tiny_tower(CLIPVisionModel) if kind == "clip_tower" else tiny_dinov2(Dinov2Model, use_swiglu_ffn=True)

    pixels = images(32, 32, 32) if kind == "swin" else images(32)
    features_only = [{"pixel_values": p} for p in pixels]  # no labels: distilled on features alone (alpha=1)
    trainer = run_trainer(
        tmp_path, pixels, skip_blocks=True, build=build, train_dataset=features_only, save_strategy="no", alpha=1.0
    )
    pruned = trainer.export()
    assert count_macs(pruned, pixels[:1]) <= int(0.5 * trainer.structure.dense_macs)
    torch.testing.assert_close(features(pruned.eval(), pixels[:4]), features(trainer.model.eval(), pixels[:4]))


def test_a_pruned_vision_tower_keeps_the_kept_heads_and_neurons_of_the_dense_one():
    """Pruning reads CLIP's self_attn / out_proj: the kept heads' q/k/v rows and out_proj columns, and the kept
    neurons' fc1 rows and fc2 columns, are the dense ones (a wrong name would raise, a wrong slice differ)."""
    dense = tiny_tower(CLIPVisionModel)
    config = CompressionConfig(method="pruning", target_flops_ratio=0.7, calibration_samples=16)
    small = compress(dense, config, images(), progress=False)
    pruned = [
        (index, block)
        for index, block in enumerate(small.encoder.layers)
        if isinstance(block.self_attn, HeadFactorizedAttention)
    ]
    assert pruned
    for index, block in pruned:
        attention, dense_attention = block.self_attn, dense.encoder.layers[index].self_attn
        assert attention.num_heads < 4 or min(attention.vo_ranks) < 12  # something of this attention was removed
        rows = torch.cat([torch.arange(h * 12, h * 12 + 12) for h in attention.active_heads])
        # query/key heads are kept whole: the kept heads' dense rows, exactly
        assert torch.equal(attention.qk_left.weight, dense_attention.q_proj.weight[rows])
        assert torch.equal(attention.qk_right.weight, dense_attention.k_proj.weight[rows])
    mlp, dense_mlp = small.encoder.layers[0].mlp, dense.encoder.layers[0].mlp
    kept = [j for j in range(96) if any(torch.equal(dense_mlp.fc1.weight[j], row) for row in mlp.fc1.weight)]
    assert len(kept) == mlp.fc1.out_features and torch.equal(mlp.fc2.weight, dense_mlp.fc2.weight[:, kept])


@pytest.mark.parametrize("dense_class", [CLIPVisionModel, SiglipVisionModel], ids=lambda cls: cls.__name__)
def test_the_macs_of_a_vision_tower_match_a_hand_count(dense_class):
    """CLIP's layers pass hidden_states by keyword and SigLIP's pooling head is an nn.MultiheadAttention whose
    projections never run as nn.Linear modules: both must still be counted (the model card prints these)."""
    from hf_vitcompress.evaluation import count_macs

    d, mlp, layers, patch_pixels = 48, 96, 2, 3 * 4 * 4
    tokens = 16 + (dense_class is CLIPVisionModel)  # CLIP adds a class token
    per_layer = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * mlp
    expected = 16 * patch_pixels * d + layers * per_layer
    if dense_class is SiglipVisionModel:  # one probe query attends over every token, then its MLP
        expected += (2 + 2 * tokens) * d * d + 2 * tokens * d + 2 * d * mlp
    assert count_macs(tiny_tower(dense_class), images(2)) == expected


# -- BEiT: ViT's block layout, LayerScale, and a relative position bias added through attention_mask -----------
def tiny_beit(cls: type, **overrides) -> torch.nn.Module:
    """A tiny BEiT whose relative position bias tables, LayerScale and biases are random (transformers starts
    the tables at zero, where a misplaced bias row would not be seen)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_labels=5)
    config = BeitConfig(**sizes, image_size=16, patch_size=4, use_relative_position_bias=True, **overrides)
    model = cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name or "lambda_" in name:
                parameter.normal_(0, 0.5)
            elif name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dense_class", [BeitModel, BeitForImageClassification], ids=lambda cls: cls.__name__)
def test_beit_compresses_with_every_method_and_reloads(tmp_path, dense_class, method):
    dense, config = tiny_beit(dense_class), METHODS[method]
    small, _ = compressed_as_its_family(dense, config)
    if method == "pruning":
        provenance = small.config.compression_provenance
        assert provenance["macs"] <= config.target_flops_ratio * provenance["dense_macs"]
    else:
        assert count_parameters(small) <= config.target_param_ratio * count_parameters(dense)
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small) and same_weights(loaded, small)
    assert torch.equal(features(loaded, images(3)), features(small, images(3)))
    keep_all = compress(dense, KEEP_ALL[method], images(), progress=False)
    torch.testing.assert_close(features(keep_all, images(3)), features(dense, images(3)), rtol=1e-4, atol=1e-5)


def test_a_head_factorized_attention_keeps_the_position_bias_rows_of_the_heads_it_keeps():
    """BEiT passes its per-head relative position bias as attention_mask; an attention that dropped a head
    (pruning, or value/output rank 0) must add each kept head's own row, not the first rows."""
    from hf_vitcompress.methods.head_factorization.factorization import build_head_factorized, factorize_attention

    attention = tiny_beit(BeitModel).layers[0].attention
    dead = slice(12, 24)  # head 1 contributes nothing: its value rows and output columns are zero
    with torch.no_grad():
        attention.v_proj.weight[dead] = 0
        attention.v_proj.bias[dead] = 0
        attention.o_proj.weight[:, dead] = 0
    module = build_head_factorized(attention, factorize_attention(attention, None), [12, 0, 12, 12], [12, 0, 12, 12])
    assert module.num_heads == 3
    hidden = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(1, 4, 17, 17, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            module(hidden, attention_mask=bias)[0], attention(hidden, attention_mask=bias)[0], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("method", list(METHODS))
def test_beit_records_outputs_as_the_dense_one(method):
    dense = tiny_beit(BeitForImageClassification)
    check_recorded_outputs(compress(dense, METHODS[method], images(), progress=False), dense, "eager")


# -- Data2Vec-vision: BEiT with transformers' classic module names; activation_aware only -----------------------
@pytest.mark.parametrize(
    "dense_class", [Data2VecVisionModel, Data2VecVisionForImageClassification], ids=lambda cls: cls.__name__
)
def test_data2vec_vision_is_factorized_reloads_and_refuses_the_head_methods(tmp_path, dense_class):
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_labels=5)
    dense = dense_class(Data2VecVisionConfig(**sizes, image_size=16, patch_size=4, use_relative_position_bias=True))
    dense.eval()
    small, _ = compressed_as_its_family(dense, METHODS["activation_aware"])
    assert {name.split("layer.", 1)[1].split(".", 1)[1] for name in small.compression_plan.layers} >= {
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert count_parameters(small) <= 0.6 * count_parameters(dense)
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small) and same_weights(loaded, small)
    assert torch.equal(features(loaded, images(3)), features(small, images(3)))
    with torch.no_grad():  # its classic attention records its own weights: the same shapes as the dense model's
        got, want = (
            m(pixel_values=images(2), output_attentions=True, output_hidden_states=True) for m in (small, dense)
        )
    assert [h.shape for h in got.hidden_states] == [h.shape for h in want.hidden_states]
    shapes = [[None if a is None else a.shape for a in out.attentions] for out in (got, want)]
    assert shapes[0] == shapes[1] and len(shapes[0]) == dense.config.num_hidden_layers  # None under SDPA, as dense
    for method in ("head_factorization", "pruning"):
        with pytest.raises(ValueError, match=f"method='{method}' does not handle {dense_class.__name__} yet"):
            compress(dense, METHODS[method], images(), progress=False)


# -- Swin / Swin-v2: blocks in stages, windowed attention with its own bias, patch merging ----------------------
SWIN = [SwinModel, SwinForImageClassification, SwinBackbone]
SWINV2 = [Swinv2Model, Swinv2ForImageClassification, Swinv2Backbone]


def tiny_swin(cls: type) -> torch.nn.Module:
    """A tiny Swin (or Swin-v2) on 32 px: an 8 x 8 token grid in 4 x 4 windows, so the second block of stage 0
    shifts its windows (and masks across their seams), then a patch merging to a 4 x 4 grid. The relative
    position tables and the biases are random (transformers starts the tables at zero)."""
    torch.manual_seed(0)
    config_class = Swinv2Config if cls in SWINV2 else SwinConfig
    config = config_class(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=5,
        drop_path_rate=0.0,  # no stochastic depth when a test trains it
    )
    if cls in (SwinBackbone, Swinv2Backbone):
        config.out_features = ["stage1", "stage2"]
    model = cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name:
                parameter.normal_(0, 0.5)
            elif name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    return model


SWIN_CASES = [(cls, method) for cls in SWIN for method in METHODS] + [(cls, "activation_aware") for cls in SWINV2]
SWIN_METHODS = METHODS  # Swin takes every method as ViT does (skip_blocks included)


@pytest.mark.parametrize(("dense_class", "method"), SWIN_CASES, ids=lambda case: getattr(case, "__name__", case))
def test_swin_compresses_meets_its_budget_reloads_and_keeps_everything_exactly(tmp_path, dense_class, method):
    dense = tiny_swin(dense_class)
    pixels = images(16, 32, 32)
    family = family_for(dense)
    windows = family.forward_state_of(dense)
    small = compress(dense, SWIN_METHODS[method], pixels, progress=False)
    # Swin's layers clamp their window state to the calibration grid and keep it: compress puts it back
    assert family.forward_state_of(dense) == windows == family.forward_state_of(small)
    assert type(small) is family.compressed_classes[dense_class]
    assert small.config.model_type == family.config_class.model_type
    plan = small.compression_plan
    stages = {name.split("layers.", 1)[1].split(".", 1)[0] for name in plan.layers}
    assert stages == {"0", "1"}  # blocks of both stages
    if method == "pruning":  # each block at its own width and token count, attention per window
        provenance = small.config.compression_provenance
        # counted on copies: a forward at 32 px would clamp the originals' window state (see the swin module)
        assert provenance["macs"] == count_macs(copy.deepcopy(small), pixels[:1]) <= 0.3 * provenance["dense_macs"]
        assert provenance["dense_macs"] == count_macs(copy.deepcopy(dense), pixels[:1])
    else:
        assert count_parameters(small) == plan.parameters <= 0.6 * count_parameters(dense)
    if method == "activation_aware":  # the patch merging between the stages is a target too
        _, extra = resolve_targets(dense, family, None)
        assert [name.split("encoder.", 1)[1] for name in extra] == ["layers.0.downsample.reduction"]
    elif method == "head_factorization":
        assert sum(isinstance(m, HeadFactorizedAttention) for m in small.modules()) == 4
    loaded = reload(small, tmp_path)
    assert type(loaded) is type(small) and same_weights(loaded, small)
    other_size = images(3, 40, 48)  # Swin pads to whole windows: any size runs
    assert torch.equal(features(loaded, other_size), features(small, other_size))
    keep_all = compress(dense, KEEP_ALL[method], pixels, progress=False)
    torch.testing.assert_close(features(keep_all, other_size), features(dense, other_size), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_swin_records_outputs_as_the_dense_one(method):
    """Swin records one hidden state and one attention per stage; at full rank they are the dense ones."""
    dense = tiny_swin(SwinForImageClassification)
    dense.set_attn_implementation("eager")
    small = compress(dense, KEEP_ALL[method], images(16, 32, 32), progress=False)
    with torch.no_grad():
        got, want = (
            m(pixel_values=images(2, 32, 32), output_attentions=True, output_hidden_states=True) for m in (small, dense)
        )
    assert len(got.attentions) == len(want.attentions) == 2 and len(got.hidden_states) == 3
    for recorded, truth in zip(
        (*got.attentions, *got.hidden_states, *got.reshaped_hidden_states),
        (*want.attentions, *want.hidden_states, *want.reshaped_hidden_states),
        strict=True,
    ):
        torch.testing.assert_close(recorded, truth, rtol=1e-4, atol=1e-5)


def test_a_head_factorized_swin_attention_keeps_its_bias_rows_and_the_window_mask():
    """Swin's attention adds its own per-head bias and the shifted-window mask; an attention that dropped a
    head must add each kept head's own bias row, and the mask of each window, as the dense one does."""
    from hf_vitcompress.methods.head_factorization.factorization import build_head_factorized, factorize_attention

    attention = tiny_swin(SwinModel).encoder.layers[1].blocks[0].attention  # 4 heads of 8
    dead = slice(8, 16)  # head 1 contributes nothing: its value rows and output columns are zero
    with torch.no_grad():
        attention.v_proj.weight[dead] = 0
        attention.v_proj.bias[dead] = 0
        attention.o_proj.weight[:, dead] = 0
    ranks = [8, 0, 8, 8]
    module = build_head_factorized(attention, factorize_attention(attention, None), ranks, ranks)
    assert module.num_heads == 3
    hidden = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(3))  # 2 images x 3 windows
    mask = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for window_mask in (None, mask):
            torch.testing.assert_close(module(hidden, window_mask)[0], attention(hidden, window_mask)[0])


@pytest.mark.parametrize("dense_class", [SwinForImageClassification, Swinv2Backbone], ids=lambda cls: cls.__name__)
def test_the_patch_merging_of_a_swin_is_factorized_and_reloads(tmp_path, dense_class):
    dense = tiny_swin(dense_class)
    config = dataclasses.replace(METHODS["activation_aware"], target_param_ratio=0.98, target_modules=["reduction"])
    small = compress(dense, config, images(16, 32, 32), progress=False)
    (name,) = small.compression_plan.layers
    assert name.endswith("encoder.layers.0.downsample.reduction") and small.compression_plan.layers[name].rank
    loaded = reload(small, tmp_path)
    assert same_weights(loaded, small) and torch.equal(
        features(loaded, images(2, 32, 32)), features(small, images(2, 32, 32))
    )


def test_a_swin_pruned_at_a_padded_size_meets_its_budget_there():
    """At 40 x 48 px the 10 x 12 grid is padded to whole 4 x 4 windows (12 x 12) for the attention, not for the
    MLP: the measured per-block counts make the budget equal the pruned model's real MACs at that size."""
    dense = tiny_swin(SwinForImageClassification)
    pixels = images(16, 40, 48)
    small = compress(dense, SWIN_METHODS["pruning"], pixels, progress=False)
    provenance = small.config.compression_provenance
    assert provenance["macs_image_size"] == [40, 48]
    assert provenance["macs"] == count_macs(copy.deepcopy(small), pixels[:1]) <= 0.3 * provenance["dense_macs"]
    structure = PrunableModel.of(copy.deepcopy(dense), (40, 48))
    first = structure.blocks[0]
    assert (first.tokens, first.attention_tokens, first.span) == (120, 144, 16)


def test_the_search_costs_every_swin_block_at_its_own_shape_and_measuring_leaves_the_model_as_it_was():
    """UVC's expected MACs (all blocks at once, from stacked shapes) equal the dense count at zero pruning, and
    measuring the structure (one forward at 32 px, which clamps Swin's window state) leaves the model unchanged."""
    from hf_vitcompress.methods.pruning.search import UVCController

    dense = tiny_swin(SwinModel)
    family = family_for(dense)
    windows = family.forward_state_of(dense)
    structure = PrunableModel.of(dense)
    assert family.forward_state_of(dense) == windows
    assert len({(b.hidden, b.tokens) for b in structure.blocks}) == 2  # two stages, two shapes
    no_gates = dataclasses.replace(SWIN_METHODS["pruning"], skip_blocks=False)  # the block gates start at 0.95
    controller = UVCController(structure, no_gates, int(0.5 * structure.dense_macs))
    assert int(controller.expected_macs()) == structure.dense_macs


def test_the_head_mixing_statistics_of_a_shifted_swin_block_use_its_bias_and_window_mask():
    """The per-head Grams of the attention-mixed tokens (head factorization's metric) come from the dense
    attention's own probabilities: bias and shifted-window mask included."""
    from hf_vitcompress.calibration.attention_mixing import HeadMixingStatistics, record_head_mixing

    dense = tiny_swin(SwinModel)
    dense.set_attn_implementation("eager")
    name = "encoder.layers.0.blocks.1.attention"  # the shifted block of stage 0
    attention = dense.get_submodule(name)
    seen = {}
    attention.register_forward_hook(lambda m, args, output: seen.update(x=args[0], probabilities=output[1]))
    statistics: dict[str, HeadMixingStatistics] = {}
    with torch.no_grad(), record_head_mixing(dense, [name], statistics):
        dense(pixel_values=images(2, 32, 32), output_attentions=True)
    assert dense.get_submodule("encoder.layers.0.blocks.1").shift_size > 0
    mixed = seen["probabilities"].double() @ seen["x"].double()[:, None]  # [windows, heads, tokens, width]
    expected = torch.einsum("bhtd,bhte->hde", mixed, mixed)
    torch.testing.assert_close(statistics[name].grams, expected, rtol=1e-4, atol=1e-6)


def test_a_swin_skips_blocks_and_whole_stages_exactly(tmp_path):
    """A skipped Swin block returns (hidden_states, None) as a SwinLayer returns (hidden_states, weights): the
    result equals the dense model whose skipped blocks add nothing (their output projection and fc2 zeroed),
    records one hidden state per stage as the dense one (no extra one per skipped block), and reloads; a stage
    of skipped blocks still merges its patches."""
    from hf_vitcompress.methods.pruning.export import export_pruned
    from hf_vitcompress.methods.pruning.search import UVCController

    dense = tiny_swin(SwinForImageClassification)
    dense.set_attn_implementation("eager")
    structure = PrunableModel.of(dense)
    state = structure.full_state()
    skipped = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1"]  # before a shifted one, a stage
    for block, name in zip(state, structure.block_names, strict=True):
        block.skipped = name.split("encoder.", 1)[1] in skipped
    config = dataclasses.replace(METHODS["pruning"], target_flops_ratio=0.9)
    controller = UVCController(structure, config, structure.dense_macs)  # the search's gates close the same blocks
    controller.attach(dense)
    controller.set_final_state(state)
    with torch.no_grad():
        gated = dense(pixel_values=images(3, 32, 32)).logits
    controller.detach()
    small = export_pruned(dense, structure, state, config)
    reference = copy.deepcopy(dense)
    for name in skipped:
        block = reference.swin.encoder.get_submodule(name)
        for linear in (block.attention.o_proj, block.mlp.fc2):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    pixels = images(3, 32, 32)
    with torch.no_grad():
        got, want = (
            m(pixel_values=pixels, output_attentions=True, output_hidden_states=True) for m in (small, reference)
        )
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated, want.logits, rtol=1e-5, atol=1e-6)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for recorded, truth in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(recorded, truth, rtol=1e-5, atol=1e-6)
    # a stage records its last block's attention: stage 1's is skipped and has none (as a skipped ViT block)
    assert len(got.attentions) == 1 and len(want.attentions) == 2
    torch.testing.assert_close(got.attentions[0], want.attentions[0], rtol=1e-5, atol=1e-6)
    loaded = reload(small, tmp_path)
    loaded.set_attn_implementation("eager")  # as small's, copied from the dense model
    assert torch.equal(features(loaded, images(2, 40, 48)), features(small, images(2, 40, 48)))
    assert "SkippedBlock(extra_outputs=1)" in repr(loaded.swin.encoder.layers[1].blocks[0])


def test_swin_refuses_what_does_not_apply_and_says_what_works():
    swin, swinv2 = tiny_swin(SwinModel), tiny_swin(Swinv2Model)
    with pytest.raises(ValueError, match="method='head_factorization' does not handle Swinv2Model"):
        compress(swinv2, METHODS["head_factorization"], images(16, 32, 32), progress=False)
    for block_by_block in (dict(sequential=True), dict(compensation_rank=2, shared_qkv=False)):
        config = dataclasses.replace(METHODS["activation_aware"], **block_by_block)
        with pytest.raises(ValueError, match="stages with a patch merging between them"):
            compress(swin, config, images(16, 32, 32), progress=False)
    with pytest.raises(PruningError, match="two towers and pruning works on one"):
        PrunableModel.of(tiny_two_towers(CLIPModel))


@pytest.mark.parametrize("dense_class", [SwinModel, Swinv2Model], ids=lambda cls: cls.__name__)
def test_the_macs_of_a_swin_match_a_hand_count(dense_class):
    """Windowed attention: per window of 16 tokens, 16 x 16 scores and weighted sums per channel; the linears
    per token; the patch embedding and merging; Swin-v2's position-bias MLP runs once per block."""
    dense = tiny_swin(dense_class)
    tokens, windows, width = (64, 16), (4, 1), (16, 32)
    blocks = 0
    for stage in range(2):
        n, d = tokens[stage], width[stage]
        linears = 2 * n * (4 * d * d + 2 * 4 * d * d)  # two blocks: q, k, v, o and the 4x MLP
        attention = 2 * windows[stage] * 16 * 16 * 2 * d
        blocks += linears + attention
    merging = 16 * 64 * 32
    embedding = 64 * 16 * 3 * 4 * 4
    expected = embedding + blocks + merging
    if dense_class is Swinv2Model:  # continuous_position_bias_mlp: a 2 -> 512 -> heads MLP on the 7 x 7 table
        expected += 2 * 49 * (2 * 512 + 512 * 2) + 2 * 49 * (2 * 512 + 512 * 4)
    assert count_macs(dense, images(1, 32, 32)) == expected
