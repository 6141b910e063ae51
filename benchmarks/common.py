"""Shared pieces of the benchmarks: figures, machine facts, the Markdown report and scripted backends."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.prompts.templates import prompts_from_messages, request_from_messages

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distributions named in the report's machine section, when installed.
VERSIONED_PACKAGES = (
    "interleave-thinker",
    "langgraph",
    "langgraph-checkpoint",
    "langgraph-checkpoint-sqlite",
    "langchain-core",
    "langsmith",
    "pydantic",
    "aiosqlite",
    "pillow",
    "torch",
    "diffusers",
    "transformers",
)


@dataclass
class Figure:
    """One measured quantity: its samples, optionally a baseline measured beside it, and a target."""

    section: str
    name: str
    unit: str
    samples: list[float]
    baseline_samples: list[float] | None = None
    target: str = ""
    notes: str = ""
    # A machine-checkable form of ``target``; None when the target needs a person to judge it.
    check: Callable[[Figure], bool] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the samples."""
        if not self.samples:
            return math.nan, math.nan
        return min(self.samples), max(self.samples)

    @property
    def baseline_median(self) -> float | None:
        if not self.baseline_samples:
            return None
        return statistics.median(self.baseline_samples)

    @property
    def ratio(self) -> float | None:
        """median / baseline median, when there is a baseline."""
        base = self.baseline_median
        if base is None or base == 0:
            return None
        return self.median / base

    @property
    def passed(self) -> bool | None:
        if self.check is None or not self.samples:
            return None
        return bool(self.check(self))


def fmt(value: float | None) -> str:
    """A number for the report: thousands separators for large values, 3-4 significant digits else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    if abs(value) >= 1:
        return f"{value:.4g}"
    return f"{value:.3g}"


def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    """Facts about this machine and software that the numbers depend on."""
    memory_kb = _read_first("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "CPU": _read_first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "RAM": f"{int(memory_kb.split()[0]) / 1024**2:.1f} GiB" if memory_kb else "unknown",
        "OS": platform.platform(),
        "Python": sys.version.split()[0],
        "git revision": _git_revision(),
    }
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    torch = sys.modules.get("torch")  # only when a benchmark already paid for importing it
    if torch is not None and torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    versions = []
    for name in VERSIONED_PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    info["packages"] = ", ".join(versions)
    return info


def render_report(figures: Sequence[Figure], info: Mapping[str, Any]) -> str:
    """The Markdown report: the machine, then one table per section and each figure's notes."""
    lines = [
        "# Benchmark report",
        "",
        "Generated by `python -m benchmarks.run_all`. Medians of the samples; *spread* is "
        "min..max; *ratio* is median / baseline median; *result* is shown where the target "
        "can be checked by the script.",
        "",
        "## Machine",
        "",
    ]
    for key, value in info.items():
        if isinstance(value, list | tuple):
            lines.append(f"- {key}:")
            lines.extend(f"  - {item}" for item in value)
        else:
            lines.append(f"- {key}: {value}")
    sections: dict[str, list[Figure]] = {}
    for figure in figures:
        sections.setdefault(figure.section, []).append(figure)
    for section, members in sections.items():
        lines += [
            "",
            f"## {section}",
            "",
            "| figure | unit | n | median | spread | baseline | ratio | target | result |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for figure in members:
            low, high = figure.spread
            passed = figure.passed
            result = "–" if passed is None else ("pass" if passed else "**FAIL**")
            ratio = figure.ratio
            lines.append(
                f"| {_cell(figure.name)} | {figure.unit} | {len(figure.samples)} | "
                f"{fmt(figure.median)} | {fmt(low)}..{fmt(high)} | "
                f"{fmt(figure.baseline_median)} | {'–' if ratio is None else f'{ratio:.3f}'} | "
                f"{_cell(figure.target) or '–'} | {result} |"
            )
        noted = [figure for figure in members if figure.notes]
        if noted:
            lines.append("")
            for figure in noted:
                lines += [f"**{figure.name}.** {figure.notes.strip()}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class FixedCostGenerator:
    """An ImageGenerator whose backend call costs ``fixed_s + per_image_s * len(jobs)`` (asyncio.sleep).

    Images are small solid-colour PIL images (``image_size``, or the job's size when None), one
    colour per prompt and seed so that the image store never merges two of them.
    """

    def __init__(
        self,
        identity: str = "fixed-cost",
        fixed_s: float = 0.05,
        per_image_s: float = 0.0,
        *,
        image_size: tuple[int, int] | None = (64, 64),
    ) -> None:
        self.identity = identity
        self.fixed_s = fixed_s
        self.per_image_s = per_image_s
        self.image_size = image_size
        self.calls = 0
        self.images = 0
        self.batch_sizes: list[int] = []

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.calls += 1
        self.images += len(jobs)
        self.batch_sizes.append(len(jobs))
        await asyncio.sleep(self.fixed_s + self.per_image_s * len(jobs))
        return [self._image(job) for job in jobs]

    def _image(self, job: GenerationJob) -> Image.Image:
        digest = hashlib.sha256(f"{job.prompt}\x00{job.seed}\x00{job.attempt}".encode()).digest()
        size = self.image_size or (job.width, job.height)
        return Image.new("RGB", size, tuple(digest[:3]))


# Appended by the rejecting critic to the prompt it proposes: counts the rejections so far.
REFINE_MARK = ", sharper"


class ChainPlannerModel(StandInPlannerModel):
    """The test planner without its six-step cap: one step per sentence, every later step an edit."""

    @property
    def _llm_type(self) -> str:
        return "interleave-bench-planner"

    def _reply(self, messages: Sequence[Any]) -> str:
        request = request_from_messages(messages)
        if request is None:
            raise ValueError("bench planner: no <request> block in the messages")
        parts = [part.strip() for part in request.split(".") if part.strip()]
        steps = [
            {
                "step_number": number,
                "step_name": " ".join(part.split()[:4]),
                "instruction": part,
                "prompt": part if number == 1 else f"Edit the previous image: {part}",
                "auxiliary_text": None,
            }
            for number, part in enumerate(parts, start=1)
        ]
        return (
            f"<think>The bench planner wrote {len(steps)} steps.</think>\n"
            f"<answer>{ {'execution_plan': steps}!r}</answer>"
        )


class RejectingCriticModel(StandInCriticModel):
    """A test critic that rejects every step ``rejections`` times, then accepts the refined prompt."""

    rejections: int = 2
    # Length of the <think> text of each verdict; a real critic's runs to hundreds of words.
    reasoning_chars: int = 0

    @property
    def _llm_type(self) -> str:
        return f"interleave-bench-critic-{self.rejections}"

    def _reply(self, messages: Sequence[Any]) -> str:
        prompts = prompts_from_messages(messages)
        if prompts is None:
            raise ValueError("bench critic: no planned/used prompt markers in the messages")
        images = sum(
            1
            for message in messages
            if isinstance(message.content, list)
            for block in message.content
            if isinstance(block, dict) and block.get("type") in ("image", "image_url")
        )
        if images != 2:
            raise ValueError(f"bench critic: expected the previous and candidate image, got {images}")
        _, used = prompts
        if used.count(REFINE_MARK) < self.rejections:
            verdict = {"previous_step_success": False, "refine_prompt": used + REFINE_MARK, "score": 3}
        else:
            verdict = {"previous_step_success": True, "refine_prompt": None, "score": 8}
        thought = "Scripted verdict."
        if self.reasoning_chars > len(thought):
            filler = " The candidate image is compared with the instruction and the previous image."
            thought = (thought + filler * (self.reasoning_chars // len(filler) + 1))[
                : self.reasoning_chars
            ]
        return f"<think>{thought}</think>\n<answer>{verdict!r}</answer>"


def chain_request(steps: int) -> str:
    """A request the chain planner turns into exactly ``steps`` steps."""
    return " ".join(f"Panel {n} shows the red kite at height {n}." for n in range(1, steps + 1))


def chain_backends(generator: Any, *, rejections: int = 2, reasoning_chars: int = 0) -> Backends:
    """Chain planner, rejecting critic and the given generator: steps x (rejections + 1) calls."""
    return Backends(
        planner=ChainPlannerModel(),
        critic=RejectingCriticModel(rejections=rejections, reasoning_chars=reasoning_chars),
        generator=generator,
    )


def median_or_nan(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.started
