"""Pure rules of the loop: which steps are ready, their seeds and sources, and which attempt a step keeps."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from interleave_thinker.state import (
    Attempt,
    Budget,
    ImageRef,
    Plan,
    Request,
    RunOptions,
    SelectionPolicy,
    Step,
    StepProgress,
    parse_source,
)


def derive_seed(run_seed: int, step: int, attempt: int) -> int:
    """The seed of one generator call, in [0, 2**31).

    Rule: the first four bytes (big-endian) of sha256("interleave-seed:{run}:{step}:{attempt}"),
    masked to 31 bits. With ``reseed_retries`` off (the paper's choice) callers pass attempt=1
    for every attempt, so a retry differs from the first try only by its prompt.
    """
    digest = hashlib.sha256(f"interleave-seed:{run_seed}:{step}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def attempt_seed(options: RunOptions, plan: Plan, step: Step, attempt: int) -> int:
    """The seed of ``step``'s attempt ``attempt`` (counted from 1) under the options' scheme.

    ``hash``: :func:`derive_seed` of (run seed, step number, attempt; attempt 1 on every try
    unless ``reseed_retries``). ``ueval``: run seed + position * 100 + try, the position in the
    plan counted from 1 and the try from 0, as the official UEval script seeds FLUX.2-klein.
    ``demo``: run seed + position * 1000 with the position from 0, the same on every try, as the
    official demo script does. ``reseed_retries`` matters only to ``hash``.
    """
    if options.seed_scheme == "ueval":
        return (options.seed + _position(plan, step) * 100 + attempt - 1) & 0x7FFFFFFF
    if options.seed_scheme == "demo":
        return (options.seed + (_position(plan, step) - 1) * 1000) & 0x7FFFFFFF
    return derive_seed(options.seed, step.number, attempt if options.reseed_retries else 1)


def _position(plan: Plan, step: Step) -> int:
    return next(index for index, planned in enumerate(plan.steps, start=1) if planned.number == step.number)


def progress_by_step(progress: Sequence[StepProgress]) -> dict[int, StepProgress]:
    return {item.number: item for item in progress}


def source_images(step: Step, request: Request, progress: Sequence[StepProgress]) -> list[ImageRef]:
    """The images a step's sources name, in order; raises KeyError if one is not final yet."""
    by_step = progress_by_step(progress)
    images = []
    for source in step.sources:
        kind, number = parse_source(source)
        if kind == "input":
            images.append(request.images[number - 1])
            continue
        image = by_step[number].final_image
        if image is None:
            raise KeyError(f"step {number} has no final image yet")
        images.append(image)
    return images


def ready_steps(plan: Plan, progress: Sequence[StepProgress]) -> list[Step]:
    """Image steps not finished, not waiting for a verdict, whose source steps all have images."""
    by_step = progress_by_step(progress)
    ready = []
    for step in plan.steps:
        item = by_step[step.number]
        if item.finished or item.awaiting_critique or item.awaiting_review or step.action == "none":
            continue
        sources_done = all(
            kind == "input" or by_step[number].final_image is not None
            for kind, number in map(parse_source, step.sources)
        )
        if sources_done:
            ready.append(step)
    return ready


def select_attempt(attempts: Sequence[Attempt], policy: SelectionPolicy) -> int:
    """Index of the attempt a step keeps when the critic never accepted one.

    ``last`` keeps the final attempt (the paper). ``best`` keeps the highest critic score,
    the later attempt on ties; without any scores it falls back to the last attempt.
    """
    if policy == "best":
        scored = [(a.critique.score, i) for i, a in enumerate(attempts) if a.critique and
                  a.critique.score is not None]
        if scored:
            return max(scored)[1]
    return len(attempts) - 1


def finish_out_of_budget(item: StepProgress, budget: Budget) -> StepProgress:
    """Commit a step that may not draw again: forced with its chosen attempt, or skipped."""
    if not item.attempts:
        return item.model_copy(update={"status": "skipped", "next_prompt": None})
    chosen = select_attempt(item.attempts, budget.selection)
    return item.model_copy(update={"status": "forced", "chosen": chosen, "next_prompt": None})


def calls_left(budget: Budget, calls_used: int) -> int:
    return max(0, budget.max_calls - calls_used)


def next_request(options: RunOptions, plan: Plan, step: Step, item: StepProgress) -> tuple[str, int]:
    """The prompt and seed of ``step``'s next attempt."""
    prompt = item.next_prompt or step.prompt or ""
    return prompt, attempt_seed(options, plan, step, len(item.attempts) + 1)


def repeated_attempt(options: RunOptions, plan: Plan, step: Step, item: StepProgress) -> int | None:
    """Index of the earlier attempt of ``step`` that its next attempt repeats, or None.

    A step's sources and size do not change between its attempts, so the same prompt and seed
    are the same generator request: its image is reused rather than drawn (and paid) again.
    This happens when the critic rejects without a new prompt and the seed does not change
    between tries (``reseed_retries`` off, the paper's rule). A first attempt repeats nothing.
    """
    prompt, seed = next_request(options, plan, step, item)
    for index, attempt in enumerate(item.attempts):
        if attempt.prompt == prompt and attempt.seed == seed:
            return index
    return None


def next_pass(
    plan: Plan, progress: Sequence[StepProgress], options: RunOptions, calls_used: int
) -> list[Step]:
    """The steps the next generator pass attempts: the ready ones, in plan order, as far as the
    call budget pays for their draws (a repeated request draws nothing and costs nothing).

    Nothing once the budget is spent: the graph then composes the document.
    """
    left = calls_left(options.budget, calls_used)
    if left == 0:
        return []
    by_step = progress_by_step(progress)
    chosen = []
    for step in ready_steps(plan, progress):
        if repeated_attempt(options, plan, step, by_step[step.number]) is None:
            if left == 0:
                continue
            left -= 1
        chosen.append(step)
    return chosen
