"""Memory: peak RSS of 64 concurrent trajectories through arun_batch on SQLite, against one trajectory."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.bench_batching import FIXED_S, PER_IMAGE_S, write_prompt_file
from benchmarks.common import REPO_ROOT, Figure, FixedCostGenerator
from interleave_thinker.generators.base import GenerationJob

SECTION = "e. Memory"
# RSS hardly varies between runs of the same configuration: at most this many repeats each.
MAX_REPEATS = 3
CHILD_TIMEOUT_S = 600
# Linux carries ru_maxrss across fork and exec: a child forked straight from a large process
# (run_all, with torch loaded) would report that process's size. The child is therefore started
# by this small launcher, whose own fork starts from a few MiB.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


class NoiseImages:
    """Wraps a generator (for its cost and counters) and returns noise of the job's size instead.

    Noise does not compress, so the PNG bytes in the store, in the critic's messages and in
    flight weigh what photographs would at most; solid colours would make them a few hundred bytes.
    """

    def __init__(self, inner: FixedCostGenerator) -> None:
        self.inner = inner
        self.identity = inner.identity

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        await self.inner.agenerate(jobs)
        return [_noise(job) for job in jobs]


def _noise(job: GenerationJob) -> Image.Image:
    rng = random.Random(f"{job.thread_id}:{job.step}:{job.attempt}:{job.prompt}:{job.seed}")
    return Image.frombytes("RGB", (job.width, job.height), rng.randbytes(job.width * job.height * 3))


def _child(trajectories: int, size: int, run_dir: Path) -> dict[str, Any]:
    """Runs in the fresh subprocess: one batch run, then this process's peak RSS."""
    from interleave_thinker.batch import arun_batch
    from interleave_thinker.context import Backends
    from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
    from interleave_thinker.state import RunOptions

    prompt_file = run_dir / "prompts.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_prompt_file(prompt_file, trajectories)
    generator = FixedCostGenerator("fixed-cost", FIXED_S, PER_IMAGE_S)
    started = time.perf_counter()
    report = asyncio.run(
        arun_batch(
            prompt_file,
            backends=Backends(
                planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=NoiseImages(generator)
            ),
            options=RunOptions(width=size, height=size),
            concurrency=trajectories,
            max_batch=trajectories,
            run_dir=run_dir / "runs",
        )
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        # The kernel's peak of this address space, which exec starts afresh: a cross-check.
        "vm_hwm_mib": _vm_hwm_kib() / 1024,
        "trajectories": trajectories,
        "size": size,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "seconds": time.perf_counter() - started,
        "images": generator.images,
        "backend_calls": generator.calls,
        "failed": report.failed,
        "checkpoint_db_mib": (run_dir / "runs" / "checkpoints.sqlite").stat().st_size / 2**20,
    }


def _vm_hwm_kib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    return float("nan")


def measure(trajectories: int, size: int) -> dict[str, Any]:
    """One configuration in a fresh Python process, so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        completed = subprocess.run(
            [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "benchmarks.bench_memory", "--child",
             "--trajectories", str(trajectories), "--size", str(size), "--run-dir", tmp],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False,
        )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory child ({trajectories} trajectories, {size}px) exited with "
            f"{completed.returncode}: {completed.stderr.strip()[-2000:]}"
        )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} prompts failed in the memory child: {result}")
    if abs(result["peak_rss_mib"] - result["vm_hwm_mib"]) > 0.05 * result["vm_hwm_mib"]:
        raise RuntimeError(f"ru_maxrss and VmHWM disagree, the peak was not this child's own: {result}")
    return result


def _figures(many: int, size: int, repeats: int) -> list[Figure]:
    single: list[dict[str, Any]] = []
    concurrent: list[dict[str, Any]] = []
    for _ in range(repeats):
        # Alternated, so a change in the machine's state hits both alike.
        single.append(measure(1, size))
        concurrent.append(measure(many, size))
    base = [result["peak_rss_mib"] for result in single]
    peak = [result["peak_rss_mib"] for result in concurrent]
    extra = [(high - low) / (many - 1) for high, low in zip(peak, base, strict=True)]
    last = concurrent[-1]
    setup = (
        f"Peak RSS (`ru_maxrss`, checked against `VmHWM`) of a fresh Python process (started "
        f"through a small launcher: Linux carries `ru_maxrss` over fork and exec) that runs "
        f"`arun_batch` over {many} prompts at `--concurrency {many} --max-batch {many}` "
        f"(baseline: 1 prompt, concurrency 1); test-profile planner and critic (chains of 2-3 "
        f"edits, about half of the first attempts rejected), "
        f"`FixedCostGenerator(fixed_s={FIXED_S}, per_image_s={PER_IMAGE_S})` returning "
        f"{size}x{size} noise (incompressible: PNGs as large as they get), SQLite checkpoints. "
        f"The {many}-trajectory run drew "
        f"{last['images']} images in {last['backend_calls']} backend calls in "
        f"{last['seconds']:.1f} s; its checkpoint database is {last['checkpoint_db_mib']:.1f} MiB."
    )
    return [
        Figure(
            SECTION,
            f"peak RSS, {many} concurrent trajectories, {size}x{size} (baseline: 1 trajectory)",
            "MiB",
            peak,
            baseline_samples=base,
            notes=setup,
        ),
        Figure(
            SECTION,
            f"peak RSS added per concurrent trajectory, {size}x{size}",
            "MiB",
            extra,
            target="<= 10 MiB (images stay in the store; the state holds references)",
            notes=(
                f"(peak with {many} - peak with 1) / {many - 1}, per repeat. A decoded "
                f"{size}x{size} RGB image is {size * size * 3 / 2**20:.2f} MiB."
            ),
            check=lambda figure: figure.median <= 10.0,
        ),
    ]


def run(repeats: int, quick: bool) -> list[Figure]:
    """1 against 64 trajectories at the default 1024x1024, and at 64x64 to set images apart."""
    repeats = min(repeats, MAX_REPEATS)
    if quick:
        return _figures(8, 256, 1)
    return _figures(64, 1024, repeats) + _figures(64, 64, repeats)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        if args.run_dir is None:
            parser.error("--child needs --run-dir")
        print(json.dumps(_child(args.trajectories, args.size, args.run_dir)))
        return 0
    from benchmarks.common import machine_info, render_report

    print(render_report(run(args.repeats, args.quick), machine_info()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
