"""What the benchmark scripts share: writing their section of RESULTS.md."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def short_distillation_arguments(output_dir: str, steps: int, **overrides):
    """The short soft-KD run every method comparison gives each variant (batch 64, lr 1e-4, cosine, alpha 0.5),
    with ``overrides`` (a recovery recipe's batch, learning rate, alpha)."""
    from hf_vitcompress import DistillationArguments

    values = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        alpha=0.5,
        kind="soft",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=steps,
    )
    return DistillationArguments(**{**values, **overrides})


def vit_b(image_size: int = 224, num_labels: int = 1000):
    """A ViT-B-shaped ``ViTForImageClassification`` (768 wide, 12 blocks, MLP 3072, patch 16), random init
    seeded with 0, in eval mode: the shape the speed and scale benchmarks measure."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=image_size,
        patch_size=16,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def resident_memory_mb() -> float:
    """This process's resident memory now (Linux ``VmRSS``), in MiB; NaN where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_environment() -> dict:
    """Where and on what code a benchmark ran: device, threads, torch, and the git commit of the library
    (with ``+uncommitted`` when ``hf_vitcompress/`` differs from it), so a recorded figure names its code."""
    import platform
    import subprocess

    import torch

    def git(*arguments: str) -> str:
        try:
            return subprocess.run(
                ["git", *arguments], cwd=HERE.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--", "hf_vitcompress"))
    code = commit + (" +uncommitted changes in hf_vitcompress/" if dirty else "")
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]  # other work on the machine slows timings: say how busy it was
    except OSError:
        load = float("nan")
    return {
        "device": f"CPU ({platform.machine()}, {threads} threads)",
        "torch": torch.__version__,
        "code": code,
        "load_average_1min_at_start": load,
        "description": f"CPU, {threads} threads, torch {torch.__version__}, code {code}, "
        f"1-min load average {load:.1f} at the start",
    }


def update_results_file(name: str, section: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace the ``name`` section of RESULTS.md (between its markers), keeping the other benchmarks' sections."""
    marker_start, marker_end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{marker_start}\n{section}\n{marker_end}"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nEvery figure here was produced by the command named in its section.\n"
    )
    if marker_start in text:
        text = re.sub(re.escape(marker_start) + ".*?" + re.escape(marker_end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def record_results(name: str, json_path: str | Path, render_only: bool, run, markdown) -> None:
    """Run a benchmark (or, with ``render_only``, reload its JSON), write the JSON, print its table and put it
    in RESULTS.md: the one way every recorded benchmark stores what it measured."""
    results = json.loads(Path(json_path).read_text()) if render_only else run()
    if not render_only:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    print(text)
    update_results_file(name, text)
