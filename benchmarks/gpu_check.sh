#!/usr/bin/env bash
# The GPU check: everything this project can only measure on a GPU, in one command of under 8 minutes on one
# H100/H200. Run it first thing whenever the device tool lends a machine, then put the figures (device name,
# versions) into benchmarks/RESULTS.md:
#
#   device run:  bash benchmarks/gpu_check.sh          (timeout_s 540; results come back from $OUT)
#
# Steps, each under its own time limit, each recorded even when another fails:
#   1. benchmarks/gpu_kernels.py: the fused kernels in fp16 / bf16 / fp32 against float64 (single and grouped,
#      with the GELU epilogue, autotuned), and torch.compile of a compressed ViT-B keeping the kernel (the custom
#      op, one call per fused layer) with eager / compiled timings.
#   2. benchmarks/speed.py: per layer, fused vs two cuBLAS GEMMs vs dense (ranks 32..384, batch 1/8/64); end to
#      end, a ViT-B-shaped model at 50 % parameters, bf16 batch 64, dense vs factorized vs tuned.
# Targets (open until measured): fused >= 1.3x over two GEMMs at r <= 128; end-to-end >= 0.8 of the MAC reduction.
#
# The machine's own python3 (torch, triton, transformers) is used; the repository is put on PYTHONPATH. Its
# transformers was 5.17 in 2026-11 (KINDS.md); under 5.17 (with huggingface_hub 1.33) tests/test_tuning.py,
# test_compress.py and test_kernels.py pass here on CPU, and one output-recording test of test_loading.py fails,
# which neither step uses. To run on this project's transformers instead, carry wheels (the device tool's
# README): in the repo root here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.25.0
# and call the device with carry [".whl"]: this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/gpu_out}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
LOG="$RESULTS/gpu_check.log"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$LOG"

step() {  # step NAME SECONDS COMMAND...: run, keep its output, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
}

step kernels 180 python3 benchmarks/gpu_kernels.py --json "$RESULTS/gpu_kernels.json"
step speed 270 python3 benchmarks/speed.py --output "$RESULTS/speed.json"
cp benchmarks/RESULTS.md "$RESULTS/RESULTS.md" 2>/dev/null || true  # speed.py wrote its speed-cuda section there
echo "== done in $SECONDS s" | tee -a "$LOG"
