"""Offline metrics, model cards and push_to_hub (the Hub is replaced by patched HfApi methods)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import AutoModelForImageClassification, EvalPrediction

from hf_vitcompress import (
    CompressionConfig,
    EvaluationReport,
    HubTokenError,
    ModelCardTemplateError,
    build_model_card,
    compress,
    evaluate_model,
    metrics,
)
from hf_vitcompress.evaluation import EVALUATION_FILE_NAME

from .conftest import tiny_vit


@pytest.fixture
def measured(pixels):
    dense = tiny_vit()
    small = compress(dense, CompressionConfig(target_param_ratio=0.5, compensation_rank=0), pixels, progress=False)
    labels = torch.arange(len(pixels)) % 5
    batches = [{"pixel_values": pixels[i : i + 16], "labels": labels[i : i + 16]} for i in range(0, len(pixels), 16)]
    rows, report = evaluate_model(
        small,
        batches,
        pixels[:8],
        reference=dense,
        repeats=3,
        dataset="Fashion-MNIST",
        dataset_id="zalando-datasets/fashion_mnist",
        dataset_split="test",
    )
    return small, dense, rows, report


# -- metrics --------------------------------------------------------------------------------------
def test_topk_accuracy_and_compute_metrics():
    scores = np.array([[0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0], [0.9, 0.0, 0.05, 0.01, 0.02, 0.03, 0.04]])
    labels = np.array([2, 0])
    assert metrics.topk_accuracy(scores, labels) == {"top1": 0.5, "top5": 1.0}
    assert metrics.topk_accuracy(scores[:, :4], labels) == {"top1": 0.5}  # top-5 of 4 classes is not a measurement
    prediction = EvalPrediction(predictions=(scores, scores), label_ids=labels)  # tuple outputs: first is logits
    assert metrics.top1(prediction) == {"top1": 0.5}
    assert metrics.top1_top5(prediction) == {"top1": 0.5, "top5": 1.0}
    with pytest.raises(ValueError, match="label space"):
        metrics.topk_accuracy(scores, np.array([2, 9]))


def test_evaluate_module_loads_offline_from_the_package():
    metric = metrics.load_topk_accuracy()  # evaluate.load(<path inside the package>), HF_HUB_OFFLINE=1
    scores = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, size=64)
    for start in range(0, 64, 16):
        metric.add_batch(predictions=scores[start : start + 16], references=labels[start : start + 16])
    assert metric.compute() == pytest.approx(metrics.topk_accuracy(scores, labels))


# -- model cards ------------------------------------------------------------------------------------
def card_metadata(card: ModelCard) -> dict:
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_holds_the_measured_numbers_and_valid_metadata(measured):
    small, dense, rows, report = measured
    card = build_model_card(small, repo_id="someone/tiny-vit-50", license="apache-2.0")
    text = str(card)
    dense_row, small_row = rows
    assert f"{small_row['top1'] * 100:.2f}%" in text and f"{dense_row['top1'] * 100:.2f}%" in text
    assert f"{small_row['parameters']:,}" in text and f"{dense_row['parameters']:,}" in text
    assert (
        f"{small_row['latency_s'] * 1e3:.2f}" in text
        and f"{dense_row['latency_s'] / small_row['latency_s']:.2f}x" in text
    )
    assert f"{small_row['macs'] / 1e9:.4f}" in text and f"{dense_row['macs'] / 1e9:.4f}" in text
    assert "48 calibration images" in text and "someone/tiny-vit-50" in text
    assert '"target_param_ratio": 0.5' in text  # the config
    metadata = card_metadata(card)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert "hf-vitcompress" in metadata["tags"] and metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"]
    results = metadata["model-index"][0]["results"][0]
    assert results["metrics"][0] == {"type": "accuracy", "value": round(small_row["top1"], 4), "name": "Top-1 accuracy"}
    assert results["dataset"]["split"] == "test"
    assert card.data.eval_results[0].metric_value == round(small_row["top1"], 4)  # parsed back by huggingface_hub
    assert "base_model" not in metadata  # the base was built in memory: not a Hub id, so not claimed


def test_card_leaves_out_what_was_not_measured(pixels):
    small = compress(tiny_vit(), CompressionConfig(target_param_ratio=0.5, compensation_rank=0), pixels, progress=False)
    text = str(build_model_card(small))
    metadata = card_metadata(ModelCard(text))
    assert "model-index" not in metadata and "metrics" not in metadata
    assert "| top-1 accuracy" not in text and "speedup" not in text and "Nothing was measured" in text


def test_stale_measurement_is_dropped(measured):
    small, *_ = measured
    with torch.no_grad():
        small.classifier.bias.add_(1.0)  # "more fine-tuning" after the measurement
    text = str(build_model_card(small))
    assert "| top-1 accuracy" not in text and "measured on different weights" in text


def test_missing_template_variable_is_a_clear_error(measured, tmp_path):
    small, *_ = measured
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} by {{ author }}\n")
    with pytest.raises(ModelCardTemplateError, match="'author' is undefined"):
        build_model_card(small, template_path=template)
    assert "by Ada" in str(build_model_card(small, template_path=template, author="Ada"))
    with pytest.raises(ValueError, match="no compression plan"):
        build_model_card(tiny_vit())


def test_report_travels_with_save_and_load(measured, tmp_path):
    small, _, _, report = measured
    small.save_pretrained(tmp_path)
    assert (tmp_path / EVALUATION_FILE_NAME).is_file()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.evaluation_report == report and loaded.evaluation_report.matches(loaded)
    (tmp_path / EVALUATION_FILE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid evaluation report"):
        EvaluationReport.load(tmp_path)


# -- push -------------------------------------------------------------------------------------------
class FakeHub:
    """Records what HfApi.create_repo / create_commit receive."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        hub = self  # patched onto the class: the HfApi instance comes first
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
        monkeypatch.setattr(
            HfApi,
            "create_commit",
            lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw),
        )

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs, api.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = (
                Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
            )
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=kwargs.get("commit_message"),
            commit_description="",
            oid="0" * 40,
        )


def test_push_uploads_exactly_the_expected_files_and_they_load_back(measured, monkeypatch, tmp_path, pixels):
    small, *_ = measured
    hub = FakeHub(monkeypatch)
    small.push_to_hub("someone/tiny-vit-50", token="hf_fake", private=True)
    assert hub.repos == [("someone/tiny-vit-50", {"private": True, "exist_ok": True}, "hf_fake")]
    (commit,) = hub.commits
    files = commit["files"]
    assert sorted(files) == sorted(
        ["README.md", "config.json", "model.safetensors", "vitcompress_loader.py", EVALUATION_FILE_NAME]
    )
    assert "someone/tiny-vit-50" in files["README.md"].decode()
    for name, content in files.items():  # the uploaded folder is a loadable checkpoint
        (tmp_path / name).write_bytes(content)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.compression_plan == small.config.compression_plan
    assert loaded.config.auto_map["AutoModelForImageClassification"].startswith("vitcompress_loader.")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, small.eval()(pixel_values=pixels).logits)


def test_push_refuses_bad_repo_ids_and_missing_tokens(measured, monkeypatch):
    small, *_ = measured
    hub = FakeHub(monkeypatch)
    for bad in ("a/b/c", "no spaces/allowed", "", "x" * 200):
        with pytest.raises(ValueError, match="not a valid Hub repo id"):
            small.push_to_hub(bad, token="hf_fake")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubTokenError, match="hf auth login"):
        small.push_to_hub("someone/tiny")
    assert hub.repos == [] and hub.commits == []  # nothing was created


def test_card_error_creates_no_repo(measured, monkeypatch, tmp_path):
    small, *_ = measured
    hub = FakeHub(monkeypatch)
    template = tmp_path / "card.md"
    template.write_text("{{ undefined_thing }}")
    with pytest.raises(ModelCardTemplateError):
        small.push_to_hub("someone/tiny", token="hf_fake", template_path=template)
    assert hub.repos == []


def test_push_options_are_checked(measured, monkeypatch, tmp_path):
    small, *_ = measured
    hub = FakeHub(monkeypatch)
    with pytest.raises(TypeError, match="unexpected argument.*privte"):
        small.push_to_hub("someone/tiny", token="hf_fake", privte=True)
    clash = tmp_path / "config.json"
    clash.write_text("{}")
    with pytest.raises(ValueError, match="would replace"):
        small.push_to_hub("someone/tiny", token="hf_fake", extra_files=[clash])
    assert hub.repos == []
    # A bare name becomes user/name on the Hub; the card's loading snippet uses the full id.
    monkeypatch.setattr(
        HfApi, "create_repo", lambda api, repo_id, **kw: RepoUrl(f"https://huggingface.co/me/{repo_id}")
    )
    small.push_to_hub("tiny", token="hf_fake")
    assert hub.commits[-1]["repo_id"] == "me/tiny"
    assert 'from_pretrained("me/tiny")' in hub.commits[-1]["files"]["README.md"].decode()


def test_subset_results_stay_out_of_the_model_index(pixels):
    from hf_vitcompress.cli import describe_data

    assert describe_data("default", "test", 10_000)["dataset_id"] == "zalando-datasets/fashion_mnist"
    subset = describe_data("default", "test", 2_000)
    assert subset["dataset_id"] is None and "2,000 images" in subset["dataset"]
    small = compress(tiny_vit(), CompressionConfig(target_param_ratio=0.5, compensation_rank=0), pixels, progress=False)
    labels = torch.arange(len(pixels)) % 5
    evaluate_model(small, [{"pixel_values": pixels, "labels": labels}], pixels[:4], repeats=1, **subset)
    card = build_model_card(small)
    assert "model-index" not in card_metadata(card) and "2,000 images of the test split" in str(card)
