"""The planner node: asks the planner model for the whole plan, once, before any image is drawn."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import adispatch_custom_event
from langgraph.runtime import Runtime

from interleave_thinker.context import Context, model_label
from interleave_thinker.models.messages import ImageInliningChatModel, image_block
from interleave_thinker.nodes.asking import ask_until_parsed, for_output_mode
from interleave_thinker.nodes.common import adopt_plan, thread_of
from interleave_thinker.nodes.retrying import try_label
from interleave_thinker.prompts.parsing import read_plan
from interleave_thinker.prompts.schemas import PlanAnswer
from interleave_thinker.state import TrajectoryState


async def plan_trajectory(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the planner model for the whole plan, re-asking unreadable replies.

    Reads ``request`` (text and input images) and ``settings`` (step limit, output mode,
    re-asks); the messages come from the context's prompt pack. Writes ``plan`` and
    ``progress`` (one entry per step: pending, or finished as ``text`` for a step that draws
    nothing). Emits ``PlanReady`` (with notes on corrections, such as renumbered steps, also
    sent to the trace as a ``plan_notes`` custom event), then ``StepCommitted`` for each
    text-only step.
    """
    request = state["request"]
    options = state["settings"].options
    store = runtime.context.image_store
    pack = runtime.context.prompts
    messages = pack.planner_messages(
        request.text, [image_block(ref) for ref in request.images], max_steps=options.max_steps
    )
    model, messages = for_output_mode(
        ImageInliningChatModel(inner=runtime.context.backends.planner, store=store),
        messages,
        options.output_mode,
        PlanAnswer,
        "plan",
    )
    (plan, notes), _ = await ask_until_parsed(
        model,
        messages,
        lambda text: read_plan(text, input_images=len(request.images), max_steps=options.max_steps),
        what="plan",
        reask=pack.reask_message,
        max_reasks=options.max_reasks,
        where=f"thread {thread_of(runtime)}, planning",
        identity=f"planner {model_label(runtime.context.backends.planner)}",
        timeout=runtime.context.timeouts.model,
        tries=try_label(runtime),
        config={
            "run_name": "planner",
            "tags": ["planner"],
            "metadata": {"thread_id": thread_of(runtime)},
        },
    )
    if notes:
        # Corrections made while reading the plan (renumbered steps) go into the trace.
        await adispatch_custom_event("plan_notes", {"notes": list(notes)})
    return adopt_plan(runtime, plan, notes=notes)
