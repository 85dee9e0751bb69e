"""Test environment: offline, deterministic, Triton in interpreter mode (no GPU in CI)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: set before any import
# libgomp's default spin-then-sleep wait makes MKL's small LAPACK calls (the QR/SVD of every head product, the
# Cholesky of every Gram) hundreds of times slower when another process competes for the two cores: a 129x32 QR
# took 0.39 s instead of 60 us, and tests/test_quality_retention.py 80 s instead of 10 s on a busy machine.
# GEMM speed measured the same with it. Read when OpenMP starts: set before torch is imported (an
# OMP_WAIT_POLICY already in the environment wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Under pytest-xdist (the README's test command runs `-n 2`) each worker gets its share of the cores: two
# workers of two threads each on a 2-core machine oversubscribe it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))

TINY = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vit(num_labels: int = 5, **overrides) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**{**TINY, **overrides}, num_labels=num_labels)).eval()


def tiny_vit_model(**overrides) -> ViTModel:
    torch.manual_seed(0)
    return ViTModel(ViTConfig(**{**TINY, **overrides})).eval()


def tiny_deit(num_labels: int = 5) -> DeiTForImageClassification:
    torch.manual_seed(0)
    return DeiTForImageClassification(DeiTConfig(**TINY, num_labels=num_labels)).eval()


DINOV2_TINY = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2
)


def tiny_dinov2(cls: type, **overrides) -> torch.nn.Module:
    """A tiny DINOv2 of class ``cls`` (model, classifier or backbone, with or without registers) whose LayerScale
    and linear biases are random, not the identity and zero, so that a method that dropped or misplaced them
    would be seen."""
    torch.manual_seed(0)
    name = cls.__name__
    registers = name.startswith("Dinov2WithRegisters")
    extra = {"num_register_tokens": 2} if registers else {}
    if "ForImageClassification" in name:
        extra["num_labels"] = 5
    if name.endswith("Backbone"):
        extra["out_features"] = ["stage1", "stage2"]
    config_class = Dinov2WithRegistersConfig if registers else Dinov2Config
    model = cls(config_class(**{**DINOV2_TINY, **extra, **overrides})).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lambda1"):
                module.lambda1.uniform_(0.2, 1.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)  # transformers initializes them to 0, where a fold could drop them
    return model


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
