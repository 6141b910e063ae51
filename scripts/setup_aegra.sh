#!/usr/bin/env bash
# Build the Python 3.12 virtual environment that runs Aegra (the production agent server, README
# "Scale-out with Aegra") with this project, for the live tests in tests/test_aegra.py. Usage:
#
#   scripts/setup_aegra.sh [VENV_DIR]          # default: .aegra-venv in the repository root
#   export INTERLEAVE_AEGRA_PYTHON=VENV_DIR/bin/python
#
# Why a venv of its own: aegra-api needs Python >= 3.12 (on 3.11 pip quietly installs 0.6.0,
# which has no workers and no crash recovery), while the project's main venv is 3.11. The
# project is installed editable with its `server` extra, so the venv runs this checkout's code.
#
# Idempotent: a marker holding what was installed (this checkout, pyproject's dependencies and
# the server extra) makes a second run skip the install; a changed pin reinstalls. Delete the
# folder to rebuild from scratch.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Absolute, so the export line printed at the end works from any folder.
VENV_DIR="$(realpath -m "${1:-$REPO_ROOT/.aegra-venv}")"
PY="$VENV_DIR/bin/python"
MARKER="$VENV_DIR/.interleave-aegra"

started=$SECONDS

# A Python 3.12: $AEGRA_BASE_PYTHON, else python3.12 on the PATH. Under pyenv the python3.12
# shim fails unless 3.12 is among the active versions, so fall back to pyenv's own install.
find_python() {
    local candidate
    for candidate in "${AEGRA_BASE_PYTHON:-}" python3.12; do
        if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    if command -v pyenv >/dev/null; then
        for candidate in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
            if [[ -x "$candidate" ]]; then
                echo "$candidate"
                return
            fi
        done
    fi
    echo "error: no Python 3.12 found; install it or set AEGRA_BASE_PYTHON" >&2
    exit 1
}

# pip echoes a warning for every package its local extra indexes lack; hiding only those keeps
# real errors visible. The `|| true` stops grep's "no lines" status from failing the pipe.
quiet_pip() {
    "$PY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

if [[ ! -x "$PY" ]]; then
    "$(find_python)" -m venv "$VENV_DIR"
fi

wanted="$(cd "$REPO_ROOT" && "$PY" -c '
import json, os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps({"repo": os.getcwd(), "dependencies": project["dependencies"],
                  "server": project["optional-dependencies"]["server"]}, sort_keys=True))
')"
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$wanted" ]]; then
    echo "Aegra already set up in $VENV_DIR (remove $MARKER to reinstall)"
else
    quiet_pip install --quiet --upgrade pip
    # quiet_pip hides pip's exit status behind the pipe; pipefail brings it back.
    quiet_pip install --quiet --editable "$REPO_ROOT[server]"
    # The real check: Aegra's app and our graph and routes import in this venv.
    (cd "$VENV_DIR" && "$PY" -c '
import importlib.metadata as m
import aegra_api.main, interleave_thinker.aegra
print("aegra-api", m.version("aegra-api"), "langgraph", m.version("langgraph"))')
    printf '%s' "$wanted" > "$MARKER"
fi
echo "set up in $((SECONDS - started)) s"
echo "export INTERLEAVE_AEGRA_PYTHON=$PY"
