"""The critic node: judges every fresh attempt of the pass concurrently and decides each step's fate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, NamedTuple, TypeVar

from langchain_core.messages import BaseMessage
from langgraph.runtime import Runtime

from interleave_thinker.context import Context, model_identity, model_label
from interleave_thinker.errors import ModelOutputError
from interleave_thinker.events import NextAttempt, Verdict
from interleave_thinker.models.messages import ImageInliningChatModel
from interleave_thinker.nodes.asking import ask_until_parsed, for_output_mode
from interleave_thinker.nodes.common import emit, emit_committed, position, thread_of
from interleave_thinker.nodes.retrying import is_transient, try_label
from interleave_thinker.nodes.scheduling import (
    finish_out_of_budget,
    next_pass,
    repeated_attempt,
    source_images,
)
from interleave_thinker.prompts.parsing import parse_verdict
from interleave_thinker.prompts.schemas import VerdictAnswer
from interleave_thinker.state import (
    Attempt,
    Budget,
    Critique,
    Plan,
    RunOptions,
    StepProgress,
    TrajectoryState,
)
from interleave_thinker.storage.image_store import blank_canvas
from interleave_thinker.storage.verdicts import VerdictLedger, verdict_key

T = TypeVar("T")


class Judgement(NamedTuple):
    """What the critic said of one attempt (None: kept unjudged) and how long it took to say it."""

    critique: Critique | None
    seconds: float


class CriticQuestion(NamedTuple):
    """One question to the critic: its messages, and the verdict key that names them."""

    messages: list[BaseMessage]
    key: str


async def judge_attempts(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Judge the newest attempt of every step awaiting the critic, then decide each step's fate.

    Reads ``plan``, ``request``, ``settings`` (budget, output mode, re-asks, review_forced) and
    ``progress`` (the attempts awaiting a verdict, and the final images their steps edit). The
    attempts are judged concurrently; each verdict is recorded in the verdict ledger as it
    arrives, and one found there (from an earlier try of this node, or a process that crashed
    before its checkpoint) is reused instead of asking again.

    Writes ``progress``: each judged attempt gains its ``critique``; its step is accepted, goes
    back to the generator with the critic's refined prompt, is committed as forced (out of
    attempts, or kept unjudged), or waits for a person (``awaiting_review``).

    Emits ``Verdict`` for each step of the pass (``success`` None when its attempt was kept
    unjudged; a reused verdict is announced like a fresh one; ``next_attempt`` says whether a step
    left open is drawn again, repeats an earlier request, or gets no call within the budget) and
    ``StepCommitted`` for each step that became final.
    """
    plan = state["plan"]
    assert plan is not None
    options = state["settings"].options
    fresh = [item for item in state["progress"] if item.awaiting_critique]
    judgements = await _settled([_judge(state, runtime, item) for item in fresh])

    decided: dict[int, StepProgress] = {}
    for item, judgement in zip(fresh, judgements, strict=True):
        item = _decided(item, judgement, options.budget, review_forced=options.review_forced)
        decided[item.number] = item
    progress = tuple(decided.get(item.number, item) for item in state["progress"])
    # What the next pass does (as the graph will route): a rejected step it leaves out gets no
    # call, ever, since that pass spends the rest of the budget.
    drawn_next = {step.number for step in next_pass(plan, progress, options, state.get("generator_calls", 0))}
    for item, judgement in zip(fresh, judgements, strict=True):
        item = decided[item.number]
        emit(
            runtime,
            Verdict(
                **position(plan, item.number),
                attempt=item.attempts[-1].number,
                success=None if judgement.critique is None else judgement.critique.success,
                status="review" if item.awaiting_review else item.status,
                next_attempt=_next_attempt(plan, options, item, drawn_next),
            ),
        )
        if item.finished:
            emit_committed(runtime, plan, item)
    return {"progress": progress}


def _next_attempt(
    plan: Plan, options: RunOptions, item: StepProgress, drawn_next: set[int]
) -> NextAttempt | None:
    """For a step left open: whether its next attempt is drawn, repeats an earlier request (the
    image is reused) or never comes (no generator call left); None for a decided step."""
    if item.finished or item.awaiting_review:
        return None
    if item.number not in drawn_next:
        return "none"
    repeated = repeated_attempt(options, plan, plan.step(item.number), item)
    return "drawn" if repeated is None else "repeated"


async def _judge(state: TrajectoryState, runtime: Runtime[Context], item: StepProgress) -> Judgement:
    """The verdict on ``item``'s newest attempt: recorded earlier, or asked now and recorded."""
    budget = state["settings"].options.budget
    attempt = item.attempts[-1]
    if budget.accept_final_without_critic and attempt.number >= budget.max_attempts:
        return Judgement(None, 0.0)  # the paper's forced pass: the last allowed attempt is not judged
    question = await _question(state, runtime, item, attempt)
    verdicts = _verdict_ledger(runtime.context)
    # File I/O goes to a worker thread: the event loop may be serving other runs.
    recorded = await asyncio.to_thread(verdicts.lookup, question.key)
    if recorded is not None:
        return Judgement(recorded.critique, recorded.seconds)
    started = time.monotonic()
    critique = await _ask_critic(state, runtime, item, attempt, question)
    seconds = time.monotonic() - started
    # Recorded the moment it is read: a retry or a resume from here on never asks again.
    await asyncio.to_thread(
        verdicts.record,
        question.key,
        critique,
        seconds=seconds,
        thread_id=thread_of(runtime),
        step=item.number,
        attempt=attempt.number,
    )
    return Judgement(critique, seconds)


def _decided(
    item: StepProgress, judgement: Judgement, budget: Budget, *, review_forced: bool
) -> StepProgress:
    """``item`` with the judgement on its newest attempt, and what that means for the step."""
    critique = judgement.critique
    attempt = item.attempts[-1].model_copy(
        update={"critique": critique, "critique_seconds": judgement.seconds}
    )
    item = item.model_copy(update={"attempts": (*item.attempts[:-1], attempt)})
    if critique is not None and critique.success:
        return item.model_copy(
            update={"status": "accepted", "chosen": len(item.attempts) - 1, "next_prompt": None}
        )
    if critique is None or attempt.number >= budget.max_attempts:
        if review_forced:
            return item.model_copy(update={"awaiting_review": True, "next_prompt": None})
        return finish_out_of_budget(item, budget)
    # Keep the last prompt when the critic rejects without proposing a better one.
    return item.model_copy(update={"next_prompt": critique.refine_prompt or attempt.prompt})


async def _settled(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``calls`` concurrently and return their results in order, or raise the first failure.

    A transient failure waits for the other calls to finish: their verdicts are recorded, so the
    node's retry asks again only about the failed ones (and never twice about one attempt at
    once). A permanent failure stops the run, so the others are cancelled at once rather than
    waited for (a hung call would hold the error back); so are all of them when the node itself
    is cancelled.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    transient: BaseException | None = None
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                error = task.exception() if task in done else None
                if error is None:
                    continue
                if not is_transient(error):
                    raise error
                transient = transient or error
    except BaseException:
        for task in tasks:
            task.cancel()
        # Let the cancelled calls unwind (their errors are not the one to report).
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if transient is not None:
        raise transient
    return [task.result() for task in tasks]


def _verdict_ledger(context: Context) -> VerdictLedger:
    assert context.verdicts is not None  # Context fills it in when it is not given
    return context.verdicts


async def _question(
    state: TrajectoryState, runtime: Runtime[Context], item: StepProgress, attempt: Attempt
) -> CriticQuestion:
    """The messages that ask the critic about ``attempt``, and their verdict key."""
    plan, request = state["plan"], state["request"]
    assert plan is not None
    step = plan.step(item.number)
    sources = source_images(step, request, state["progress"])
    # Before the first image there is nothing to compare with: the critic sees a white canvas.
    previous = sources[0] if sources else await asyncio.to_thread(
        blank_canvas, runtime.context.image_store, attempt.image.width, attempt.image.height
    )
    messages = runtime.context.prompts.attempt_messages(step, attempt, previous)
    # The messages name both images by hash and carry both prompts: with the critic and the
    # output mode they are the whole question, so any change to it is a new key.
    key = verdict_key(
        thread=thread_of(runtime),
        step=step.number,
        attempt=attempt.number,
        image=attempt.image.sha256,
        critic=model_identity(runtime.context.backends.critic),
        output_mode=state["settings"].options.output_mode,
        messages=[{"type": message.type, "content": message.content} for message in messages],
    )
    return CriticQuestion(messages, key)


async def _ask_critic(
    state: TrajectoryState,
    runtime: Runtime[Context],
    item: StepProgress,
    attempt: Attempt,
    question: CriticQuestion,
) -> Critique:
    """Ask the critic ``question``, re-asking unreadable replies; the parsed critique."""
    options = state["settings"].options
    critic = runtime.context.backends.critic
    model, messages = for_output_mode(
        ImageInliningChatModel(inner=critic, store=runtime.context.image_store),
        question.messages,
        options.output_mode,
        VerdictAnswer,
        "verdict",
    )
    try:
        critique, _ = await ask_until_parsed(
            model,
            messages,
            parse_verdict,
            what="verdict",
            reask=runtime.context.prompts.reask_message,
            max_reasks=options.max_reasks,
            where=f"thread {thread_of(runtime)}, step {item.number}, attempt {attempt.number}",
            identity=f"critic {model_label(critic)}",
            timeout=runtime.context.timeouts.model,
            tries=try_label(runtime),
            config={
                "run_name": "critic",
                "tags": ["critic"],
                "metadata": {
                    "thread_id": thread_of(runtime),
                    "step": item.number,
                    "attempt": attempt.number,
                },
            },
        )
    except ModelOutputError as error:
        if options.unreadable_verdict != "reject":
            raise
        # The official script's reading: a critic that never answers readably has not accepted.
        return Critique(success=False, reasoning=f"no readable verdict: {error}")
    return critique
