"""Export a model (compressed or dense) to ONNX, checked against PyTorch with onnxruntime, with int8 on top.

What leaves PyTorch is the image path only (:func:`hf_vitcompress.evaluation.image_forward`): the model on
``pixel_values``, or a two-tower model's (CLIP, SigLIP) ``get_image_features``. Its outputs are the tensors of
the model's output, named as there (``logits``; ``last_hidden_state`` and ``pooler_output``; a backbone's
``feature_maps.0``, ``feature_maps.1``, ...); hidden states and attentions are not exported.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath), with a dynamic batch
axis, and optionally dynamic height and width for the families that interpolate their position embeddings.
Factorized layers export as their two matmuls (the fused Triton kernel stays in PyTorch). Before anything is
written where the caller asked, onnxruntime runs the graph on the validation images at two batch sizes (which
also proves the batch axis dynamic) and the largest difference from PyTorch, relative to the largest PyTorch
output, must stay under ``tolerance``; otherwise :class:`OnnxExportError` and nothing is left behind.

Attention is traced as transformers' eager path (not ``sdpa``, whose decomposition guards every attention map
against NaN rows), and head-factorized attention with mixed head ranks pads head by head: both measured faster
in onnxruntime. ``int8=True`` adds ``model_int8.onnx`` (:func:`quantize_int8`): onnxruntime's pre-processing
(constant folding of what depends on weights only), its dynamic quantization (int8 weights of every MatMul and
Gemm, per output channel, activations quantized per batch at run time), and the large fp32 tables left over (the
patch embedding, the position table) stored int8, weight-only. It applies to a factorized layer's two matmuls
and to the dense leftovers alike, and needs no calibration data. Its difference from PyTorch is
measured and recorded, not bounded: int8 is an approximation, and its accuracy is the user's to check (the
``deploy`` benchmark measures it on the embedded default).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration.data import patch_size_of, takes_interpolation
from .evaluation import EVALUATION_FILE_NAME, image_forward, kept_forward_state
from .staging import staged_directory

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
REPORT_FILE = "onnx_export.json"
COPIED_FILES = ("preprocessor_config.json", "README.md", EVALUATION_FILE_NAME)
"""Files of the source checkpoint folder that travel with the export (the image processor, the model card,
the measured report the card quotes); ``config.json``, which holds the compression plan, is always written."""
DEFAULT_TOLERANCE = 1e-4

_REQUIRED = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


class OnnxExportError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes (or could not be built)."""


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote and measured; saved as ``onnx_export.json`` beside the graph."""

    onnx_file: str
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, list[str]]
    opset: int
    image_size: list[int]
    tolerance: float
    validation: list[dict[str, Any]]
    int8_file: str | None = None
    int8_validation: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    model_class: str = ""

    @property
    def max_rel_diff(self) -> float:
        return max(row["max_rel_diff"] for row in self.validation)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def require_onnx() -> None:
    """Raise a clear ImportError naming the extra when the ONNX packages are missing."""
    missing = [package for module, package in _REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'hf_vitcompress[onnx]' (onnx, onnxscript, onnxruntime)."
        )


def _flatten_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a model output, in its order; tuples of tensors (a backbone's feature maps) as
    ``name.i``. Hidden states and attentions are left out (they are asked for, not the model's result)."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    items = output.items() if hasattr(output, "items") else enumerate(output)
    flat = []
    for name, value in items:
        if name in ("hidden_states", "attentions", "vision_model_output", "reshaped_hidden_states"):
            continue
        if isinstance(value, torch.Tensor):
            flat.append((str(name), value))
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            flat.extend((f"{name}.{i}", v) for i, v in enumerate(value))
    return flat


class ImageGraph(nn.Module):
    """The image path of ``model`` as a module of ``pixel_values`` alone returning a flat tuple of tensors: what
    the ONNX graph computes. The output names are found by one forward on the example images."""

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.output_names: list[str] = []

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {"pixel_values": pixel_values}
        if self.interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        flat = _flatten_outputs(image_forward(self.model)(**kwargs))
        self.output_names = [name for name, _ in flat]
        return tuple(tensor for _, tensor in flat)


def _check_model(model: nn.Module) -> None:
    parameters = list(model.parameters())
    if any(p.is_meta for p in parameters):
        raise ValueError(
            "The model is on the meta device (its weights were never loaded): load it with from_pretrained without "
            "device_map='meta' / init_empty_weights, then export."
        )
    dtypes = {p.dtype for p in parameters if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise TypeError(
            f"ONNX export takes a float32 model (the parity check is in float32); this one holds {sorted(map(str, dtypes))}. "
            "Export model.float(); the int8 form (int8=True) is where the size goes down."
        )


def _compare(
    session: Any, pixel_values: torch.Tensor, reference: tuple[torch.Tensor, ...], names: list[str]
) -> dict[str, Any]:
    """Run the ONNX session on the images PyTorch gave ``reference`` for; the largest difference, absolute and
    relative to the largest PyTorch value, over every output."""
    try:
        got = session.run(names, {"pixel_values": pixel_values.numpy()})
    except Exception as error:  # onnxruntime's errors derive from Exception only
        raise OnnxExportError(
            f"onnxruntime could not run the exported graph on images of shape {tuple(pixel_values.shape)}: {error}"
        ) from error
    max_abs = max_rel = 0.0
    for name, ref, out in zip(names, reference, got, strict=True):
        out = torch.from_numpy(out)
        if out.shape != ref.shape:
            raise OnnxExportError(f"ONNX output {name} has shape {tuple(out.shape)}, PyTorch's {tuple(ref.shape)}.")
        for who, tensor in (("PyTorch", ref), ("the ONNX graph", out)):
            if not torch.isfinite(tensor).all():  # max() would skip a NaN difference and pass the check
                raise OnnxExportError(
                    f"{who} gives non-finite values in {name} on the validation images: nothing can be compared."
                )
        diff = (out - ref).abs().max().item()
        scale = ref.abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    row = {"batch": int(pixel_values.shape[0]), "image_size": list(pixel_values.shape[-2:])}
    row.update(max_abs_diff=max_abs, max_rel_diff=max_rel)
    if names[0] == "logits":
        agree = (torch.from_numpy(got[0]).argmax(-1) == reference[0].argmax(-1)).float().mean().item()
        row["top1_agreement"] = agree
    return row


def _validation_batches(pixel_values: torch.Tensor, dynamic_image_size: bool, model: nn.Module) -> list[torch.Tensor]:
    """The images at two batch sizes (1 and all of them), so a graph whose batch axis is not dynamic fails; with
    ``dynamic_image_size``, also at the size the graph was traced at (not theirs)."""
    batches = [pixel_values[:1]] if len(pixel_values) == 1 else [pixel_values[:1], pixel_values]
    if dynamic_image_size:
        batches.append(_off_size(pixel_values, model))
    return batches


def _off_size(pixel_values: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The images resized to another size than the model's own (one patch taller, two wider).

    A dynamic-size graph is traced there: position-embedding interpolation is skipped at the model's own size by a
    branch on the shape, which ``torch.export`` would bake into the graph (fixing the size); traced elsewhere the
    graph always interpolates, which at the model's own size is the identity (bicubic at scale 1)."""
    patch_h, patch_w = patch_size_of(model.config)
    height, width = pixel_values.shape[-2:]
    size = (height + patch_h, width + 2 * patch_w)
    return nn.functional.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)


def _session(path: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's errors derive from Exception only
        raise OnnxExportError(f"onnxruntime could not load the exported graph {path.name}: {error}") from error


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("transformers", "onnx", "onnxscript", "onnxruntime"):
        with suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's exporter logs a warning per torchvision op it cannot register (this project never installs
    torchvision) and torch.export a deprecation warning of its own; neither is about the user's model."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Trace attention as transformers' eager path (two matmuls around a softmax), not ``sdpa``.

    ``torch.onnx`` decomposes ``scaled_dot_product_attention`` into the same matmuls plus an ``IsNaN`` / ``Where``
    guard over every attention map (for rows a mask empties, which an image model never has): measured on
    DINOv2-S at 224 px, batch 32, that guard was 8 % of the dense graph's onnxruntime time, and the eager graph
    15 % faster, dense and compressed alike. Every config the model's modules read (a two-tower model has
    several) is set back as it was, also on failure; the PyTorch references stay the caller's own path."""
    from transformers import PretrainedConfig

    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    kept = {key: getattr(config, "_attn_implementation_internal", None) for key, config in configs.items()}
    try:
        for config in configs.values():
            if kept[id(config)] == "sdpa":
                config._attn_implementation_internal = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = kept[key]


def _strip_debug_metadata(path: Path) -> Any:
    """Drop what the dynamo exporter records on every node for debugging (the PyTorch stack trace, module path,
    FX node name: 0.5 MB of the embedded default's 5.4 MB graph), which no runtime reads; the graph, its
    shapes and the weights stay as they are. Returns the saved ``ModelProto``."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(model, str(path))
    return model


def _check_output_dir(output_dir: Path, source_dir: str | Path | None) -> None:
    """An existing ``output_dir`` is replaced only when it holds an earlier export: never the checkpoint itself,
    never a folder of other files."""
    if source_dir is not None and output_dir.resolve() == Path(source_dir).resolve():
        raise ValueError(f"The export would replace the checkpoint folder {output_dir}: give another --output folder.")
    if output_dir.exists() and (
        not output_dir.is_dir() or (any(output_dir.iterdir()) and not (output_dir / REPORT_FILE).exists())
    ):
        raise ValueError(
            f"{output_dir} exists and is not an earlier ONNX export (it has no {REPORT_FILE}); nothing was replaced. "
            "Give a new or empty folder."
        )


LEFTOVER_MIN_ELEMENTS = 1024  # smaller fp32 tensors (class tokens, biases, norms, scales) stay as they are


def quantize_int8(source: str | Path, target: str | Path) -> Path:
    """int8 weights for an fp32 graph, in three steps:

    1. onnxruntime's pre-processing for quantization (its ``quant_pre_process``: onnx shape inference and the
       basic, standard-operator graph optimizations), which folds what depends on weights only: at a fixed image size
       DINOv2's 1,370-position table and its bicubic resize become the 257 positions it uses (2.1 -> 0.4 MB);
    2. onnxruntime dynamic quantization: int8 weights (per output channel) for every MatMul and Gemm,
       activations quantized per batch at run time;
    3. the large fp32 tables left over (the patch embedding's convolution, the position table) stored int8 too
       (:func:`_int8_leftovers`)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process first is printed through the root logger every call
    try:
        with tempfile.TemporaryDirectory(prefix="hf_vitcompress_int8_") as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            # onnxruntime's symbolic shape inference fails on some exported graphs (Swin-v2's Expand): skipped,
            # the optimizations need only the shapes onnx's own inference gives
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    finally:
        root.setLevel(level)
    _int8_leftovers(Path(target))
    return Path(target)


def _int8_leftovers(path: Path) -> None:
    """Store every fp32 initializer of at least two dimensions and ``LEFTOVER_MIN_ELEMENTS`` elements that dynamic
    quantization left alone as int8 with one fp32 scale per channel (symmetric, zero point 0), read through a
    ``DequantizeLinear``: weight-only, the computation stays fp32.

    Why: the patch embedding (a ``Conv``, which dynamic quantization would run as the slow ``ConvInteger``) and
    the position table do not shrink with a factorization, so in fp32 they weigh four times their int8 share:
    on DINOv2-S they were 3.0 of 24.9 MB of the dense int8 graph and 3.0 of 14.0 MB of the factorized one.
    The channel axis is a convolution's output channels, else the last axis (a table's hidden units)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    conv_weights = {node.input[1] for node in graph.node if node.op_type == "Conv" and len(node.input) > 1}
    dequantize, kept = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            kept.append(tensor)
            continue
        values = numpy_helper.to_array(tensor)
        if values.size < LEFTOVER_MIN_ELEMENTS:
            kept.append(tensor)
            continue
        axis = 0 if tensor.name in conv_weights else values.ndim - 1
        channels = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])
        scale = (np.abs(channels).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero channel: any scale gives zeros
        shape = [1] * values.ndim
        shape[axis] = -1
        quantized = np.clip(np.rint(values / scale.reshape(shape)), -127, 127).astype(np.int8)
        names = (f"{tensor.name}_int8", f"{tensor.name}_int8_scale", f"{tensor.name}_int8_zero_point")
        kept += [
            numpy_helper.from_array(quantized, names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros(values.shape[axis], np.int8), names[2]),
        ]
        dequantize.append(helper.make_node("DequantizeLinear", list(names), [tensor.name], axis=axis))
    if not dequantize:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [*dequantize, *graph.node]  # a graph's nodes are in topological order: the tables come first
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def export_onnx(
    model: nn.Module,
    output_dir: str | Path,
    pixel_values: torch.Tensor,
    *,
    dynamic_image_size: bool = False,
    int8: bool = False,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    source_dir: str | Path | None = None,
) -> OnnxExportReport:
    """Export ``model``'s image path to ``output_dir/model.onnx`` and check it against PyTorch on ``pixel_values``.

    ``pixel_values``: real, preprocessed images ``[n, C, H, W]`` (a handful: the graph is traced on two of them and
    validated on 1 and on all ``n``). ``dynamic_image_size`` also makes height and width dynamic, for a model that
    serves any size: DINOv2 always interpolates its position embeddings, ViT-like forwards that take
    ``interpolate_pos_encoding`` get it as True in the graph; a model whose forward depends on the traced size
    is refused with :class:`OnnxExportError`. ``source_dir``: the checkpoint
    folder the model came from, whose image processor config and model card are copied along.

    Writes ``model.onnx`` (and ``model_int8.onnx`` with ``int8``), ``config.json`` (with the compression plan),
    ``onnx_export.json`` (this report) and the copied files, into a staging folder moved into place at the end:
    a failed export or a failed parity check leaves ``output_dir`` as it was.
    """
    require_onnx()
    _check_model(model)
    pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.dim() != 4 or not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a float [n, channels, height, width] tensor of preprocessed images; got "
            f"{tuple(pixel_values.shape)} {pixel_values.dtype}."
        )
    pixel_values = pixel_values.float().cpu()
    was_training = model.training
    model.eval()
    try:
        return _export(model, output_dir, pixel_values, dynamic_image_size, int8, opset, tolerance, source_dir)
    finally:
        model.train(was_training)  # the caller's model comes back in the mode it was given in


def _export(
    model: nn.Module,
    output_dir: str | Path,
    pixel_values: torch.Tensor,
    dynamic_image_size: bool,
    int8: bool,
    opset: int | None,
    tolerance: float,
    source_dir: str | Path | None,
) -> OnnxExportReport:
    """:func:`export_onnx` past its argument checks, with ``model`` in eval mode."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"Export the model from the CPU (it is on {device}): model.cpu(), then export_onnx.")
    graph = ImageGraph(model, interpolate_pos_encoding=dynamic_image_size and takes_interpolation(image_forward(model)))
    graph.eval()
    example = pixel_values[: min(2, len(pixel_values))]
    if dynamic_image_size:
        example = _off_size(example, model)
    try:
        with torch.no_grad(), kept_forward_state(model):
            graph(example)
    except Exception as error:
        if not dynamic_image_size:
            raise
        raise OnnxExportError(
            f"{type(model).__name__} does not run at another size than its own ({tuple(example.shape[-2:])}): export "
            f"without dynamic_image_size. ({type(error).__name__}: {error})"
        ) from error
    names = list(graph.output_names)
    if not names:
        raise OnnxExportError(f"{type(model).__name__}'s output holds no tensor to export.")
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch}
    dynamic_axes = {"pixel_values": ["batch"]}
    if dynamic_image_size:
        patch_h, patch_w = patch_size_of(model.config)
        axes.update({2: torch.export.Dim("height", min=patch_h), 3: torch.export.Dim("width", min=patch_w)})
        dynamic_axes["pixel_values"] += ["height", "width"]

    output_dir = Path(output_dir)
    _check_output_dir(output_dir, source_dir)
    with staged_directory(output_dir) as staging:
        onnx_path = staging / ONNX_FILE
        try:
            with torch.no_grad(), kept_forward_state(model), _quiet_exporter(), _eager_attention(model):
                program = torch.onnx.export(
                    graph,
                    (example,),
                    input_names=["pixel_values"],
                    output_names=names,
                    dynamic_shapes={"pixel_values": axes},
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
                program.save(str(onnx_path), external_data=False)
        except OnnxExportError:
            raise
        except Exception as error:  # torch.export's own errors are long; keep them as the cause
            hint = (
                " With dynamic_image_size the graph must serve every height and width; this model's forward depends on "
                "the size it is traced at: export without it (one image size)."
                if dynamic_image_size
                else ""
            )
            raise OnnxExportError(
                f"torch.onnx.export could not export {type(model).__name__}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}.{hint}"
            ) from error
        saved = _strip_debug_metadata(onnx_path)
        opset_used = next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx"))
        dims = saved.graph.input[0].type.tensor_type.shape.dim
        fixed = [
            name for axis, name in zip(axes, dynamic_axes["pixel_values"], strict=True) if not dims[axis].dim_param
        ]
        if fixed:  # the exporter may specialize an axis to the traced size without an error
            raise OnnxExportError(
                f"The exported graph fixed the {', '.join(fixed)} of pixel_values to the traced size: "
                f"{type(model).__name__}'s forward depends on it."
                + (" Export without dynamic_image_size (one image size)." if dynamic_image_size else "")
            )
        batches = _validation_batches(pixel_values, dynamic_image_size, model)
        with torch.no_grad(), kept_forward_state(model):  # PyTorch's outputs, once for the fp32 and the int8 graph
            references = [graph(images) for images in batches]
        session = _session(onnx_path)
        validation = [
            _compare(session, images, reference, names) for images, reference in zip(batches, references, strict=True)
        ]
        worst = max(row["max_rel_diff"] for row in validation)
        if not worst <= tolerance:
            raise OnnxExportError(
                f"The ONNX graph differs from PyTorch by {worst:.3g} (max |difference| / max |output|) on the validation "
                f"images, above the tolerance {tolerance:g}; nothing was written. "
                + (
                    "With dynamic_image_size the graph must serve every size, and this model's forward depends on the "
                    "size it was traced at: export without it (one image size)."
                    if dynamic_image_size
                    else "Report it with the model's config."
                )
            )
        report = OnnxExportReport(
            onnx_file=ONNX_FILE,
            inputs=["pixel_values"],
            outputs=names,
            dynamic_axes=dynamic_axes,
            opset=opset_used,
            image_size=list(pixel_values.shape[-2:]),
            tolerance=tolerance,
            validation=validation,
            versions=_versions(),
            model_class=type(model).__name__,
        )
        if int8:
            try:
                quantize_int8(onnx_path, staging / INT8_FILE)
            except Exception as error:  # onnxruntime's tools raise whatever their passes meet
                raise OnnxExportError(
                    f"onnxruntime could not quantize the exported graph to int8 ({type(error).__name__}: {error}); "
                    "nothing was written. Export without int8 for the fp32 graph."
                ) from error
            int8_session = _session(staging / INT8_FILE)
            report.int8_validation = [
                _compare(int8_session, images, reference, names)
                for images, reference in zip(batches, references, strict=True)
            ]
            report.int8_file = INT8_FILE
        model.config.to_json_file(str(staging / "config.json"))
        if source_dir is not None:
            for name in COPIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy(Path(source_dir) / name, staging / name)
        report.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.suffix == ".onnx"}
        report.save(staging)
    return report
