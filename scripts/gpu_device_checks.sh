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
# Each part writes into $OUT (default /tmp/gpu-device-checks) and goes on if an earlier one failed:
#   setup.txt      a. wheel install, nvidia-smi, versions, import check of the backends
#   cuda_tests.txt b/c. pytest -m cuda tests/test_cuda.py (tiny models on the GPU)
#   gpu.md         d. the benchmark's Markdown section (benchmarks/gpu_flux2_klein.py, full-size
#   gpu.json          FLUX.2-klein-4B shapes, random weights) and its raw numbers
#   gpu_log.txt       the benchmark's progress and errors (stderr)
#   summary.txt    each part's exit code and the seconds since the start
# The benchmark runs last and gets what is left of BUDGET_S seconds (default 540, at most 420),
# so the quick checks come back even if it runs long.
#
# Locally (no GPU, Python 3.11): SKIP_WHEELS=1 PYTHON=.venv/bin/python OUT=/tmp/gpuout \
#   GPU_BENCH_ARGS="--tiny-cpu --size 64 --steps 1 --batches 1,2 --repeats 1" bash scripts/gpu_device_checks.sh
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
read -r -a BENCH_ARGS <<< "${GPU_BENCH_ARGS:-}"
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
timeout 240 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -o addopts="" -ra \
  --durations=10 2>&1 | tee "$OUT/cuda_tests.txt"
record "c. pytest -m cuda tests/test_cuda.py" "${PIPESTATUS[0]}"

# -- d. the full-size FLUX.2-klein benchmark, last -----------------------------------------------------
left=$(( BUDGET_S - $(elapsed) - 15 ))
limit=$(( left < 420 ? left : 420 ))
if [ "$limit" -lt 60 ]; then
  echo "d. benchmark skipped: only ${left} s of the ${BUDGET_S} s budget left" | tee -a "$SUMMARY"
  FAILED=1
else
  echo "== benchmark (timeout ${limit} s)"
  timeout "$limit" "$PY" -m benchmarks.gpu_flux2_klein --json "$OUT/gpu.json" "${BENCH_ARGS[@]}" \
    > "$OUT/gpu.md" 2> >(tee "$OUT/gpu_log.txt" >&2)
  record "d. benchmarks.gpu_flux2_klein (124 = timed out)" "$?"
  cat "$OUT/gpu.md"
fi

echo "== summary"
cat "$SUMMARY"
exit "$FAILED"
