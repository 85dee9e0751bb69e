"""Measure what compression bought: top-1, parameters, FLOPs and CPU latency, dense vs compressed.

FLOPs are counted as multiply-accumulates (MACs) per image, the convention of the ViT papers
(DeiT-S ≈ 4.6 G): every linear and convolution *and* the two attention matmuls (QKᵀ and A·V),
measured with hooks on a real forward pass so that whatever the model really runs is counted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import OUTPUT_PROJECTION_NAMES, HeadFactorizedAttention
from .layers import LowRankLinear
from .metrics.functional import topk_accuracy
from .plan import count_parameters, set_submodule
from .shared_input import SharedInputMixin, merge_shared_input

CLASSIC_PROJECTION_NAMES = ("query", "key", "value")  # BERT-style XSelfAttention (Data2Vec-vision, Swin-v2)


def _attention_projections(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The query and value projections of a transformers self-attention, ``None`` for any other module: q/k/v
    projections and an output one (``o_proj``; CLIP/SigLIP ``out_proj``), or the classic ``query`` / ``key`` /
    ``value`` self-attention whose output projection lives in a sibling module."""
    has_output = any(hasattr(module, name) for name in OUTPUT_PROJECTION_NAMES)
    if has_output and all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
        return module.q_proj, module.v_proj
    if all(isinstance(getattr(module, name, None), nn.Module) for name in CLASSIC_PROJECTION_NAMES):
        return module.query, module.value
    return None


def image_forward(model: nn.Module) -> Callable[..., Any]:
    """What runs ``model`` on images alone: the model itself, or a two-tower model's (CLIPModel, SiglipModel)
    ``get_image_features``, whose forward needs text too. It is the image path, the part compression changes."""
    return model.get_image_features if hasattr(model, "get_text_features") else model


@torch.no_grad()
def count_macs(model: nn.Module, pixel_values: torch.Tensor, attn_implementation: str | None = None) -> int:
    """Multiply-accumulates per image of one forward pass on ``pixel_values`` (of the image tower, for a two-tower
    model such as ``CLIPModel``).

    ``attn_implementation`` (e.g. ``"eager"``, ``"sdpa"``) counts what the model would run under that
    attention implementation instead of its current one: a :class:`HeadFactorizedAttention` with unequal
    query/key and value widths zero-pads them to one width for every fused kernel but not for eager
    attention, so the two counts differ (dense attentions cost the same under every implementation).
    """
    total = 0

    def linear_hook(module: nn.Linear, args: tuple, _output: Any) -> None:
        nonlocal total
        total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def conv_hook(module: nn.Conv2d, _args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * kernel

    def attention_hook(module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]  # CLIP's layers pass it by keyword
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if isinstance(module, HeadFactorizedAttention):  # what really runs: the zero-padded per-head widths
            total += batch * tokens * tokens * module.attention_matmul_width(attn_implementation)
        else:
            query, value = _attention_projections(module)
            total += batch * tokens * tokens * (query.out_features + value.out_features)

    def multihead_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, _output: Any) -> None:
        nonlocal total
        query, key = (args[i] if len(args) > i else kwargs[name] for i, name in ((0, "query"), (1, "key")))
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        batch, queries, keys, width = query.shape[0], query.shape[1], key.shape[1], module.embed_dim
        # q and output projections per query, k and v per key, scores and the weighted sum per pair
        total += batch * ((2 * queries + 2 * keys) * width * width + 2 * queries * keys * width)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif _attention_projections(module) is not None or isinstance(module, HeadFactorizedAttention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
        elif isinstance(module, nn.MultiheadAttention):  # SigLIP's pooling head: projections run as F.linear
            handles.append(module.register_forward_hook(multihead_hook, with_kwargs=True))
    try:
        with kept_forward_state(model):  # a count must not change the model (Swin's layers keep a clamped window)
            image_forward(model)(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return total // pixel_values.shape[0]


@contextmanager
def kept_forward_state(model: nn.Module) -> Iterator[nn.Module]:
    """Run forwards of ``model`` that leave it as it was: what a forward may overwrite (``FamilyAdapter.forward_state``,
    e.g. the window Swin's layers clamp to the input) is recorded on entry and put back on exit. A model of no
    known family is left alone."""
    from .families import family_for  # the families build on this module's neighbours: imported when needed

    try:
        family = family_for(model)
    except TypeError:
        yield model
        return
    state = family.forward_state_of(model)
    try:
        yield model
    finally:
        family.restore_forward_state(model, state)


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module], pixel_values: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per forward for each model, timed *interleaved* in one run so that ratios are fair."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            image_forward(model)(pixel_values=pixel_values)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            image_forward(model)(pixel_values=pixel_values)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def topk_accuracies(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` over ``{"pixel_values", "labels"}`` batches.

    A top-k that is trivially 1.0 (k ≥ number of classes) is left out rather than reported.
    """
    model.eval()
    logits, labels = [], []
    for batch in batches:
        if "labels" not in batch:
            raise ValueError("Evaluation batches have no 'labels': top-1 needs labelled data.")
        logits.append(model(pixel_values=batch["pixel_values"]).logits.float().cpu())
        labels.append(batch["labels"].cpu())
    if not labels:
        raise ValueError("No labelled evaluation data: top-1 needs batches with 'labels'.")
    return topk_accuracy(torch.cat(logits).numpy(), torch.cat(labels).numpy(), ks)


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``LowRankLinear`` merged back into a dense ``nn.Linear`` (and every shared
    down-projection into its dense projections).

    Same function and same architecture as the uncompressed model: the fair latency/FLOPs baseline
    when the original dense checkpoint is not at hand.
    """
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(dense, name, module.merge())
    for name, module in list(dense.named_modules()):
        if isinstance(module, SharedInputMixin):
            set_submodule(dense, name, merge_shared_input(module))
    return dense


def dense_architecture(model: nn.Module) -> nn.Module:
    """A randomly initialized dense model of the architecture ``model`` was compressed from.

    For *costs* only (MACs, latency, parameters): it has the original shapes (every head, neuron and
    block, no factors) but not the original weights, which a compressed checkpoint no longer holds.
    """
    from transformers import PreTrainedModel

    from .modeling_utils import CompressedModelMixin

    base = next(
        cls
        for cls in type(model).__mro__
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, CompressedModelMixin)
    )
    parameter = next(model.parameters())
    return base(copy.deepcopy(model.config)).to(device=parameter.device, dtype=parameter.dtype).eval()


def compare_models(
    models: dict[str, nn.Module],
    example_pixels: torch.Tensor,
    eval_batches: Iterable[dict[str, torch.Tensor]] | None = None,
    reference: str | None = None,
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """One row per model: parameters, MACs, latency (and top-1 when labelled data is given), plus
    ratios against ``reference`` (the first model by default), all measured in this one call."""
    reference = reference or next(iter(models))
    batches = list(eval_batches) if eval_batches is not None else None
    latency = measure_latency(models, example_pixels, repeats=repeats)
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {
            "model": name,
            "parameters": count_parameters(model),
            "macs": count_macs(model, example_pixels[:1]),
            "latency_s": latency[name],
        }
        if batches is not None:
            row.update(topk_accuracies(model, batches))
        rows.append(row)
    base = next(row for row in rows if row["model"] == reference)
    for row in rows:
        row["param_ratio"] = row["parameters"] / base["parameters"]
        row["macs_ratio"] = row["macs"] / base["macs"]
        row["speedup"] = base["latency_s"] / row["latency_s"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`compare_models` rows."""
    header = ["model", "params", "ratio", "GMACs/img", "ratio", "latency ms", "speedup"]
    has_top1 = any("top1" in row for row in rows)
    has_top5 = any("top5" in row for row in rows)
    if has_top1:
        header.append("top-1")
    if has_top5:
        header.append("top-5")
    lines = []
    for row in rows:
        cells = [
            row["model"],
            f"{row['parameters']:,}",
            f"{row['param_ratio']:.3f}",
            f"{row['macs'] / 1e9:.4f}",
            f"{row['macs_ratio']:.3f}",
            f"{row['latency_s'] * 1e3:.2f}",
            f"{row['speedup']:.2f}x",
        ]
        if has_top1:
            cells.append(f"{100 * row['top1']:.2f}%" if "top1" in row else "-")
        if has_top5:
            cells.append(f"{100 * row['top5']:.2f}%" if "top5" in row else "-")
        lines.append(cells)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def render(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(cells) for cells in lines])


# -- what was measured, kept with the model ---------------------------------------------------------
EVALUATION_FILE_NAME = "vitcompress_evaluation.json"
MEASURED_KEYS = ("parameters", "macs", "latency_s", "top1", "top5")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer: ties a measurement to the exact weights it was taken on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_cpu() -> str:
    """``"<processor> (N threads), torch X"``: what latency numbers were measured on."""
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{processor} ({torch.get_num_threads()} threads), torch {torch.__version__}"


@dataclass
class EvaluationReport:
    """Numbers measured on one model (and optionally its dense reference, in the same run).

    Only what was measured is present: ``model`` / ``reference`` hold a subset of
    ``parameters, macs, latency_s, top1, top5``. ``weights_fingerprint`` is the fingerprint of the
    measured weights; a model whose weights have changed since (more fine-tuning) no longer matches,
    and its model card leaves these numbers out instead of printing stale ones.
    """

    model: dict[str, float]
    weights_fingerprint: str
    reference: dict[str, float] | None = None
    reference_name: str | None = None
    dataset: str | None = None
    dataset_id: str | None = None
    dataset_split: str | None = None
    num_images: int | None = None
    latency_setup: dict[str, Any] | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown evaluation report fields: {sorted(unknown)}.")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / EVALUATION_FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EvaluationReport | None:
        path = Path(directory) / EVALUATION_FILE_NAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{path} is not a valid evaluation report ({error}); delete it or re-run evaluate."
            ) from error

    def matches(self, model: nn.Module) -> bool:
        return self.weights_fingerprint == weights_fingerprint(model)

    @classmethod
    def from_rows(
        cls,
        rows: list[dict[str, Any]],
        model: nn.Module,
        subject: str,
        reference: str | None = None,
        **metadata: Any,
    ) -> EvaluationReport:
        """From :func:`compare_models` rows: ``subject`` is the row of ``model``, ``reference`` the dense row."""
        by_name = {row["model"]: row for row in rows}

        def measured(row: dict[str, Any]) -> dict[str, float]:
            return {key: row[key] for key in MEASURED_KEYS if key in row}

        return cls(
            model=measured(by_name[subject]),
            weights_fingerprint=weights_fingerprint(model),
            reference=measured(by_name[reference]) if reference else None,
            reference_name=reference,
            **metadata,
        )


def evaluate_model(
    model: nn.Module,
    eval_batches: Iterable[dict[str, torch.Tensor]] | None,
    example_pixels: torch.Tensor,
    *,
    reference: nn.Module | None = None,
    reference_name: str = "dense",
    name: str = "compressed",
    repeats: int = 20,
    dataset: str | None = None,
    dataset_id: str | None = None,
    dataset_split: str | None = None,
    source: str = "hf_vitcompress.evaluate_model",
) -> tuple[list[dict[str, Any]], EvaluationReport]:
    """Measure ``model`` (against ``reference`` when given) and attach the report to it.

    Returns the :func:`compare_models` rows and an :class:`EvaluationReport`, which is also stored as
    ``model.evaluation_report``: ``save_pretrained`` keeps it next to the weights and the model card
    reads it.
    """
    batches = list(eval_batches) if eval_batches is not None else None
    models = {reference_name: reference, name: model} if reference is not None else {name: model}
    rows = compare_models(models, example_pixels, eval_batches=batches, repeats=repeats)
    report = EvaluationReport.from_rows(
        rows,
        model,
        name,
        reference_name if reference is not None else None,
        dataset=dataset,
        dataset_id=dataset_id,
        dataset_split=dataset_split,
        num_images=sum(len(batch["pixel_values"]) for batch in batches) if batches else None,
        latency_setup={
            "device": describe_cpu() if example_pixels.device.type == "cpu" else str(example_pixels.device),
            "batch_size": int(example_pixels.shape[0]),
            "repeats": repeats,
            "statistic": "median",
        },
        source=source,
    )
    model.evaluation_report = report
    return rows, report
