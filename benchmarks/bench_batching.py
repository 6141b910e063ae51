"""Batching: batched vs one-by-one diffusers calls; batch-run throughput against the cost model's ideal."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from PIL import Image

from benchmarks.common import Figure, FixedCostGenerator, Stopwatch
from interleave_thinker.batch import arun_batch
from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import arun
from interleave_thinker.state import RunOptions

SECTION = "d. Batching"

# The cost model of part 2: one backend call costs FIXED_S plus PER_IMAGE_S per image in it.
FIXED_S = 0.2
PER_IMAGE_S = 0.02
# Below this share of the ideal the batch-run figure is marked as failing.
MIN_SHARE_OF_IDEAL = 0.5
# The batch runs are sleeps on a fixed schedule and vary little: at most this many repeats each.
MAX_BATCH_RUN_REPEATS = 3


# -- scripted models and generator wrappers, shared with gpu_flux2_klein.py ------------------------


def plan_reply(steps: Sequence[dict[str, Any]]) -> str:
    """A planner reply in the released InterleaveThinker format."""
    return f"<think>scripted plan</think><answer>{ {'execution_plan': list(steps)}!r}</answer>"


ACCEPT_REPLY = (
    "<think>scripted verdict</think>"
    f"<answer>{ {'previous_step_success': True, 'refine_prompt': None, 'score': 9}!r}</answer>"
)


def plan_step(number: int, prompt: str, sources: list[int]) -> dict[str, Any]:
    """One step of a plan; ``sources=[]`` marks it independent of every other step."""
    return {
        "step_number": number,
        "step_name": f"step {number}",
        "instruction": prompt,
        "prompt": prompt,
        "auxiliary_text": None,
        "sources": sources,
    }


def independent_plan(steps: int) -> list[dict[str, Any]]:
    animals = ["fox", "owl", "bear", "hare", "wolf", "deer", "lynx", "crow"]
    return [
        plan_step(n, f"a {animals[(n - 1) % len(animals)]} in the snow, picture {n}", [])
        for n in range(1, steps + 1)
    ]


def scripted_backends(plan: Sequence[dict[str, Any]], generator: ImageGenerator) -> Backends:
    """A planner that always writes ``plan`` and a critic that accepts every attempt."""
    return Backends(
        planner=FakeListChatModel(responses=[plan_reply(plan)]),
        critic=FakeListChatModel(responses=[ACCEPT_REPLY]),
        generator=generator,
    )


class TimedGenerator:
    """Wraps a generator and adds up the wall time spent inside its backend calls."""

    def __init__(self, inner: ImageGenerator) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.seconds = 0.0
        self.calls = 0

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        started = time.perf_counter()
        try:
            return await self.inner.agenerate(jobs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


class SerializedGenerator:
    """One backend call at a time, as on one GPU (DiffusersGenerator holds a lock the same way)."""

    def __init__(self, inner: ImageGenerator) -> None:
        self.inner = inner
        self.identity = inner.identity
        self._lock = asyncio.Lock()

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        async with self._lock:
            return await self.inner.agenerate(jobs)


def quiet_diffusers() -> None:
    """No loading progress bars from diffusers and transformers in the benchmark output."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# -- part 1: the tiny FLUX.2-klein pipeline, batched against one by one ------------------------------


async def _independent_trajectory(
    generator: ImageGenerator, plan: list[dict[str, Any]], run_dir: Path, thread_id: str
) -> float:
    """Seconds for one whole trajectory (plan, draw, judge, compose) of independent steps."""
    with Stopwatch() as watch:
        result = await arun(
            "animals in the snow",
            backends=scripted_backends(plan, generator),
            options=RunOptions(width=64, height=64),
            run_dir=run_dir,
            thread_id=thread_id,
        )
    statuses = [step.status for step in result.document.steps]
    if statuses != ["accepted"] * len(plan):
        raise RuntimeError(f"the scripted trajectory did not accept every step: {statuses}")
    return watch.seconds


def _tiny_klein_figures(repeats: int, quick: bool) -> list[Figure]:
    from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein
    from interleave_thinker.generators.diffusers_backend import DiffusersGenerator

    quiet_diffusers()
    steps = 4 if quick else 8
    plan = independent_plan(steps)
    batched_ips: list[float] = []
    single_ips: list[float] = []
    batched_backend: list[float] = []
    single_backend: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        model = build_tiny_flux2_klein(Path(tmp) / "tiny-klein")
        common = {"model": model, "steps": 2, "device": "cpu", "dtype": "float32"}
        batched = TimedGenerator(DiffusersGenerator(**common, max_batch=steps))
        single = TimedGenerator(DiffusersGenerator(**common, max_batch=1))
        run_dir = Path(tmp) / "runs"

        async def measure() -> None:
            # One unmeasured trajectory each: loading the pipeline is not part of the figure.
            for name, generator in (("batched", batched), ("single", single)):
                await _independent_trajectory(generator, plan, run_dir, f"warm-{name}")
            for repeat in range(repeats):
                # Alternated, so drift in the machine's speed hits both sides alike.
                for name, generator, out, backend in (
                    ("batched", batched, batched_ips, batched_backend),
                    ("single", single, single_ips, single_backend),
                ):
                    before = generator.seconds
                    seconds = await _independent_trajectory(
                        generator, plan, run_dir, f"{name}-{repeat}"
                    )
                    out.append(steps / seconds)
                    backend.append(100 * (generator.seconds - before) / seconds)

        asyncio.run(measure())
    setup = (
        f"{steps} independent steps (`'sources': []`), tiny FLUX.2-klein built by "
        "`build_tiny_flux2_klein` (random weights), 64x64, 2 steps, CPU float32; scripted planner, "
        "critic accepting every attempt; whole trajectories through `arun` (SQLite checkpoints)."
    )
    return [
        Figure(
            SECTION,
            f"tiny FLUX.2-klein, {steps} independent steps: batched (baseline: one by one)",
            "images/s",
            batched_ips,
            baseline_samples=single_ips,
            target="ratio > 1 (batching pays)",
            notes=(
                f"{setup} Batched: `DiffusersGenerator(max_batch={steps})`, the pass's {steps} "
                f"images in one pipeline call; baseline: the same graph with "
                f"`DiffusersGenerator(max_batch=1)`, {steps} pipeline calls."
            ),
            check=lambda figure: (figure.ratio or 0.0) > 1.0,
        ),
        Figure(
            SECTION,
            "tiny FLUX.2-klein: backend share of trajectory wall time, batched (baseline: one by one)",
            "%",
            batched_backend,
            baseline_samples=single_backend,
            notes=(
                "Time inside `DiffusersGenerator.agenerate` over the trajectory's wall time; the "
                "rest is the graph (planner and critic calls, PNG encoding, image store, ledger, "
                "checkpoints). With a model this small the graph's part is large; see "
                "`gpu_flux2_klein.py` for the full-size model."
            ),
        ),
    ]


# -- part 2: batch runs through arun_batch with a fixed-cost backend --------------------------------


def write_prompt_file(path: Path, prompts: int) -> None:
    """Prompts of two or three sentences: the test planner draws one chained step per sentence."""
    lines = []
    for number in range(prompts):
        sentences = [
            f"A paper kite number {number} rises over the dunes.",
            "The wind turns it into a loop.",
        ]
        if number % 2:
            sentences.append("It lands softly on the sand.")
        lines.append(json.dumps({"id": f"kite-{number}", "text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def ideal_images_per_second(concurrency: int) -> float:
    """Perfect coalescing: every backend call carries one image of each of ``concurrency`` trajectories."""
    return concurrency / (FIXED_S + concurrency * PER_IMAGE_S)


@dataclass
class BatchRunStats:
    seconds: float
    images: int
    backend_calls: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def batch_run(
    prompt_file: Path, run_dir: Path, concurrency: int, *, serialized: bool
) -> BatchRunStats:
    """One batch run of the whole prompt file with the test planner and critic."""
    backend = FixedCostGenerator("fixed-cost", FIXED_S, PER_IMAGE_S)
    generator: ImageGenerator = SerializedGenerator(backend) if serialized else backend
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=generator)
    with Stopwatch() as watch:
        report = asyncio.run(
            arun_batch(
                prompt_file,
                backends=backends,
                options=RunOptions(width=64, height=64),
                concurrency=concurrency,
                # Large enough that a batch may hold one job of every running trajectory.
                max_batch=concurrency,
                # One GPU: one call at a time, jobs gather meanwhile. A server that takes
                # concurrent calls: no limit (`--max-in-flight 0`).
                max_in_flight=1 if serialized else None,
                run_dir=run_dir,
            )
        )
    if report.failed:
        raise RuntimeError(f"{report.failed} prompts failed in the batch run")
    drawn = sum(outcome.generator_calls for outcome in report.outcomes)
    if drawn != backend.images:
        raise RuntimeError(f"trajectories asked for {drawn} images, the backend drew {backend.images}")
    return BatchRunStats(watch.seconds, backend.images, backend.calls)


def _batch_run_figures(repeats: int, quick: bool) -> list[Figure]:
    levels = (1, 8) if quick else (1, 4, 16, 64)
    overlapping_levels = () if quick else (4, 16, 64)
    repeats = min(repeats, MAX_BATCH_RUN_REPEATS)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-runs-") as tmp:
        runs = 0

        def measure(concurrency: int, serialized: bool) -> tuple[int, list[BatchRunStats]]:
            nonlocal runs
            # One trajectory at a time reaches its steady rate within a few prompts.
            prompts = 8 if quick else (16 if concurrency == 1 else 64)
            prompt_file = Path(tmp) / f"prompts-{prompts}.jsonl"
            write_prompt_file(prompt_file, prompts)
            stats = []
            for _ in range(repeats):
                runs += 1
                # A fresh run directory: otherwise the finished threads are skipped.
                stats.append(batch_run(prompt_file, Path(tmp) / f"run-{runs}", concurrency,
                                       serialized=serialized))
            return prompts, stats

        for concurrency in levels:
            figures += _concurrency_figures(concurrency, *measure(concurrency, True), True)
        for concurrency in overlapping_levels:
            figures += _concurrency_figures(concurrency, *measure(concurrency, False), False)
    return figures


def _concurrency_figures(
    concurrency: int, prompts: int, stats: list[BatchRunStats], serialized: bool
) -> list[Figure]:
    ideal = ideal_images_per_second(concurrency)
    images = sorted(stat.images for stat in stats)
    calls = sorted(stat.backend_calls for stat in stats)
    label = f"batch run, concurrency {concurrency}" + ("" if serialized else ", overlapping calls")
    backend = (
        "one backend call at a time (`SerializedGenerator`, as one GPU)"
        if serialized
        else "backend calls may overlap (the plain `FixedCostGenerator`; a server that takes "
        "concurrent calls, not one GPU: the ideal is then not an upper bound)"
    )
    setup = (
        f"{prompts} prompts of 2-3 sentences through `arun_batch` (test planner: a chain of "
        f"edits, one step per sentence; test critic: rejects about half of the first attempts), "
        f"`--concurrency {concurrency} --max-batch {concurrency} "
        f"--max-in-flight {1 if serialized else 0}`, max_wait 50 ms, SQLite, 64x64; "
        f"`FixedCostGenerator(fixed_s={FIXED_S}, per_image_s={PER_IMAGE_S})`, {backend}. "
        f"Ideal {ideal:.2f} images/s = c / (fixed + c x per_image) with c = {concurrency}. "
        f"At most {MAX_BATCH_RUN_REPEATS} repeats (fixed sleeps vary little)."
    )
    return [
        Figure(
            SECTION,
            f"{label}: throughput",
            "images/s",
            [stat.images_per_second for stat in stats],
            target=f"ideal {ideal:.2f}",
            notes=setup,
        ),
        Figure(
            SECTION,
            f"{label}: share of the ideal",
            "%",
            [100 * stat.images_per_second / ideal for stat in stats],
            target=f">= {100 * MIN_SHARE_OF_IDEAL:.0f} %" if serialized else "",
            check=(lambda figure: figure.median >= 100 * MIN_SHARE_OF_IDEAL) if serialized else None,
        ),
        Figure(
            SECTION,
            f"{label}: images per backend call",
            "images",
            [stat.images / stat.backend_calls for stat in stats],
            target=f"<= {concurrency} (perfect coalescing: {concurrency})",
            notes=(
                f"Backend calls {calls[0]}..{calls[-1]} for {images[0]}..{images[-1]} image "
                "requests per run (every request is one image; the trajectories ask for the same "
                "images in every run, retries included)."
            ),
        ),
    ]


def run(repeats: int, quick: bool) -> list[Figure]:
    """Both parts: the tiny diffusers pipeline, then the batch runs."""
    return _tiny_klein_figures(repeats, quick) + _batch_run_figures(repeats, quick)


if __name__ == "__main__":
    import argparse

    from benchmarks.common import machine_info, render_report

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    print(render_report(run(arguments.repeats, arguments.quick), machine_info()))
