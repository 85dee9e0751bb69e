import json

import pytest

from hf_vitcompress import CompressionConfig


def test_round_trip_dict_and_json(tmp_path):
    config = CompressionConfig(
        target_param_ratio=0.4, target_modules=["fc1", "fc2"], sequential=True, compensation_rank=4
    )
    assert CompressionConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert CompressionConfig.from_json_file(path) == config
    assert json.loads(config.to_json_string())["target_param_ratio"] == 0.4


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="target_param_ratio"):
        CompressionConfig(target_param_ratio=ratio)


def test_ratio_of_wrong_type():
    with pytest.raises(TypeError, match="target_param_ratio"):
        CompressionConfig(target_param_ratio="half")


def test_unknown_method_lists_supported():
    with pytest.raises(ValueError, match="Unknown compression method 'svd-magic'.*activation_aware"):
        CompressionConfig(method="svd-magic")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="Unknown CompressionConfig field.*ratio"):
        CompressionConfig.from_dict({"ratio": 0.5})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"whitening": "zca"}, "whitening"),
        ({"rank_allocation": "random"}, "rank_allocation"),
        ({"gram_shrinkage": 2.0}, "gram_shrinkage"),
        ({"target_modules": []}, "target_modules"),
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"compensation_rank": -1}, "compensation_rank"),
    ],
)
def test_invalid_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressionConfig(**kwargs)


def test_compressed_configs_point_auto_map_at_the_loader_shim():
    from hf_vitcompress import CompressedDeiTConfig, CompressedViTConfig

    for config_class in (CompressedViTConfig, CompressedDeiTConfig):
        auto_map = config_class().auto_map
        assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
        assert all(entry.startswith("vitcompress_loader.Compressed") for entry in auto_map.values())
