"""How the PruningTrainer defaults were chosen: UVC settings scored on held-out *training* images.

The embedded default is pruned to FLOPs ratio 0.5 with 300 steps (the setup of ``pruning_quality.py``)
on the training split minus its last 4,096 images, and each setting is scored on those 4,096 images,
never on the test set. One-shot magnitude pruning + 300 steps of distillation is the reference.

    python benchmarks/pruning_settings.py                 # all settings, ~2 min each on 2 idle CPU cores
    python benchmarks/pruning_settings.py --render        # only rebuild the RESULTS.md section from the JSON

A full run (all settings) writes ``benchmarks/pruning_settings.json`` and the ``pruning_settings`` section of
RESULTS.md; naming settings (``python benchmarks/pruning_settings.py SETTING ...``) only prints them.
Needs the full Fashion-MNIST training set (``apt-get install dataset-fashion-mnist`` or
``HF_VITCOMPRESS_FASHION_MNIST``).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from _common import HERE, run_environment, short_distillation_arguments, update_results_file
from pruning_quality import distill
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, PruningTrainer, compress
from hf_vitcompress.cli import load_examples, load_model
from hf_vitcompress.data import DEFAULT_MODEL_DIR, ExampleDataset
from hf_vitcompress.evaluation import topk_accuracies

RATIO, STEPS, HELD_OUT = 0.5, 300, 4096
SETTINGS = {  # all other options at their defaults (warm-up 0.1, search 0.4, count lr 0.05, proximal 0.01)
    "dual lr 0.5 (the first default)": {"pruning_dual_lr": 0.5},
    "dual lr 0.1 (the default now)": {"pruning_dual_lr": 0.1},
    "dual lr 0.5, no warm-up, search 0.2": {
        "pruning_dual_lr": 0.5,
        "pruning_warmup_ratio": 0.0,
        "pruning_search_ratio": 0.2,
    },
    "dual lr 0.5, no proximal shrink": {"pruning_dual_lr": 0.5, "pruning_proximal_lr": 0.0},
    "dual lr 0.1, no proximal shrink": {"pruning_dual_lr": 0.1, "pruning_proximal_lr": 0.0},
    "dual lr 0.1, proximal 0.002": {"pruning_dual_lr": 0.1, "pruning_proximal_lr": 0.002},
    "dual lr 0.1, warm-up 0.05, search 0.3": {
        "pruning_dual_lr": 0.1,
        "pruning_warmup_ratio": 0.05,
        "pruning_search_ratio": 0.3,
    },
}


def markdown(results: dict) -> str:
    lines = [
        "## How the pruning defaults were chosen (`benchmarks/pruning_settings.py`)",
        "",
        f"Command: `python benchmarks/pruning_settings.py` ({results['environment']['description']}). `PruningTrainer` "
        f"on the embedded default at FLOPs ratio {RATIO} with `skip_blocks=True` and {STEPS} steps (the "
        "`pruning_quality.py` recipe), trained on the training split minus its last "
        f"{HELD_OUT:,} images and scored on those {HELD_OUT:,} held-out *training* images (never the test set; one "
        "standard error is about 0.54 points). Reference: one-shot magnitude pruning + the same distillation.",
        "",
        "| setting | held-out top-1 |",
        "|---|---|",
        *[f"| {name} | {100 * top1:.2f} |" for name, top1 in results["top1"].items()],
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=None)
    parser.add_argument("--json", default=str(HERE / "pruning_settings.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.json).read_text())
        update_results_file("pruning_settings", markdown(results))
        print(markdown(results))
        return
    full = not args.settings
    settings = args.settings or [*SETTINGS, "magnitude"]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    environment = run_environment()
    dense = load_model(str(DEFAULT_MODEL_DIR)).eval()
    teacher = load_model(str(DEFAULT_MODEL_DIR)).eval()
    pixels, labels = load_examples("default", str(DEFAULT_MODEL_DIR), "train", None)
    if len(pixels) <= HELD_OUT:
        raise SystemExit("needs the full Fashion-MNIST training set (see the module docstring)")
    train = ExampleDataset(pixels[:-HELD_OUT], labels[:-HELD_OUT])
    held_out = [
        {"pixel_values": pixels[-HELD_OUT:][i : i + 512], "labels": labels[-HELD_OUT:][i : i + 512]}
        for i in range(0, HELD_OUT, 512)
    ]
    print("| setting | held-out top-1 |\n|---|---|")
    top1 = {}
    for name in settings:
        if name == "magnitude":
            model = compress(dense, CompressionConfig(method="pruning", target_flops_ratio=RATIO), progress=False)
            distill(model, teacher, train, STEPS)
            name = "magnitude one-shot + distillation"
        else:
            config = CompressionConfig(method="pruning", target_flops_ratio=RATIO, skip_blocks=True, **SETTINGS[name])
            with tempfile.TemporaryDirectory() as output:
                trainer = PruningTrainer(
                    model=copy.deepcopy(dense),
                    teacher=teacher,
                    compression_config=config,
                    args=short_distillation_arguments(output, STEPS),
                    train_dataset=train,
                )
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                model = trainer.export()
        top1[name] = topk_accuracies(model.eval(), held_out, ks=(1,))["top1"]
        print(f"| {name} | {100 * top1[name]:.2f} |", flush=True)
    if full:
        results = {"environment": environment, "top1": top1}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        update_results_file("pruning_settings", markdown(results))


if __name__ == "__main__":
    main()
