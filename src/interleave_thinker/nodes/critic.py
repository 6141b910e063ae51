"""The critic node: judges every fresh attempt of the pass concurrently and decides each step's fate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from langgraph.runtime import Runtime

from interleave_thinker.context import Context, model_identity
from interleave_thinker.events import Verdict
from interleave_thinker.models.messages import ImageInliningChatModel, image_block
from interleave_thinker.nodes.asking import ask_until_parsed, for_output_mode
from interleave_thinker.nodes.common import emit, emit_committed, position, thread_of
from interleave_thinker.nodes.retrying import try_label
from interleave_thinker.nodes.scheduling import finish_out_of_budget, source_images
from interleave_thinker.prompts.parsing import parse_verdict
from interleave_thinker.prompts.schemas import VerdictAnswer
from interleave_thinker.prompts.templates import critic_messages
from interleave_thinker.state import Attempt, Critique, StepProgress, TrajectoryState
from interleave_thinker.storage.image_store import blank_canvas

T = TypeVar("T")


async def judge_attempts(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    plan = state["plan"]
    assert plan is not None
    budget = state["settings"].options.budget
    fresh = [item for item in state["progress"] if item.awaiting_critique]

    async def verdict_for(item: StepProgress) -> tuple[Critique | None, float]:
        attempt = item.attempts[-1]
        if budget.accept_final_without_critic and attempt.number >= budget.max_attempts:
            return None, 0.0  # the paper's forced pass: the last allowed attempt is not judged
        started = time.monotonic()
        critique = await _ask_critic(state, runtime, item, attempt)
        return critique, time.monotonic() - started

    verdicts = await _all_or_none([verdict_for(item) for item in fresh])

    decided: dict[int, StepProgress] = {}
    for item, (critique, seconds) in zip(fresh, verdicts, strict=True):
        attempt = item.attempts[-1].model_copy(
            update={"critique": critique, "critique_seconds": seconds}
        )
        item = item.model_copy(update={"attempts": (*item.attempts[:-1], attempt)})
        if critique is not None and critique.success:
            item = item.model_copy(
                update={"status": "accepted", "chosen": len(item.attempts) - 1, "next_prompt": None}
            )
        elif critique is None or attempt.number >= budget.max_attempts:
            if state["settings"].options.review_forced:
                item = item.model_copy(update={"awaiting_review": True, "next_prompt": None})
            else:
                item = finish_out_of_budget(item, budget)
        else:
            # Keep the last prompt when the critic rejects without proposing a better one.
            item = item.model_copy(update={"next_prompt": critique.refine_prompt or attempt.prompt})
        decided[item.number] = item
        emit(
            runtime,
            Verdict(
                **position(plan, item.number),
                attempt=attempt.number,
                success=None if critique is None else critique.success,
                status="review" if item.awaiting_review else item.status,
            ),
        )
        if item.finished:
            emit_committed(runtime, plan, item)
    return {"progress": tuple(decided.get(item.number, item) for item in state["progress"])}


async def _all_or_none(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``calls`` concurrently; when one fails, cancel the others before raising.

    Plain gather would leave them running: a retry of the node would then ask the critic
    twice about the same attempts at once.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        # Let the cancelled calls unwind (their errors are not the one to report).
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _ask_critic(
    state: TrajectoryState, runtime: Runtime[Context], item: StepProgress, attempt: Attempt
) -> Critique:
    plan, request = state["plan"], state["request"]
    assert plan is not None
    step = plan.step(item.number)
    store = runtime.context.image_store
    sources = source_images(step, request, state["progress"])
    # Before the first image there is nothing to compare with: the critic sees a white canvas.
    previous = sources[0] if sources else await asyncio.to_thread(
        blank_canvas, store, attempt.image.width, attempt.image.height
    )
    messages = critic_messages(
        step_name=step.name,
        instruction=step.instruction,
        planned_prompt=step.prompt or "",
        used_prompt=attempt.prompt,
        previous_image=image_block(previous),
        candidate_image=image_block(attempt.image),
    )
    model, messages = for_output_mode(
        ImageInliningChatModel(inner=runtime.context.backends.critic, store=store),
        messages,
        state["settings"].options.output_mode,
        VerdictAnswer,
        "verdict",
    )
    critique, _ = await ask_until_parsed(
        model,
        messages,
        parse_verdict,
        what="verdict",
        max_reasks=state["settings"].options.max_reasks,
        where=f"thread {thread_of(runtime)}, step {step.number}, attempt {attempt.number}",
        identity=f"critic {model_identity(runtime.context.backends.critic)}",
        timeout=runtime.context.timeouts.model,
        tries=try_label(runtime),
        config={
            "run_name": "critic",
            "tags": ["critic"],
            "metadata": {
                "thread_id": thread_of(runtime),
                "step": step.number,
                "attempt": attempt.number,
            },
        },
    )
    return critique
