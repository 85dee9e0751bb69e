import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_vitcompress import CompressedViTForImageClassification
from hf_vitcompress.cli import DEFAULT_MODEL_DIR, main
from hf_vitcompress.data import load_fashion_mnist

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.safetensors").exists(), reason="embedded default model not built"
)


def test_demo_prints_before_after_table(tmp_path, capsys):
    report = tmp_path / "demo.json"
    code = main(
        ["demo", "--quiet", "--limit", "300", "--repeats", "2", "--calibration-samples", "128", "--json", str(report)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "dense" in out and "compressed" in out and "top-1" in out and "GMACs" in out
    dense, small = json.loads(report.read_text())
    assert small["param_ratio"] <= 0.5 < dense["param_ratio"] == 1.0
    assert small["macs"] < dense["macs"] and 0.0 <= small["top1"] <= 1.0


def test_compress_then_evaluate(tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "compress",
        "--quiet",
        "--target-param-ratio",
        "0.6",
        "--calibration",
        "default",
        "--calibration-samples",
        "64",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    assert {"config.json", "model.safetensors", "vitcompress_loader.py", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no staging folder left behind
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, CompressedViTForImageClassification)
    assert model.config.compression_config["base_model"] == str(DEFAULT_MODEL_DIR)
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--quiet",
                "--model",
                str(out),
                "--data",
                "default",
                "--limit",
                "200",
                "--repeats",
                "2",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    rows = json.loads(report.read_text())
    assert [row["model"] for row in rows] == ["dense", "compressed"]
    assert rows[1]["parameters"] < rows[0]["parameters"]


def test_evaluate_reads_a_datasets_folder(tmp_path):
    import datasets

    images, labels = load_fashion_mnist("test_subset")
    from hf_vitcompress.data import to_pixel_values

    datasets.Dataset.from_dict(
        {"pixel_values": to_pixel_values(images[:40]).numpy(), "label": labels[:40]}
    ).save_to_disk(tmp_path / "ds")
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    assert (
        main(
            [
                "evaluate",
                "--quiet",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "ds"),
                "--repeats",
                "1",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["model"] == "model" and 0.0 <= row["top1"] <= 1.0


def test_bad_ratio_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["compress", "--quiet", "--target-param-ratio", "1.5", "--output", str(tmp_path / "x")]) == 2
    assert "target_param_ratio must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unreachable_ratio_leaves_nothing_behind(tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                "--quiet",
                "--target-param-ratio",
                "0.001",
                "--calibration-samples",
                "32",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "smallest reachable ratio" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "hf_vitcompress.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "demo" in result.stdout


def test_shipped_model_is_a_plain_transformers_vit():
    model = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR)
    assert type(model).__name__ == "ViTForImageClassification"
    assert model(pixel_values=torch.zeros(1, 1, 28, 28)).logits.shape == (1, 10)
