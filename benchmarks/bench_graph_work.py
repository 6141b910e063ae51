"""Benchmark h: the graph's own CPU work per 1024x1024 image, with an instant generator.

On a GPU a FLUX.2-klein image takes about 0.5 s, so whatever the graph does between the
generator and the critic (encoding, hashing, storing with fsync, the ledger, checkpoints,
building the critic's messages, the HTML page) is paid on every image. This measures it per
image for two kinds of content, broken down by phase, against the hand-written loop of
benchmark a run on the same images.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.bench_orchestration import hand_written_loop
from benchmarks.common import Figure, chain_backends, chain_request, median_or_nan
from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.graph import build_graph
from interleave_thinker.models.messages import image_block, inline_images
from interleave_thinker.prompts.templates import critic_messages
from interleave_thinker.runner import make_settings, trajectory_input
from interleave_thinker.state import Budget, Request, RunOptions
from interleave_thinker.storage.image_store import ImageStore, png_image
from interleave_thinker.storage.ledger import GenerationLedger, generation_key
from interleave_thinker.workspace import Workspace

SECTION = "h. The graph's own work per 1024x1024 image"
SIZE = 1024
# Each step: rejected once, accepted on the second attempt (a critic call per image).
REJECTIONS = 1
GPU_IMAGE_S = 0.5
TARGETS_MS = {"photo": 30.0, "noise": 60.0}
THREAD = "bench-work"


def photo_like(seed: int) -> Image.Image:
    """Smooth gradients, filled shapes and a little sensor-like texture: compresses as photos do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack(
        [127 + 100 * np.sin(x / (180 + 40 * i) + y / (260 + 30 * i) + phase[i]) for i in range(3)], -1
    )
    pixels = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 100, 2))
        w, h = (int(v) for v in rng.integers(30, 300, 2))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1.2))


def noise(seed: int) -> Image.Image:
    """Uniform random pixels: the worst case for PNG (no compression at all)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


MAKERS: dict[str, Callable[[int], Image.Image]] = {"photo": photo_like, "noise": noise}


class InstantGenerator:
    """An ImageGenerator that hands back images made before the clock starts, one per call."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.identity = f"instant-{uuid.uuid4().hex[:8]}"
        self.images = list(images)
        self.calls = 0

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image]:
        out = []
        for _ in jobs:
            out.append(self.images[self.calls % len(self.images)])
            self.calls += 1
        return out


def _options() -> RunOptions:
    return RunOptions(width=SIZE, height=SIZE, budget=Budget(max_attempts=REJECTIONS + 1))


class _Clock:
    """Seconds spent inside wrapped callables, by phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap_async(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed


async def graph_once(root: Path, images: Sequence[Image.Image], steps: int) -> tuple[float, dict[str, float]]:
    """The compiled graph on SQLite (sync durability) as ``arun`` drives it; wall seconds and the
    seconds awaited inside the saver."""
    generator = InstantGenerator(images)
    backends = chain_backends(generator, rejections=REJECTIONS)
    workspace = Workspace.open(root)
    settings = make_settings("custom", backends, _options())
    clock = _Clock()
    started = time.perf_counter()
    context = workspace.context(backends)
    config = {"configurable": {"thread_id": THREAD}}
    async with open_checkpointer(workspace.checkpointer_url) as saver:
        for name in ("aput", "aput_writes"):
            setattr(saver, name, clock.wrap_async("checkpoint", getattr(saver, name)))
        graph = build_graph(checkpointer=saver)
        graph_input = trajectory_input(Request(text=chain_request(steps)), settings)
        async for _ in graph.astream(
            graph_input, config, context=context, durability="sync", stream_mode="custom"
        ):
            pass
        document = (await graph.aget_state(config)).values["document"]
    page = time.perf_counter()
    await asyncio.to_thread(workspace.write_document_page, THREAD, document)
    clock.seconds["html"] = time.perf_counter() - page
    seconds = time.perf_counter() - started
    if generator.calls != steps * (REJECTIONS + 1):
        raise AssertionError(f"expected {steps * (REJECTIONS + 1)} images, drew {generator.calls}")
    return seconds, clock.seconds


async def loop_once(root: Path, images: Sequence[Image.Image], steps: int) -> float:
    generator = InstantGenerator(images)
    backends = chain_backends(generator, rejections=REJECTIONS)
    started = time.perf_counter()
    await hand_written_loop(chain_request(steps), backends, _options(), Workspace.open(root), THREAD)
    return time.perf_counter() - started


def phases(root: Path, images: Sequence[Image.Image]) -> dict[str, list[float]]:
    """Each per-image phase timed on its own, in milliseconds, one sample per image."""
    store = ImageStore(root / "images")
    ledger = GenerationLedger(root / "generations", store)
    samples: dict[str, list[float]] = {
        "encode": [], "store (hash, write, fsync)": [], "ledger record": [], "decode (next edit)": [],
        "critic message (read, verify, base64)": [],
    }
    previous = None
    for index, image in enumerate(images):
        started = time.perf_counter()
        checked = png_image(image)
        encoded = time.perf_counter()
        ref = store.put_checked(checked)
        stored = time.perf_counter()
        ledger.record(generation_key(index=index, bench=uuid.uuid4().hex), ref, thread_id=THREAD)
        recorded = time.perf_counter()
        store.open(ref)
        decoded = time.perf_counter()
        messages = critic_messages(
            step_name="s", instruction="i", planned_prompt="p", used_prompt="p",
            previous_image=image_block(previous or ref), candidate_image=image_block(ref),
        )
        inline_images(messages, store)
        inlined = time.perf_counter()
        previous = ref
        for name, seconds in zip(
            samples,
            (encoded - started, stored - encoded, recorded - stored, decoded - recorded, inlined - decoded),
            strict=True,
        ):
            samples[name].append(1000 * seconds)
    return samples


def run(repeats: int, quick: bool) -> list[Figure]:
    steps = 2 if quick else 4
    count = steps * (REJECTIONS + 1)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bench-graph-work-") as tmp:
        root = Path(tmp)
        for kind, make in MAKERS.items():
            # Distinct images made before any clock starts; a fresh set for each run keeps the
            # image store from recognising them.
            pools = [[make(1000 * run_index + n) for n in range(count)] for run_index in range(repeats + 1)]
            graph_ms: list[float] = []
            loop_ms: list[float] = []
            checkpoint_ms: list[float] = []
            html_ms: list[float] = []
            asyncio.run(graph_once(root / f"warm-{kind}", pools[0], steps))
            for index in range(repeats):
                images = pools[index + 1]
                order = ("graph", "loop") if index % 2 == 0 else ("loop", "graph")
                for which in order:
                    folder = root / f"{which}-{kind}-{index}"
                    if which == "graph":
                        seconds, clocked = asyncio.run(graph_once(folder, images, steps))
                        graph_ms.append(1000 * seconds / count)
                        checkpoint_ms.append(1000 * clocked.get("checkpoint", 0.0) / count)
                        html_ms.append(1000 * clocked.get("html", 0.0) / count)
                    else:
                        loop_ms.append(1000 * asyncio.run(loop_once(folder, images, steps)) / count)
            target = TARGETS_MS[kind]
            share = [ms / (ms + 1000 * GPU_IMAGE_S) * 100 for ms in graph_ms]
            breakdown = phases(root / f"phases-{kind}", pools[-1])
            detail = ", ".join(
                f"{name} {median_or_nan(values):.1f} ms" for name, values in breakdown.items()
            )
            detail += (
                f", checkpoint writes awaited {median_or_nan(checkpoint_ms):.1f} ms, "
                f"HTML page {median_or_nan(html_ms):.1f} ms (per image)"
            )
            figures += [
                Figure(
                    SECTION, f"{kind}: graph work per image", "ms", graph_ms, loop_ms,
                    target=f"<= {target:g} ms",
                    check=lambda f, target=target: f.median <= target,
                    notes=f"{steps} chained steps x {REJECTIONS + 1} attempts = {count} images of "
                    f"{SIZE}x{SIZE} ({kind}) from an instant generator, scripted planner and critic "
                    "(the critic's messages still carry both images inlined), SQLite checkpoints "
                    "with sync durability, the HTML page included; wall time per image. Baseline: "
                    "benchmark a's hand-written loop on the same images. Phases, timed one by one "
                    f"(median per image): {detail}.",
                ),
                Figure(
                    SECTION, f"{kind}: projected share of a GPU trajectory at {GPU_IMAGE_S:g} s per image",
                    "%", share, target="< 5 %", check=lambda f: f.median < 5.0,
                    notes="graph work / (graph work + the image's GPU time).",
                ),
            ]
    return figures
