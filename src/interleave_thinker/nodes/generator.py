"""The generator node: draws every ready step of this pass in one batched backend call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from langchain_core.runnables import RunnableLambda
from langgraph.runtime import Runtime
from PIL import Image

from interleave_thinker.context import Context
from interleave_thinker.errors import (
    GeneratorError,
    ImageError,
    InterleaveError,
    ModelTimeoutError,
    TransientGeneratorError,
)
from interleave_thinker.events import ImageReady, StepStarted
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.nodes.common import emit, position, thread_of
from interleave_thinker.nodes.retrying import bounded, is_transient, try_label
from interleave_thinker.nodes.scheduling import (
    calls_left,
    derive_seed,
    progress_by_step,
    ready_steps,
    source_images,
)
from interleave_thinker.state import Attempt, ImageRef, TrajectoryState
from interleave_thinker.storage.image_store import CheckedImage, check_image, png_image
from interleave_thinker.storage.ledger import generation_key


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
        images.update(await _draw(context, thread_id, to_draw, try_label(runtime)))
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
    context: Context,
    thread_id: str,
    to_draw: list[tuple[GenerationJob, str, list[ImageRef]]],
    tries: str,
) -> dict[str, ImageRef]:
    """One backend call for the batch, traced as its own run with references only.

    The call is bounded by the generator timeout; its images are all checked (decodable, the
    requested size, one per job) before any is stored, so a bad batch records nothing.
    """
    generator = context.backends.generator
    steps = ", ".join(str(job.step) for job, _, _ in to_draw)
    where = f"thread {thread_id}: generator {generator.identity}, step(s) {steps}"
    resume = f"`interleave resume {thread_id}`"

    def load_jobs() -> list[GenerationJob]:
        return [
            _with_sources(job, [context.image_store.open(ref) for ref in sources])
            for job, _, sources in to_draw
        ]

    def store(job: GenerationJob, key: str, image: CheckedImage) -> dict[str, Any]:
        ref = context.image_store.put_checked(image)
        # Recorded the moment it is stored: a crash from here on never pays for it again.
        context.ledger.record(key, ref, thread_id=thread_id)
        return {"key": key, "step": job.step, "attempt": job.attempt, "image": ref}

    def too_slow() -> Exception:
        return ModelTimeoutError(
            f"{where}: no images after {context.timeouts.generator:g} s ({tries})",
            hint="the generator may be hung or overloaded: check it, or allow more time with "
            f"--generator-timeout SECONDS (INTERLEAVE_GENERATOR_TIMEOUT), then {resume}",
        )

    async def draw_and_store(_: dict[str, Any]) -> list[dict[str, Any]]:
        jobs = await asyncio.to_thread(load_jobs)
        try:
            outputs = await bounded(generator.agenerate(jobs), context.timeouts.generator, too_slow)
        except ModelTimeoutError:
            raise
        except TransientGeneratorError as exc:
            # Still transient; named with the thread and the try, as the last try is reported.
            raise TransientGeneratorError(f"{where} ({tries}): {exc.message}", hint=exc.hint) from exc
        except InterleaveError:
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if is_transient(exc):
                raise TransientGeneratorError(f"{where} ({tries}): {detail}") from exc
            raise GeneratorError(
                f"{where}: the backend failed: {detail}",
                hint=f"see the chained error; once the backend is fixed, {resume}",
            ) from exc
        # PNG encoding and file writes release the GIL: a batch's images are handled in
        # parallel threads, each checked before any is stored.
        checked = await _checked_outputs(outputs, [job for job, _, _ in to_draw], where)
        return list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(store, job, key, image)
                    for (job, key, _), image in zip(to_draw, checked, strict=True)
                )
            )
        )

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


async def _checked_outputs(
    outputs: object, jobs: list[GenerationJob], where: str
) -> list[CheckedImage]:
    """The encoded image of every job, or a GeneratorError naming the first bad one."""
    hint = (
        "the backend must return one PIL image or PNG/JPEG/WebP bytes per job, in order, of the "
        "requested size; nothing of this batch was kept: fix the backend (or pick a --size the "
        "model supports) and resume the thread"
    )
    if not isinstance(outputs, list | tuple):
        raise GeneratorError(
            f"{where}: the backend returned {type(outputs).__name__}, not a list of images",
            hint=hint,
        )
    if len(outputs) != len(jobs):
        raise GeneratorError(
            f"{where}: the backend returned {len(outputs)} images for {len(jobs)} requests",
            hint=hint,
        )
    return list(
        await asyncio.gather(
            *(
                asyncio.to_thread(_encoded, output, job, where, hint)
                for job, output in zip(jobs, outputs, strict=True)
            )
        )
    )


def _encoded(output: object, job: GenerationJob, where: str, hint: str) -> CheckedImage:
    what = f"{where}: the image of step {job.step}"
    wanted = (job.width, job.height)
    if isinstance(output, Image.Image):
        size = output.size
        if size == wanted:
            try:
                return png_image(output)
            except (OSError, ValueError, TypeError) as exc:
                raise GeneratorError(
                    f"{what} ({output.mode} mode) cannot be saved as PNG: {exc}", hint=hint
                ) from exc
    elif isinstance(output, bytes | bytearray | memoryview):
        try:
            checked = check_image(bytes(output), what=what)
        except ImageError as exc:
            raise GeneratorError(exc.message, hint=hint) from exc
        size = (checked.width, checked.height)
        if size == wanted:
            return checked
    else:
        raise GeneratorError(f"{what} is a {type(output).__name__}, not an image", hint=hint)
    raise GeneratorError(
        f"{what} is {size[0]}x{size[1]}, but {wanted[0]}x{wanted[1]} was requested", hint=hint
    )
