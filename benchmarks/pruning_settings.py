"""How the PruningTrainer defaults were chosen: UVC settings scored on held-out *training* images.

The embedded default is pruned to FLOPs ratio 0.5 with 300 steps (the setup of ``pruning_quality.py``)
on the training split minus its last 4,096 images, and each setting is scored on those 4,096 images,
never on the test set. One-shot magnitude pruning + 300 steps of distillation is the reference.

    python benchmarks/pruning_settings.py [SETTING ...]     # ~2 min per setting on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import tempfile

from _common import short_distillation_arguments
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=[*SETTINGS, "magnitude"])
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dense = load_model(str(DEFAULT_MODEL_DIR)).eval()
    teacher = load_model(str(DEFAULT_MODEL_DIR)).eval()
    pixels, labels = load_examples("default", str(DEFAULT_MODEL_DIR), "train", None)
    train = ExampleDataset(pixels[:-HELD_OUT], labels[:-HELD_OUT])
    held_out = [
        {"pixel_values": pixels[-HELD_OUT:][i : i + 512], "labels": labels[-HELD_OUT:][i : i + 512]}
        for i in range(0, HELD_OUT, 512)
    ]
    print("| setting | held-out top-1 |\n|---|---|")
    for name in args.settings:
        if name == "magnitude":
            model = compress(dense, CompressionConfig(method="pruning", target_flops_ratio=RATIO), progress=False)
            distill(model, teacher, train, STEPS)
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
        print(f"| {name} | {100 * topk_accuracies(model.eval(), held_out, ks=(1,))['top1']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
