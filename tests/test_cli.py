import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_vitcompress import CompressedViTForImageClassification
from hf_vitcompress.cli import DEFAULT_MODEL_DIR, main
from hf_vitcompress.data import load_fashion_mnist, to_pixel_values

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.safetensors").exists(), reason="embedded default model not built"
)


def _top1(model, pixels, labels, batch_size):
    """Top-1 computed here, independently of hf_vitcompress.evaluation (in the CLI's batches, so that not even
    a last-bit difference between batch sizes can flip a prediction)."""
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in pixels.split(batch_size)])
    return int((predictions == labels).sum()) / len(labels)


def test_demo_prints_before_after_table(tmp_path, capsys):
    """The demo's table holds the real numbers: both top-1 figures equal an independent computation on the same
    test images, and the compressed model is within one point of the dense one (measured: 0.8555 and 0.8594
    on these 256 images). Same code path as the default demo, on less data (32 calibration images, 1 epoch)."""
    report, saved = tmp_path / "demo.json", tmp_path / "demo-model"
    arguments = ["demo", "--quiet", "--limit", "256", "--repeats", "1", "--latency-batch-size", "8"]
    arguments += ["--calibration-samples", "32", "--compensation-epochs", "1", "--json", str(report)]
    assert main([*arguments, "--output", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "compressed" in out and "top-1" in out and "GMACs" in out
    assert "evaluating on 256 test images" in out
    dense_row, small_row = json.loads(report.read_text())
    assert small_row["param_ratio"] <= 0.5 < dense_row["param_ratio"] == 1.0
    assert small_row["macs"] < dense_row["macs"]
    assert f"{100 * dense_row['top1']:.2f}%" in out and f"{100 * small_row['top1']:.2f}%" in out

    images, labels = load_fashion_mnist("test")  # what the demo evaluates on
    pixels, labels = to_pixel_values(images[:256]), torch.from_numpy(labels[:256])
    dense = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR)
    small = AutoModelForImageClassification.from_pretrained(saved)
    assert dense_row["top1"] == _top1(dense, pixels, labels, batch_size=500)  # the demo's batches
    assert small_row["top1"] == _top1(small, pixels, labels, batch_size=500)
    assert dense_row["top1"] > 0.8  # the shipped model really is a trained classifier
    assert small_row["top1"] >= dense_row["top1"] - 0.01


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
        "32",
        "--compensation-rank",
        "0",  # compensation through the CLI: test_demo_prints_before_after_table
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
    assert model.config.compression_provenance["base_model"] == str(DEFAULT_MODEL_DIR)
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
                "256",
                "--repeats",
                "1",
                "--latency-batch-size",
                "8",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    rows = json.loads(report.read_text())
    assert [row["model"] for row in rows] == ["dense", "compressed"]
    assert rows[1]["parameters"] < rows[0]["parameters"]
    # The reported top-1 of both rows is the real one, and the compressed model (ratio 0.6) stays within one
    # point of the dense (measured: 0.8555 dense, 0.8594 compressed, on these 256 test images).
    images, labels = load_fashion_mnist("test")
    pixels, labels = to_pixel_values(images[:256]), torch.from_numpy(labels[:256])
    dense = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR)
    assert rows[0]["top1"] == _top1(dense, pixels, labels, batch_size=64)  # evaluate's batches
    assert rows[1]["top1"] == _top1(model, pixels, labels, batch_size=64)
    assert rows[1]["top1"] >= rows[0]["top1"] - 0.01


def test_evaluate_reads_a_datasets_folder(tmp_path):
    import datasets

    images, labels = load_fashion_mnist("test_subset")
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
    # the images and labels really were read from the folder: the top-1 is the model's on those 40 images
    pixels, labels = to_pixel_values(images[:40]), torch.from_numpy(labels[:40])
    model = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR)
    assert row["model"] == "model" and row["top1"] == _top1(model, pixels, labels, batch_size=64)


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


@pytest.mark.parametrize(
    ("dense_class", "model_type"),
    [
        ("Dinov2Model", "vitcompress_dinov2"),
        ("Dinov2Backbone", "vitcompress_dinov2"),
        ("CLIPVisionModel", "vitcompress_clip_vision_model"),
        ("CLIPModel", "vitcompress_clip"),
        ("SiglipVisionModel", "vitcompress_siglip_vision_model"),
        ("SiglipModel", "vitcompress_siglip"),
    ],
)
def test_the_cli_compresses_a_backbone_as_a_backbone(tmp_path, capsys, dense_class, model_type):
    """The family and the kind of model come from the checkpoint: a DINOv2 backbone or a CLIP vision tower is
    compressed as one (not given a random classifier), its card is a feature extractor's, and the commands that
    need labels refuse it."""
    import transformers

    from .conftest import tiny_dinov2

    if dense_class.startswith("Dinov2"):
        dense = tiny_dinov2(getattr(transformers, dense_class), image_size=28, num_channels=1)  # Fashion-MNIST
    else:  # CLIP or SigLIP: a vision tower, or a two-tower model (image tower compressed, text tower kept)
        prefix = "CLIP" if dense_class.startswith("CLIP") else "Siglip"
        sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
        vision = getattr(transformers, f"{prefix}VisionConfig")(**sizes, image_size=28, patch_size=4, num_channels=1)
        if dense_class.endswith("VisionModel"):
            dense = getattr(transformers, dense_class)(vision)
        else:
            text = dict(
                sizes, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1
            )
            config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision.to_dict())
            dense = getattr(transformers, dense_class)(config)
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "small"
    args = ["--model", str(tmp_path / "dense"), "--output", str(out), "--calibration-samples", "32"]
    assert main(["compress", "--quiet", "--whitening", "gram", "--rank-allocation", "global", *args]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == [f"Compressed{dense_class}"] and saved["model_type"] == model_type
    assert main(["card", "--quiet", "--model", str(out)]) == 0
    two_towers = dense_class in ("CLIPModel", "SiglipModel")
    task = "zero-shot-image-classification" if two_towers else "image-feature-extraction"
    card = (out / "README.md").read_text()
    assert f"pipeline_tag: {task}" in card
    assert ("Only the\nimage tower is compressed" in card) == two_towers
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out)]) == 2
    assert f"saved as Compressed{dense_class}, which has no image classifier" in capsys.readouterr().err


def test_the_cli_compresses_and_evaluates_a_swin_classifier(tmp_path):
    """A Swin checkpoint (blocks in stages) goes through compress and evaluate like a ViT: the family comes from
    the checkpoint, and evaluate reports both models on the same images."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=28, patch_size=4, num_channels=1, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4
    )
    config.num_labels = 10
    transformers.SwinForImageClassification(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "small"
    args = ["--model", str(tmp_path / "dense"), "--output", str(out), "--calibration-samples", "32"]
    assert main(["compress", "--quiet", "--method", "head_factorization", "--target-param-ratio", "0.7", *args]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["CompressedSwinForImageClassification"]
    assert saved["model_type"] == "vitcompress_swin"
    report = tmp_path / "eval.json"
    evaluate = ["evaluate", "--quiet", "--model", str(out), "--limit", "64", "--repeats", "1", "--json", str(report)]
    assert main([*evaluate, "--latency-batch-size", "4"]) == 0
    dense_row, compressed_row = json.loads(report.read_text())
    assert compressed_row["parameters"] <= 0.7 * dense_row["parameters"]
    assert compressed_row["macs"] < dense_row["macs"]


def test_console_script_is_installed(capsys):
    """The ``hf-vitcompress`` entry point is installed and is ``main`` (checked in-process: starting a second
    interpreter only re-measures how long torch takes to import)."""
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name="hf-vitcompress")
    assert entry.value == "hf_vitcompress.cli:main" and entry.load() is main
    script = shutil.which("hf-vitcompress") or str(Path(sys.executable).with_name("hf-vitcompress"))
    assert Path(script).is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "demo" in capsys.readouterr().out


def test_shipped_model_is_a_plain_transformers_vit():
    model = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR)
    assert type(model).__name__ == "ViTForImageClassification"
    assert model(pixel_values=torch.zeros(1, 1, 28, 28)).logits.shape == (1, 10)


def test_finetune_card_and_push_from_the_shell(tmp_path, capsys, monkeypatch):
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    compressed, tuned = tmp_path / "c", tmp_path / "ft"
    common = ["--quiet"]
    assert (
        main(
            [
                "compress",
                *common,
                "--calibration-samples",
                "64",
                "--compensation-rank",
                "0",
                "--output",
                str(compressed),
            ]
        )
        == 0
    )

    def finetune(max_steps, *extra):
        return main(
            ["finetune", *common, "--model", str(compressed), "--output", str(tuned), "--max-steps", str(max_steps)]
            + ["--train-limit", "128", "--validation-size", "16", "--save-steps", "2", "--batch-size", "16"]
            + ["--limit", "64", "--repeats", "1", "--latency-batch-size", "8", "--kind", "hard"]
            + ["--logging-steps", "1", *extra]
        )

    assert finetune(4) == 0
    assert {"config.json", "model.safetensors", "vitcompress_evaluation.json", "preprocessor_config.json"} <= {
        p.name for p in tuned.iterdir()
    }
    model = AutoModelForImageClassification.from_pretrained(tuned)
    assert model.evaluation_report.matches(model) and model.evaluation_report.num_images == 64
    assert model.config.compression_provenance["finetuning"]["steps"] == 4
    assert (
        model.config.compression_plan
        == AutoModelForImageClassification.from_pretrained(compressed).config.compression_plan
    )
    # Resuming picks up the last checkpoint and trains on to the new max-steps.
    first_run = json.loads((tmp_path / "ft-checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert finetune(6) == 2 and "--resume" in capsys.readouterr().err  # old checkpoints are not silently mixed in
    assert finetune(6, "--resume") == 0
    resumed = json.loads((tmp_path / "ft-checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    # The first run's history (its 4-step learning-rate schedule) is carried on: it resumed, not restarted.
    assert resumed["log_history"][:2] == first_run["log_history"][:2]
    assert (
        AutoModelForImageClassification.from_pretrained(tuned).config.compression_provenance["finetuning"]["steps"] == 6
    )

    assert main(["card", "--quiet", "--model", str(tuned), "--repo-id", "someone/fmnist-vit-50"]) == 0
    card = (tuned / "README.md").read_text()
    report = AutoModelForImageClassification.from_pretrained(tuned).evaluation_report
    assert f"{100 * report.model['top1']:.2f}%" in card and "6 steps" in card

    uploads = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def create_commit(api, repo_id, operations, **kw):
        uploads.update({op.path_in_repo: op.path_or_fileobj for op in operations})
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{'1' * 40}", "", "", "1" * 40)

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    capsys.readouterr()
    assert (
        main(["push", "--quiet", "--model", str(tuned), "--repo-id", "someone/fmnist-vit-50", "--token", "hf_x"]) == 0
    )
    assert "commit/1111" in capsys.readouterr().out
    assert sorted(uploads) == sorted(
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "vitcompress_evaluation.json",
            "vitcompress_loader.py",
        ]
    )
    assert main(["push", "--quiet", "--model", str(tuned), "--repo-id", "not a repo id", "--token", "hf_x"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err


def test_finetune_without_a_teacher_says_what_to_do(tmp_path, capsys):
    compressed = tmp_path / "c"
    assert (
        main(
            [
                "compress",
                "--quiet",
                "--calibration-samples",
                "32",
                "--compensation-rank",
                "0",
                "--output",
                str(compressed),
            ]
        )
        == 0
    )
    config = json.loads((compressed / "config.json").read_text())
    config["compression_provenance"]["base_model"] = str(tmp_path / "gone")
    (compressed / "config.json").write_text(json.dumps(config))
    code = main(
        ["finetune", "--quiet", "--model", str(compressed), "--output", str(tmp_path / "ft"), "--max-steps", "1"]
    )
    assert code == 2 and "--teacher" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_head_factorization_and_rank_search_from_the_shell(tmp_path, capsys):
    compressed, searched = tmp_path / "hf", tmp_path / "hf-searched"
    base = ["--quiet", "--calibration-samples", "64"]
    assert (
        main(
            [
                "compress",
                *base,
                "--method",
                "head_factorization",
                "--target-param-ratio",
                "0.5",
                "--output",
                str(compressed),
            ]
        )
        == 0
    )
    args = ["search-ranks", "--quiet", "--model", str(compressed), "--output", str(searched), "--steps", "3"]
    assert main([*args, "--search-images", "128"]) == 0
    model = AutoModelForImageClassification.from_pretrained(searched)
    assert model.compression_plan.param_ratio <= 0.5
    assert model.config.compression_provenance["rank_search"]["images"] == 128
    assert main(["card", "--quiet", "--model", str(searched)]) == 0
    assert "searched for 3 steps" in (searched / "README.md").read_text()
    capsys.readouterr()
    assert (
        main(
            [
                "search-ranks",
                "--quiet",
                "--model",
                str(DEFAULT_MODEL_DIR),
                "--output",
                str(tmp_path / "x"),
                "--steps",
                "1",
            ]
        )
        == 2
    )
    assert "head_factorization" in capsys.readouterr().err


def test_prune_and_one_shot_pruning_from_the_shell(tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    from hf_vitcompress.evaluation import count_macs
    from hf_vitcompress.methods.pruning.structure import PrunableModel

    dense = PrunableModel.of(AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR))
    pruned = tmp_path / "pruned"
    arguments = ["prune", "--quiet", "--output", str(pruned), "--target-flops-ratio", "0.6", "--skip-blocks"]
    arguments += ["--max-steps", "6", "--train-limit", "128", "--validation-size", "16", "--save-steps", "3"]
    arguments += ["--batch-size", "16", "--limit", "64", "--repeats", "1", "--latency-batch-size", "8"]
    arguments += ["--logging-steps", "1"]
    assert main(arguments) == 0
    model = AutoModelForImageClassification.from_pretrained(pruned)
    macs = count_macs(model, torch.zeros(1, 1, 28, 28))
    assert int(0.6 * dense.dense_macs) - dense.mlp_macs(dense.blocks[0], 1) < macs <= int(0.6 * dense.dense_macs)
    provenance = model.config.compression_provenance
    assert provenance["pruning"]["algorithm"] == "uvc" and provenance["finetuning"]["steps"] == 6
    assert (pruned / "vitcompress_evaluation.json").exists()
    assert "compressed" in capsys.readouterr().out

    one_shot = tmp_path / "one-shot"
    arguments = ["compress", "--quiet", "--method", "pruning", "--target-flops-ratio", "0.5"]
    assert main([*arguments, "--calibration-samples", "32", "--output", str(one_shot)]) == 0
    model = AutoModelForImageClassification.from_pretrained(one_shot)
    assert count_macs(model, torch.zeros(1, 1, 28, 28)) <= int(0.5 * dense.dense_macs)
    # A budget out of reach is an error that names the reachable floor, and nothing is written.
    assert main([*arguments[:-1], "0.001", "--output", str(tmp_path / "none")]) == 2
    assert "out of reach" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_compress_with_tune_records_the_choices(tmp_path, capsys):
    out = tmp_path / "tuned"
    arguments = ["compress", "--quiet", "--calibration-samples", "64", "--tune", "--tune-batch-size", "16"]
    assert main([*arguments, "--compensation-rank", "0", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = AutoModelForImageClassification.from_pretrained(out)
    tuning = model.compression_plan.tuning
    assert tuning["device"] == "cpu" and tuning["example_inputs_shape"][0] == 16
    assert summary["merged_to_dense_by_tuning"] == len(tuning["merged_to_dense"])
    assert summary["factorized_layers"] + len(tuning["merged_to_dense"]) == len(tuning["layers"])
    # refused before any compression runs, with what to do
    assert main([*arguments[:-2], "--tune-batch-size", "100000", "--output", str(tmp_path / "x")]) == 2
    assert "more than the 64 calibration images; lower it" in capsys.readouterr().err
    assert (
        main([*arguments, "--method", "pruning", "--target-flops-ratio", "0.7", "--output", str(tmp_path / "p")]) == 2
    )
    assert "method 'pruning' leaves none" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "p").exists()


def test_export_writes_a_checked_onnx_graph_with_int8_and_the_card(tmp_path, capsys):
    """compress → card → export: the graph, its int8 form, the report of the parity check, the config with the
    plan and the card travel together; the checkpoint folder itself is never overwritten."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    small, onnx_dir = tmp_path / "small", tmp_path / "onnx"
    args = ["compress", "--quiet", "--target-param-ratio", "0.5", "--whitening", "gram", "--rank-allocation", "global"]
    assert main([*args, "--compensation-rank", "0", "--calibration-samples", "64", "--output", str(small)]) == 0
    assert main(["card", "--quiet", "--model", str(small)]) == 0
    record = ["evaluate", "--quiet", "--model", str(small), "--limit", "64", "--repeats", "1", "--record"]
    assert main([*record, "--latency-batch-size", "4"]) == 0  # its report travels with the card that quotes it
    capsys.readouterr()
    export = ["export", "--quiet", "--model", str(small), "--format", "onnx", "--limit", "16"]
    assert main([*export, "--output", str(onnx_dir), "--int8"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "model_int8.onnx" in out and "top-1 same" in out
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx",
        "model_int8.onnx",
        "onnx_export.json",
        "config.json",
        "README.md",
        "preprocessor_config.json",
        "vitcompress_evaluation.json",
    }
    umask = os.umask(0)
    os.umask(umask)
    for folder in (small, onnx_dir):  # ordinary folders, not the private staging folder they were written in
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    report = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert [row["batch"] for row in report["validation"]] == [1, 16]
    assert max(row["max_rel_diff"] for row in report["validation"]) <= 1e-4
    images, labels = load_fashion_mnist("test")
    pixels = to_pixel_values(images[:64])
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": pixels.numpy()})
    model = AutoModelForImageClassification.from_pretrained(small)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(pixel_values=pixels).logits, rtol=1e-4, atol=1e-5)
    (onnx_dir / "model_int8.onnx").write_bytes(b"stale")
    assert main([*export, "--output", str(onnx_dir), "--limit", "2"]) == 0  # an earlier export is replaced whole
    assert not (onnx_dir / "model_int8.onnx").exists() and (onnx_dir / "model.onnx").exists()
    assert main([*export, "--output", str(small)]) == 2  # the checkpoint is not an export folder
    assert "replace the checkpoint folder" in capsys.readouterr().err and (small / "model.safetensors").exists()


def test_validation_images_are_made_into_the_models_format():
    from transformers import ViTConfig

    from hf_vitcompress.cli import fit_to_model

    grey = torch.randn(2, 1, 28, 28)
    fitted = fit_to_model(grey, ViTConfig(image_size=16, num_channels=3))
    assert fitted.shape == (2, 3, 16, 16) and torch.equal(fitted[:, 0], fitted[:, 2])
    with pytest.raises(ValueError, match="2 channels"):
        fit_to_model(torch.randn(1, 2, 8, 8), ViTConfig(num_channels=3))
