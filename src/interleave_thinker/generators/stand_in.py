"""A generator for tests and smoke runs: draws a PIL picture derived from prompt, seed and sources."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

from interleave_thinker.generators.base import GenerationJob

DELAY_ENV = "INTERLEAVE_TEST_GENERATOR_DELAY"
CALL_LOG_ENV = "INTERLEAVE_TEST_CALL_LOG"


class StandInImageGenerator:
    """Not a model: a deterministic drawing, so the graph can be run and tested without weights.

    Per backend call (one batch) it sleeps ``$INTERLEAVE_TEST_GENERATOR_DELAY`` seconds; per image
    it appends a JSON line ``{"thread", "step", "attempt", "seed"}`` to ``$INTERLEAVE_TEST_CALL_LOG``.
    Both are read at call time so a test can set them for a subprocess.
    """

    __test__ = False  # not a pytest test class
    identity = "test-generator"

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.batch_sizes.append(len(jobs))
        delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        if delay > 0:
            await asyncio.sleep(delay)
        images: list[Image.Image | bytes] = []
        for job in jobs:
            images.append(draw_test_image(job))
            _log_call(job)
        return images


def draw_test_image(job: GenerationJob) -> Image.Image:
    """A picture that changes with the prompt, the seed and the source image, and nothing else."""
    digest = hashlib.sha256(f"{job.prompt}\x00{job.seed}".encode()).digest()
    rng = random.Random(digest)
    background = tuple(digest[:3])
    image = Image.new("RGB", (job.width, job.height), background)
    if job.source_images:
        # An edit keeps its source visible, so a chain of edits reads as one evolving scene.
        source = job.source_images[0].convert("RGB").resize((job.width, job.height))
        image = Image.blend(source, image, 0.35)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(job.width), rng.randrange(job.height)
        size = rng.randrange(job.width // 8, job.width // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour, outline="black")
    caption = "\n".join(textwrap.wrap(job.prompt, width=max(8, job.width // 8))[:6])
    draw.multiline_text((4, 4), caption, fill="white", stroke_width=1, stroke_fill="black")
    return image


def _log_call(job: GenerationJob) -> None:
    path = os.environ.get(CALL_LOG_ENV)
    if not path:
        return
    line = json.dumps(
        {"thread": job.thread_id, "step": job.step, "attempt": job.attempt, "seed": job.seed}
    )
    # One write on an O_APPEND descriptor, so concurrent writers never interleave a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
