"""The generator node: draws every ready step of this pass in one batched backend call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from langchain_core.runnables import RunnableLambda
from langgraph.runtime import Runtime
from PIL import Image

from interleave_thinker.checkpoints.image_store import encode_png
from interleave_thinker.checkpoints.ledger import generation_key
from interleave_thinker.context import Context
from interleave_thinker.errors import GeneratorError
from interleave_thinker.events import ImageReady, StepStarted
from interleave_thinker.nodes.common import emit, position, thread_of
from interleave_thinker.nodes.scheduling import (
    calls_left,
    derive_seed,
    progress_by_step,
    ready_steps,
    source_images,
)
from interleave_thinker.state import Attempt, ImageRef, TrajectoryState
from interleave_thinker.tools.base import GenerationJob


async def generate_images(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    plan, request, settings = state["plan"], state["request"], state["settings"]
    assert plan is not None
    options = settings.options
    context = runtime.context
    thread_id = thread_of(runtime)
    progress = progress_by_step(state["progress"])
    calls_used = state.get("generator_calls", 0)
    batch = ready_steps(plan, state["progress"])[: calls_left(options.budget, calls_used)]

    planned: list[tuple[int, GenerationJob, str, list[ImageRef]]] = []
    for step in batch:
        item = progress[step.number]
        attempt = len(item.attempts) + 1
        seed = derive_seed(options.seed, step.number, attempt if options.reseed_retries else 1)
        sources = source_images(step, request, state["progress"])
        prompt = item.next_prompt or step.prompt or ""
        key = generation_key(
            generator=context.backends.generator.identity,
            thread=thread_id,
            prompt=prompt,
            sources=[ref.sha256 for ref in sources],
            seed=seed,
            width=options.width,
            height=options.height,
        )
        job = GenerationJob(
            prompt=prompt,
            seed=seed,
            width=options.width,
            height=options.height,
            thread_id=thread_id,
            step=step.number,
            attempt=attempt,
        )
        planned.append((step.number, job, key, sources))
        emit(runtime, StepStarted(**position(plan, step.number), attempt=attempt, prompt=prompt))

    started = time.time()
    images: dict[str, ImageRef] = {}
    reused: set[str] = set()
    to_draw = []
    # File I/O goes to a worker thread: the event loop may be serving other runs.
    recorded_images = await asyncio.to_thread(
        lambda: [context.ledger.lookup(key) for _, _, key, _ in planned]
    )
    for (_, job, key, sources), recorded in zip(planned, recorded_images, strict=True):
        if recorded is not None:
            images[key] = recorded
            reused.add(key)
        else:
            to_draw.append((job, key, sources))
    if to_draw:
        images.update(await _draw(context, thread_id, to_draw))
    seconds = (time.time() - started) / max(1, len(planned))

    updated = dict(progress)
    for number, job, key, _ in planned:
        attempt = Attempt(
            step=number,
            number=job.attempt,
            prompt=job.prompt,
            seed=job.seed,
            image=images[key],
            reused=key in reused,
            started_at=started,
            generation_seconds=0.0 if key in reused else seconds,
        )
        item = updated[number]
        updated[number] = item.model_copy(update={"attempts": (*item.attempts, attempt)})
        emit(
            runtime,
            ImageReady(
                **position(plan, number),
                attempt=job.attempt,
                image=images[key].sha256,
                reused=key in reused,
            ),
        )
    return {
        "progress": tuple(updated[item.number] for item in state["progress"]),
        "generator_calls": calls_used + len(planned),
    }


async def _draw(
    context: Context, thread_id: str, to_draw: list[tuple[GenerationJob, str, list[ImageRef]]]
) -> dict[str, ImageRef]:
    """One backend call for the batch, traced as its own run with references only."""

    def load_jobs() -> list[GenerationJob]:
        return [
            _with_sources(job, [context.image_store.open(ref) for ref in sources])
            for job, _, sources in to_draw
        ]

    def store(outputs: list[Image.Image | bytes]) -> list[dict[str, Any]]:
        drawn = []
        for (job, key, _), output in zip(to_draw, outputs, strict=True):
            ref = context.image_store.put(
                _encoded(output), what=f"generated image of step {job.step}"
            )
            # Recorded the moment it is stored: a crash from here on never pays for it again.
            context.ledger.record(key, ref)
            drawn.append({"key": key, "step": job.step, "attempt": job.attempt, "image": ref})
        return drawn

    async def draw_and_store(_: dict[str, Any]) -> list[dict[str, Any]]:
        jobs = await asyncio.to_thread(load_jobs)
        outputs = await context.backends.generator.agenerate(jobs)
        if len(outputs) != len(jobs):
            raise GeneratorError(
                f"generator {context.backends.generator.identity} returned {len(outputs)} "
                f"images for {len(jobs)} requests",
                hint="the backend must return exactly one image per job, in order",
            )
        return await asyncio.to_thread(store, outputs)

    # The traced input and output name images by hash: no pixels reach a trace.
    summary = {
        "generator": context.backends.generator.identity,
        "jobs": [
            {
                "step": job.step,
                "attempt": job.attempt,
                "prompt": job.prompt,
                "seed": job.seed,
                "size": f"{job.width}x{job.height}",
                "sources": [ref.sha256 for ref in sources],
            }
            for job, _, sources in to_draw
        ],
    }
    drawn = await RunnableLambda(draw_and_store, name="generator_call").ainvoke(
        summary,
        config={
            "run_name": "generator_call",
            "tags": ["generator"],
            "metadata": {
                "thread_id": thread_id,
                "steps": [job.step for job, _, _ in to_draw],
                "attempts": [job.attempt for job, _, _ in to_draw],
            },
        },
    )
    return {item["key"]: item["image"] for item in drawn}


def _with_sources(job: GenerationJob, images: list[Image.Image]) -> GenerationJob:
    return GenerationJob(**{**job.__dict__, "source_images": tuple(images)})


def _encoded(output: Image.Image | bytes) -> bytes:
    if isinstance(output, bytes):
        return output
    if isinstance(output, Image.Image):
        return encode_png(output)
    raise GeneratorError(
        f"generator returned a {type(output).__name__}, not an image",
        hint="return PIL images or encoded PNG/JPEG/WebP bytes",
    )
