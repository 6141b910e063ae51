"""Benchmark b: bytes per checkpoint and per thread for a 30-call trajectory with real-size images."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from benchmarks.common import Figure, chain_backends, chain_request
from interleave_thinker.checkpoints.savers import make_serializer, open_checkpointer
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.runner import arun
from interleave_thinker.state import Budget, RunOptions

SECTION = "b. Checkpoint size"
REJECTIONS = 2
THREAD = "bench"
TARGET_BYTES = 20 * 1024
# A critic verdict's <think> text of a realistic length (the scripted one is two words).
REASONING_CHARS = 1000


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: incompressible, so the image store holds a real-size file."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class NoiseGenerator:
    """Returns encoded noise PNGs of the requested size, as a real backend returns its pictures."""

    identity = "noise-png"

    def __init__(self) -> None:
        self.calls = 0

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.calls += 1
        return [await asyncio.to_thread(noise_png, job.width, job.height) for job in jobs]


@dataclass
class ThreadSizes:
    size: int
    calls: int
    checkpoint_bytes: list[float]  # serde size of each checkpoint, oldest first
    stored_bytes: list[float]  # per checkpoint row: checkpoint + metadata + its pending writes
    largest_by_channel: dict[str, int]
    file_bytes: int
    blob_bytes: int
    image_bytes: int
    images: int


async def _serde_sizes(url: str) -> tuple[list[float], dict[str, int]]:
    serde = make_serializer()
    sizes: list[tuple[str, float, dict[str, int]]] = []
    async with open_checkpointer(url) as saver:
        async for item in saver.alist({"configurable": {"thread_id": THREAD}}):
            checkpoint = item.checkpoint
            channels = {
                name: len(serde.dumps_typed(value)[1])
                for name, value in checkpoint["channel_values"].items()
            }
            sizes.append((checkpoint["id"], float(len(serde.dumps_typed(checkpoint)[1])), channels))
    sizes.sort()
    largest = max(sizes, key=lambda entry: entry[1])
    return [size for _, size, _ in sizes], largest[2]


def _stored_sizes(database: Path) -> tuple[list[float], int]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT checkpoint_id, length(checkpoint) + length(metadata) FROM checkpoints "
            "WHERE thread_id = ? ORDER BY checkpoint_id",
            (THREAD,),
        ).fetchall()
        writes = dict(
            conn.execute(
                "SELECT checkpoint_id, sum(length(value)) FROM writes WHERE thread_id = ? "
                "GROUP BY checkpoint_id",
                (THREAD,),
            ).fetchall()
        )
    stored = [float(size + (writes.get(checkpoint) or 0)) for checkpoint, size in rows]
    return stored, int(sum(stored))


async def measure(root: Path, size: int, steps: int, reasoning_chars: int = 0) -> ThreadSizes:
    generator = NoiseGenerator()
    options = RunOptions(width=size, height=size, budget=Budget(max_attempts=REJECTIONS + 1))
    backends = chain_backends(generator, rejections=REJECTIONS, reasoning_chars=reasoning_chars)
    result = await arun(
        chain_request(steps), backends=backends, options=options, thread_id=THREAD, run_dir=root,
    )
    database = root / "checkpoints.sqlite"
    checkpoint_bytes, largest = await _serde_sizes(f"sqlite:///{database}")
    stored, blob_bytes = _stored_sizes(database)
    files = [path for path in (root / "images").rglob("*") if path.is_file()]
    return ThreadSizes(
        size=size,
        calls=result.document.generator_calls,
        checkpoint_bytes=checkpoint_bytes,
        stored_bytes=stored,
        largest_by_channel=largest,
        file_bytes=sum(
            path.stat().st_size for path in root.glob("checkpoints.sqlite*") if path.is_file()
        ),
        blob_bytes=blob_bytes,
        image_bytes=sum(path.stat().st_size for path in files),
        images=len(files),
    )


def _within_target(figure: Figure) -> bool:
    independent = figure.ratio is None or abs(figure.ratio - 1) <= 0.02
    return max(figure.samples) < TARGET_BYTES and independent


def run(repeats: int, quick: bool) -> list[Figure]:
    """Sizes are deterministic, so each image size runs once whatever ``repeats`` says."""
    del repeats
    sizes = (64, 128) if quick else (256, 512, 1024)
    steps = 2 if quick else 10
    results: list[ThreadSizes] = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as tmp:
        for size in sizes:
            results.append(asyncio.run(measure(Path(tmp) / f"s{size}", size, steps)))
        wordy = asyncio.run(measure(Path(tmp) / "wordy", sizes[-1], steps, REASONING_CHARS))
    base = results[0]
    figures: list[Figure] = []
    for result in results:
        label = f"{result.size}x{result.size}"
        baseline = None if result is base else base
        channels = ", ".join(
            f"`{name}` {size:,} B" for name, size in sorted(
                result.largest_by_channel.items(), key=lambda item: -item[1]
            )
        )
        figures += [
            Figure(
                SECTION, f"checkpoint (serde), {label}", "B", result.checkpoint_bytes,
                None if baseline is None else baseline.checkpoint_bytes,
                target="< 20 KB each, same for every image size",
                check=_within_target,
                notes=f"{result.calls} generator calls ({steps} chained steps x "
                f"{REJECTIONS + 1} attempts), {len(result.checkpoint_bytes)} checkpoints; "
                "each sample is one checkpoint serialized by the saver's serde (oldest "
                f"{result.checkpoint_bytes[0]:,.0f} B, newest {result.checkpoint_bytes[-1]:,.0f} "
                f"B). Largest checkpoint by channel: {channels}."
                + ("" if baseline is None else f" Baseline: the same trajectory with "
                   f"{base.size}x{base.size} images."),
            ),
            Figure(
                SECTION, f"checkpoint + pending writes as stored, {label}", "B",
                result.stored_bytes, None if baseline is None else baseline.stored_bytes,
                target="< 20 KB each, same for every image size", check=_within_target,
                notes="Per checkpoint row in SQLite: checkpoint blob + metadata + the values of "
                "the writes saved against it.",
            ),
            Figure(
                SECTION, f"SQLite file per thread, {label}", "B", [float(result.file_bytes)],
                None if baseline is None else [float(baseline.file_bytes)],
                notes=f"checkpoints.sqlite (and -wal, -shm if left) holding this one thread; "
                f"the blobs in it add up to {result.blob_bytes:,} B. For comparison the image "
                f"store holds {result.images} files, {result.image_bytes:,} B.",
            ),
            Figure(
                SECTION, f"image store per thread, {label}", "B", [float(result.image_bytes)],
                notes="Not checkpoint data: shown to make the contrast plain.",
            ),
        ]
    figures.append(
        Figure(
            SECTION, f"checkpoint (serde), {wordy.size}x{wordy.size}, critic reasoning "
            f"{REASONING_CHARS:,} chars", "B", wordy.checkpoint_bytes, target="< 20 KB each",
            check=lambda f: max(f.samples) < TARGET_BYTES,
            notes=f"The same trajectory with a critic whose <think> text is {REASONING_CHARS:,} "
            "characters, as a real critic's may be: the reasoning is kept in every attempt's "
            "critique. Largest checkpoint by channel: " + ", ".join(
                f"`{name}` {size:,} B" for name, size in sorted(
                    wordy.largest_by_channel.items(), key=lambda item: -item[1]
                )
            ) + ".",
        )
    )
    return figures
