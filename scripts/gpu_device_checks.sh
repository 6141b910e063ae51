#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run on a lent GPU machine (no internet there).
#
# Run from the repository root with the wheel folder .whl/ beside it (the packages the GPU image
# lacks, built for CPython 3.12 on manylinux x86_64):
#   bash scripts/gpu_device_checks.sh
# The wheels (the image has torch, transformers, accelerate, numpy, pillow; see
# scripts/gpu_wheels.txt for the rest, with the versions the tests ran with) are fetched with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r scripts/gpu_wheels.txt
# Each part writes into $OUT (default /tmp/gpu-device-checks) and goes on if an earlier one failed
# (8 files: what a lent machine sends back at most):
#   setup.txt      a. wheel install, nvidia-smi, versions, import check of the backends
#   cuda_tests.txt b/c. pytest -m cuda tests/test_cuda.py (tiny models on the GPU)
#   gpu.md         d. benchmarks/gpu_flux2_klein.py (full-size FLUX.2-klein-4B shapes, random
#   gpu.json          weights): seconds per image by batch, the four-image trajectory's graph share
#                     (and the same trajectory with an instant generator: the graph's own work)
#   vllm.md        e. benchmarks/gpu_vllm_engine.py beside it on the same GPU: critic requests at
#   vllm.json         1, 8 and 32 in flight on transformers `generate` and on the in-process vLLM
#                     engine (Qwen3-VL-8B shapes, random weights from the config), tokens and
#                     verdicts per second; batch runs (arun_batch) at concurrency 8 and 32
#   bench_log.txt  both benchmarks' progress and errors (stderr)
#   summary.txt    each part's exit code and the seconds since the start
# The whole run fits in BUDGET_S seconds (default 540, for a 10-minute command): d gets at most
# D_MAX_S (150), e what is left (at most 420) and passes its budget on, so it skips a part that
# no longer fits and its report is written after each part even if it is cut short.
#
# vLLM is not in the GPU image and its wheels (with the torch it pins) are far over what travels
# with the tree: point VLLM_SITE at a folder where vllm is installed (pip install --target) and e
# puts it first on PYTHONPATH; without it, e measures transformers and the batch runs (scripted
# planner and critic) and its report and summary say "skipped: vllm not importable".
#
# Locally (no GPU, Python 3.11), about a minute:
#   SKIP_WHEELS=1 SKIP_CUDA_TESTS=1 PYTHON=.venv/bin/python OUT=/tmp/gpuout \
#   GPU_BENCH_ARGS="--tiny-cpu --size 64 --steps 1 --batches 1,2 --repeats 1" \
#   GPU_VLLM_ARGS="--tiny-cpu" bash scripts/gpu_device_checks.sh
# and with VLLM_PYTHON=.vllm-venv/bin/python (scripts/setup_vllm_cpu.sh) plus a folder linking the
# main venv's diffusers in VLLM_SITE, e runs the vLLM engine on the CPU too (about 3 minutes).
set -uo pipefail
export PYTHONUNBUFFERED=1
# Nothing can be fetched on the GPU machine: never wait on a hub or a tracing endpoint.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export LANGSMITH_TRACING=false LANGCHAIN_TRACING_V2=false
export TOKENIZERS_PARALLELISM=false

OUT="${OUT:-/tmp/gpu-device-checks}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
BUDGET_S="${BUDGET_S:-540}"
D_MAX_S="${D_MAX_S:-150}"
read -r -a BENCH_ARGS <<< "${GPU_BENCH_ARGS:-}"
read -r -a VLLM_ARGS <<< "${GPU_VLLM_ARGS:-}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STARTED=$(date +%s)
FAILED=0

elapsed() { echo $(( $(date +%s) - STARTED )); }
record() {
  echo "$1: rc=$2 at $(elapsed) s" | tee -a "$SUMMARY"
  [ "$2" -eq 0 ] || FAILED=1
}

# -- a. wheels, machine, versions, imports --------------------------------------------------------
if [ "${SKIP_WHEELS:-0}" = 1 ]; then
  echo "SKIP_WHEELS=1: using $PY's own packages" | tee "$OUT/setup.txt"
  export PYTHONPATH="$PWD/src"
else
  echo "== pip install .whl/*.whl into $SITE" | tee "$OUT/setup.txt"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl 2>&1 | tee -a "$OUT/setup.txt"
  rc=${PIPESTATUS[0]}
  record "a. install wheels" "$rc"
  if [ "$rc" -ne 0 ]; then
    echo "the wheels did not install: nothing else can run" | tee -a "$SUMMARY"
    exit 1
  fi
  export PYTHONPATH="$SITE:$PWD/src"
fi

{
  echo "== nvidia-smi"
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  echo "== versions and imports (PYTHONPATH=$PYTHONPATH)"
  "$PY" - << 'EOF'
import importlib
import sys
from importlib import metadata

print("python", sys.version.replace("\n", " "), "at", sys.executable)
import torch

cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
      torch.cuda.get_device_name(0) if cuda else "")
names = ["diffusers", "transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors", "xgrammar",
         "triton", "pydantic", "pydantic-core", "pydantic-settings", "langgraph", "langgraph-checkpoint",
         "langgraph-checkpoint-sqlite", "langchain-core", "langsmith", "aiosqlite", "typer", "click", "rich",
         "typing-extensions", "numpy", "pillow", "regex", "httpx", "anyio", "pytest"]
for name in names:
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} MISSING")
failed = 0
for module in ["interleave_thinker", "interleave_thinker.cli", "interleave_thinker.generators.diffusers_backend",
               "interleave_thinker.models.transformers_chat", "interleave_thinker.models.constrained",
               "pydantic", "langgraph", "diffusers", "transformers", "xgrammar"]:
    try:
        loaded = importlib.import_module(module)
        print(f"import {module}: ok ({getattr(loaded, '__file__', None)})")
    except Exception as exc:  # report every failing import, not just the first
        failed += 1
        print(f"import {module}: FAILED {type(exc).__name__}: {exc}")
sys.exit(1 if failed else 0)
EOF
} 2>&1 | tee -a "$OUT/setup.txt"
record "a. versions and imports" "${PIPESTATUS[0]}"

# -- b/c. the CUDA tests -------------------------------------------------------------------------------
# addopts is cleared: the image has no pytest-socket (--disable-socket) and the tests need no asyncio
# plugin (they call asyncio.run themselves).
if [ "${SKIP_CUDA_TESTS:-0}" = 1 ]; then
  echo "SKIP_CUDA_TESTS=1: not run" | tee "$OUT/cuda_tests.txt"
else
  timeout 180 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -o addopts="" -ra \
    --durations=10 2>&1 | tee "$OUT/cuda_tests.txt"
  record "c. pytest -m cuda tests/test_cuda.py" "${PIPESTATUS[0]}"
fi
: > "$OUT/bench_log.txt"

# -- d. the full-size FLUX.2-klein benchmark and the trajectory's graph share --------------------------
left=$(( BUDGET_S - $(elapsed) - 15 ))
limit=$(( left < D_MAX_S ? left : D_MAX_S ))
if [ "$limit" -lt 60 ]; then
  echo "d. benchmark skipped: only ${left} s of the ${BUDGET_S} s budget left" | tee -a "$SUMMARY"
  FAILED=1
else
  echo "== d. benchmarks.gpu_flux2_klein (timeout ${limit} s)"
  timeout "$limit" "$PY" -m benchmarks.gpu_flux2_klein --json "$OUT/gpu.json" "${BENCH_ARGS[@]}" \
    > "$OUT/gpu.md" 2> >(tee -a "$OUT/bench_log.txt" >&2)
  record "d. benchmarks.gpu_flux2_klein (124 = timed out)" "$?"
  cat "$OUT/gpu.md"
fi

# -- e. the vLLM engine and transformers beside FLUX.2-klein, and the batch runs, last -------------------
left=$(( BUDGET_S - $(elapsed) - 15 ))
limit=$(( left < 420 ? left : 420 ))
if [ "$limit" -lt 90 ]; then
  echo "e. vLLM benchmark skipped: only ${left} s of the ${BUDGET_S} s budget left" | tee -a "$SUMMARY"
  FAILED=1
else
  echo "== e. benchmarks.gpu_vllm_engine (timeout ${limit} s, VLLM_SITE=${VLLM_SITE:-unset})"
  # The module stops starting parts 20 s before the limit: what it measured is written by then.
  PYTHONPATH="${VLLM_SITE:+$VLLM_SITE:}$PYTHONPATH" timeout "$limit" "${VLLM_PYTHON:-$PY}" \
    -m benchmarks.gpu_vllm_engine --budget-s $(( limit - 20 )) --markdown "$OUT/vllm.md" \
    --json "$OUT/vllm.json" "${VLLM_ARGS[@]}" > /dev/null 2> >(tee -a "$OUT/bench_log.txt" >&2)
  record "e. benchmarks.gpu_vllm_engine (124 = timed out)" "$?"
  # Not a failure of the script, but the measurement the issue asks for is missing: say so.
  grep -o "skipped: vllm not importable[^*]*" "$OUT/vllm.md" 2> /dev/null | head -1 \
    | sed 's/^/e. vLLM engine: /' | tee -a "$SUMMARY"
  cat "$OUT/vllm.md" 2> /dev/null
fi

echo "== summary"
cat "$SUMMARY"
exit "$FAILED"
