"""The results of ``gpu_vllm_engine`` and their Markdown section for GPU_REPORT.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTION_TITLE = "i. Planner and critic on the in-process vLLM engine beside FLUX.2-klein-4B"

@dataclass
class Window:
    """Replies to requests kept ``concurrency`` in flight for a time window."""

    engine: str
    concurrency: int
    replies: int
    seconds: float
    output_tokens: int
    prompt_tokens: int
    pool_used_up: bool = False
    error: str | None = None

    @property
    def verdicts_per_s(self) -> float:
        return self.replies / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


@dataclass
class BatchRun:
    concurrency: int
    prompts: int
    seconds: float
    images: int
    generator_calls: int
    generator_s: float
    planner_calls: int
    critic_calls: int
    failed: int
    error: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def outside_share(self) -> float:
        """Share of the wall time outside generator calls."""
        return 1.0 - self.generator_s / self.seconds if self.seconds else 0.0


@dataclass
class Results:
    device: str
    setup: dict[str, Any]
    windows: list[Window] = field(default_factory=list)
    batches: list[BatchRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _ratio(results: Results, concurrency: int) -> float | None:
    by = {(w.engine, w.concurrency): w for w in results.windows if w.error is None}
    fast, slow = by.get(("vllm", concurrency)), by.get(("transformers", concurrency))
    if fast is None or slow is None or not slow.verdicts_per_s:
        return None
    return fast.verdicts_per_s / slow.verdicts_per_s


def markdown(results: Results) -> str:
    """The section for GPU_REPORT.md."""
    lines = [f"## {SECTION_TITLE} on {results.device}", ""]
    if results.setup.get("smoke"):
        lines += ["**Smoke test on tiny shapes on the CPU: these numbers say nothing about the GPU.**", ""]
    lines += _setup_lines(results)
    lines += ["", *_window_lines(results), "", *_batch_lines(results)]
    if results.notes:
        lines += ["", *[f"- {note}" for note in results.notes]]
    lines += [
        "",
        "Caveats: random weights (the replies are noise of the right length; the arithmetic is "
        "the trained model's, as shapes and dtypes are the same); a tokenizer learned from our own "
        "prompts stands in for Qwen's; nothing was downloaded. Configs and where each number comes "
        "from: `benchmarks/gpu_vllm_engine.py` and `benchmarks/gpu_qwen3_vl.py`.",
        "",
    ]
    return "\n".join(lines)


def _setup_lines(results: Results) -> list[str]:
    setup = results.setup
    size = setup["size"]
    if setup.get("vllm_skipped"):
        engine = f"- vLLM engine: **{setup['vllm_skipped']}**; its rows are missing below."
    else:
        engine = (
            f"- vLLM engine: {json.dumps(setup.get('engine', {}), sort_keys=True)}; started in "
            f"{results.timings.get('vllm_start_s', float('nan')):.1f} s (first request included)."
        )
    lines = [
        f"- Vision-language model: {setup.get('model', '?')}; {setup.get('dtype', '?')}. Tokenizer: "
        f"built offline ({setup.get('vocab', '?')} ids, Qwen's special token ids); a critic request "
        f"(the critic prompt, two {size}x{size} PNG images) is {setup.get('prompt_tokens', '?')} "
        f"prompt tokens; every reply {setup['max_tokens']} tokens (ignore_eos / min_new_tokens: "
        "random weights never stop by themselves).",
        f"- Generator: {setup.get('generator', '?')}.",
        f"- Software: {setup.get('software', '?')}.",
        engine,
    ]
    if results.memory:
        lines.append("- GPU memory in use (all processes): " + ", ".join(
            f"{name} {value:.1f} GiB" for name, value in results.memory.items()) + ".")
    return lines


def _window_lines(results: Results) -> list[str]:
    setup = results.setup
    lines = [
        f"Critic requests kept N in flight for a window (transformers {setup['hf_window_s']:g} s, "
        f"vLLM {setup['window_s']:g} s; at least one reply): N workers send requests back to back; "
        "the rate is the replies over the time from the start to the last reply. transformers "
        "decodes one request at a time (the per-model lock), so its requests still queued at the "
        "end of the window are cancelled; vLLM's are decoded to the end. Each reply counts as one "
        "verdict.",
        "",
        "| in flight | engine | replies | seconds | verdicts/s | output tokens/s | vLLM vs transformers |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for window in sorted(results.windows, key=lambda w: (w.concurrency, w.engine != "transformers")):
        if window.error:
            lines.append(f"| {window.concurrency} | {window.engine} | failed: {window.error} | | | | |")
            continue
        ratio = _ratio(results, window.concurrency) if window.engine == "vllm" else None
        lines.append(
            f"| {window.concurrency} | {window.engine} | {window.replies}"
            f"{' (pool used up)' if window.pool_used_up else ''} | {window.seconds:.1f} "
            f"| {window.verdicts_per_s:.2f} | {window.tokens_per_s:.0f} "
            f"| {f'{ratio:.1f}x' if ratio is not None else ''} |"
        )
    at8 = _ratio(results, 8)
    if at8 is not None:
        lines += ["", f"Target: vLLM at least 10x transformers at 8 in flight: {at8:.1f}x, "
                  f"{'holds' if at8 >= 10 else 'does not hold'}."]
    elif setup.get("vllm_skipped"):
        lines += ["", f"Target (vLLM at least 10x transformers at 8 in flight): not measured, "
                  f"{setup['vllm_skipped']}."]
    return lines


def _batch_lines(results: Results) -> list[str]:
    setup = results.setup
    if setup.get("vllm_skipped"):
        models = ("The planner and critic are scripted (the test planner's plan, an accepting "
                  "verdict; vllm not importable), so these runs time the generator and the graph.")
    else:
        models = (f"The planner and critic run on the vLLM engine above ({setup['planner_tokens']} "
                  f"and {setup['max_tokens']} decoded tokens a call), then their text is replaced by "
                  "the test planner's plan and an accepting verdict.")
    lines = [
        f"Batch runs through `arun_batch` ({setup['size']}x{setup['size']}, FLUX.2-klein at "
        f"{setup['steps']} steps, `--max-batch {setup['max_batch']} --max-in-flight 1`, SQLite): as "
        "many prompts as the concurrency, two sentences each, so every trajectory plans once, draws "
        f"a text-to-image step and an edit of it, and judges each. {models} Outside the generator: "
        "the share of the wall time not spent in generator calls (models, graph, storage).",
        "",
        "| concurrency | prompts | images | seconds | images/s | generator calls | generator s "
        "| outside the generator | planner calls | critic calls | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results.batches:
        if run.error and not run.seconds:
            lines.append(f"| {run.concurrency} | failed: {run.error} | | | | | | | | | |")
            continue
        lines.append(
            f"| {run.concurrency} | {run.prompts} | {run.images} | {run.seconds:.1f} "
            f"| {run.images_per_s:.2f} | {run.generator_calls} | {run.generator_s:.1f} "
            f"| {100 * run.outside_share:.0f} % | {run.planner_calls} | {run.critic_calls} | {run.failed} |"
        )
    lines += [f"\nBatch run at {run.concurrency}: {run.error}"
              for run in results.batches if run.error and run.seconds]
    return lines


class Writer:
    """Writes the Markdown and JSON after every part."""

    def __init__(self, markdown_path: Path | None, json_path: Path | None) -> None:
        self.markdown_path, self.json_path = markdown_path, json_path

    def __call__(self, results: Results) -> None:
        if self.markdown_path:
            self.markdown_path.parent.mkdir(parents=True, exist_ok=True)
            self.markdown_path.write_text(markdown(results), encoding="utf-8")
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            payload = asdict(results)
            payload["ratios"] = {str(w.concurrency): _ratio(results, w.concurrency)
                                 for w in results.windows if w.engine == "vllm"}
            self.json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
