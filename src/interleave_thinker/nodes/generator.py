"""The generator node: draws every ready step of this pass in one batched backend call."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

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
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.nodes.common import emit, position, thread_of
from interleave_thinker.nodes.retrying import bounded, is_transient, try_label
from interleave_thinker.nodes.scheduling import (
    next_pass,
    next_request,
    progress_by_step,
    repeated_attempt,
    source_images,
)
from interleave_thinker.state import (
    Attempt,
    ImageRef,
    Step,
    StepProgress,
    TrajectoryState,
    identity_without_address,
)
from interleave_thinker.storage.image_store import CheckedImage, check_image, png_image
from interleave_thinker.storage.ledger import generation_key


class PlannedCall(NamedTuple):
    """One generator request of this pass: the job, its ledger key and the images it edits."""

    job: GenerationJob
    key: str
    sources: tuple[ImageRef, ...]


async def generate_images(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Draw the next attempt of every ready step, all in one batched backend call.

    Reads ``plan``, ``request``, ``settings`` (budget, seed, size), ``progress`` (which steps are
    ready, their next prompts, their sources' final images) and ``generator_calls``. Takes the
    ready steps the call budget pays for (``next_pass``). An attempt that repeats an earlier
    attempt of its step (same prompt and seed) takes that attempt's image: nothing is drawn and
    no call is counted. A request already in the generation ledger (drawn by an earlier try of
    this node, or by a process that crashed before its checkpoint) reuses its image instead of
    drawing again; it was a backend draw, so it counts as a call, once, as in a run that never
    stopped.

    Writes ``progress`` (each step of the pass gains an ``Attempt`` awaiting the critic) and
    ``generator_calls`` (plus one per backend draw: every attempt but the repeated ones).

    Emits ``StepStarted`` for each request before the call (not for repeats: nothing is drawn),
    then ``ImageReady`` for each attempt's image (``reused`` when it came from the ledger,
    ``repeats`` when it came from an earlier attempt).
    """
    plan, settings = state["plan"], state["settings"]
    assert plan is not None
    context = runtime.context
    thread_id = thread_of(runtime)
    progress = progress_by_step(state["progress"])
    calls_used = state.get("generator_calls", 0)
    batch = next_pass(plan, state["progress"], settings.options, calls_used)

    planned = [_planned_call(state, context, thread_id, step, progress[step.number]) for step in batch]
    # Attempts that repeat an earlier attempt of their step: its image, drawn once.
    repeats = {
        call.job.step: index
        for call, step in zip(planned, batch, strict=True)
        if (index := repeated_attempt(settings.options, plan, step, progress[step.number])) is not None
    }
    for call in planned:
        if call.job.step in repeats:
            continue  # nothing is drawn for it: ImageReady says which image it takes
        emit(
            runtime,
            StepStarted(**position(plan, call.job.step), attempt=call.job.attempt, prompt=call.job.prompt),
        )

    started = time.time()
    requests = [call for call in planned if call.job.step not in repeats]
    # File I/O goes to a worker thread (one trip: the ledger, then the sources of what is left
    # to draw): the event loop may be serving other runs.
    reused, jobs = await asyncio.to_thread(_recorded_and_loaded, context, requests)
    to_draw = [call for call in requests if call.key not in reused]
    drawn = await _draw(context, thread_id, to_draw, jobs, try_label(runtime)) if to_draw else {}
    images = {**reused, **drawn}
    seconds = (time.time() - started) / max(1, len(to_draw))

    updated = dict(progress)
    for call in planned:
        job, repeated = call.job, repeats.get(call.job.step)
        item = updated[job.step]
        image = images[call.key] if repeated is None else item.attempts[repeated].image
        was_reused = call.key in reused and repeated is None
        attempt = Attempt(
            step=job.step,
            number=job.attempt,
            prompt=job.prompt,
            seed=job.seed,
            image=image,
            reused=was_reused,
            started_at=started,
            generation_seconds=seconds if call.key in drawn and repeated is None else 0.0,
        )
        updated[job.step] = item.model_copy(update={"attempts": (*item.attempts, attempt)})
        emit(
            runtime,
            ImageReady(
                **position(plan, job.step),
                attempt=job.attempt,
                image=image.sha256,
                reused=was_reused,
                repeats=None if repeated is None else item.attempts[repeated].number,
            ),
        )
    return {
        "progress": tuple(updated[item.number] for item in state["progress"]),
        # Backend draws only: a ledger reuse was drawn (and never counted) before a restart.
        "generator_calls": calls_used + len(requests),
    }


def _planned_call(
    state: TrajectoryState, context: Context, thread_id: str, step: Step, item: StepProgress
) -> PlannedCall:
    """The request for the next attempt of ``step``: its prompt, seed, sources and ledger key."""
    options = state["settings"].options
    attempt = len(item.attempts) + 1
    plan = state["plan"]
    assert plan is not None
    prompt, seed = next_request(options, plan, step, item)
    sources = tuple(source_images(step, state["request"], state["progress"]))
    key = generation_key(
        # Without the server's address: a thread moved to another address of the same server
        # reuses what that server already drew.
        generator=identity_without_address(context.backends.generator.identity),
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
    return PlannedCall(job, key, sources)


def _recorded_and_loaded(
    context: Context, planned: Sequence[PlannedCall]
) -> tuple[dict[str, ImageRef], list[GenerationJob]]:
    """Key -> image of the requests the ledger already holds, and the jobs of the others with
    their source images opened from the store (blocking: run it in a thread)."""
    found = {call.key: context.ledger.lookup(call.key) for call in planned}
    reused = {key: ref for key, ref in found.items() if ref is not None}
    jobs = [
        _with_sources(call.job, [context.image_store.open(ref) for ref in call.sources])
        for call in planned
        if call.key not in reused
    ]
    return reused, jobs


async def _draw(
    context: Context, thread_id: str, to_draw: list[PlannedCall], jobs: list[GenerationJob], tries: str
) -> dict[str, ImageRef]:
    """One backend call for the batch, traced as its own run with references only.

    The call is bounded by the generator timeout; its images are all checked (decodable, the
    requested size, one per job) before any is stored, so a bad batch records nothing.
    """
    # The traced input and output name images by hash: no pixels reach a trace.
    summary = {
        "generator": context.backends.generator.identity,
        "jobs": [
            {
                "step": call.job.step,
                "attempt": call.job.attempt,
                "prompt": call.job.prompt,
                "seed": call.job.seed,
                "size": f"{call.job.width}x{call.job.height}",
                "sources": [ref.sha256 for ref in call.sources],
            }
            for call in to_draw
        ],
    }
    draw_and_store = functools.partial(_draw_and_store, context, thread_id, to_draw, jobs, tries)
    drawn = await RunnableLambda(draw_and_store, name="generator_call").ainvoke(
        summary,
        config={
            "run_name": "generator_call",
            "tags": ["generator"],
            "metadata": {
                "thread_id": thread_id,
                "steps": [call.job.step for call in to_draw],
                "attempts": [call.job.attempt for call in to_draw],
            },
        },
    )
    return {item["key"]: item["image"] for item in drawn}


async def _draw_and_store(
    context: Context,
    thread_id: str,
    to_draw: list[PlannedCall],
    jobs: list[GenerationJob],
    tries: str,
    _summary: dict[str, Any],
) -> list[dict[str, Any]]:
    """The traced body of a generator call: call the backend with ``jobs`` (their sources
    loaded), check, store."""
    generator = context.backends.generator
    steps = ", ".join(str(call.job.step) for call in to_draw)
    where = f"thread {thread_id}: generator {generator.identity}, step(s) {steps}"
    outputs = await _call_backend(
        generator, jobs, context.timeouts.generator, where, tries, f"`interleave resume {thread_id}`"
    )
    # The images are paid for: storing and recording them is shielded from cancellation, so a
    # Ctrl-C that lands between the backend's answer and the ledger record still leaves them
    # for the resume to reuse instead of drawing them again.
    storing = asyncio.ensure_future(_check_and_store(context, thread_id, to_draw, outputs, where))
    try:
        return await asyncio.shield(storing)
    except asyncio.CancelledError:
        await asyncio.wait([storing])
        if not storing.cancelled():
            storing.exception()  # retrieved: the cancellation is what this call reports
        raise


async def _check_and_store(
    context: Context, thread_id: str, to_draw: list[PlannedCall], outputs: object, where: str
) -> list[dict[str, Any]]:
    """Check a backend's outputs, then store and record each image."""
    # PNG encoding and file writes release the GIL: a batch's images are handled in parallel
    # threads, each checked before any is stored.
    if len(to_draw) == 1 and isinstance(outputs, list | tuple) and len(outputs) == 1:
        # One image: checked and stored in one worker-thread trip instead of two.
        return [
            await asyncio.to_thread(
                _check_store_and_record, context, thread_id, to_draw[0], outputs[0], where
            )
        ]
    checked = await _checked_outputs(outputs, [call.job for call in to_draw], where)
    return list(
        await asyncio.gather(
            *(
                asyncio.to_thread(_store_and_record, context, thread_id, call, image)
                for call, image in zip(to_draw, checked, strict=True)
            )
        )
    )


def _check_store_and_record(
    context: Context, thread_id: str, call: PlannedCall, output: object, where: str
) -> dict[str, Any]:
    """:func:`_encoded`, then :func:`_store_and_record`, for a batch of one (blocking)."""
    return _store_and_record(context, thread_id, call, _encoded(output, call.job, where, _BAD_OUTPUT_HINT))


async def _call_backend(
    generator: ImageGenerator,
    jobs: list[GenerationJob],
    timeout: float | None,
    where: str,
    tries: str,
    resume: str,
) -> object:
    """The backend's raw outputs for ``jobs``; its failures become named transient or permanent errors."""

    def too_slow() -> Exception:
        return ModelTimeoutError(
            f"{where}: no images after {timeout:g} s ({tries})",
            hint="the generator may be hung or overloaded: check it, or allow more time with "
            f"--generator-timeout SECONDS (INTERLEAVE_GENERATOR_TIMEOUT), then {resume}",
        )

    try:
        return await bounded(generator.agenerate(jobs), timeout, too_slow)
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


def _store_and_record(
    context: Context, thread_id: str, call: PlannedCall, image: CheckedImage
) -> dict[str, Any]:
    """Store one checked image and record it in the ledger (blocking)."""
    ref = context.image_store.put_checked(image)
    # Recorded the moment it is stored: a crash from here on never pays for it again.
    context.ledger.record(call.key, ref, thread_id=thread_id)
    return {"key": call.key, "step": call.job.step, "attempt": call.job.attempt, "image": ref}


def _with_sources(job: GenerationJob, images: list[Image.Image]) -> GenerationJob:
    return GenerationJob(**{**job.__dict__, "source_images": tuple(images)})


_BAD_OUTPUT_HINT = (
    "the backend must return one PIL image or PNG/JPEG/WebP bytes per job, in order, of the "
    "requested size; nothing of this batch was kept: fix the backend (or pick a --size the "
    "model supports) and resume the thread"
)


async def _checked_outputs(
    outputs: object, jobs: list[GenerationJob], where: str
) -> list[CheckedImage]:
    """The encoded image of every job, or a GeneratorError naming the first bad one."""
    hint = _BAD_OUTPUT_HINT
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
