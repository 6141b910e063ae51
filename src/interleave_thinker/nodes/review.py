"""Human review of the plan: the run pauses with LangGraph's interrupt() before any image is drawn."""

from __future__ import annotations

import json
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import interrupt

from interleave_thinker.context import Context
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.events import PlanReady
from interleave_thinker.nodes.common import emit, emit_committed
from interleave_thinker.prompts.parsing import OutputParseError, parse_plan
from interleave_thinker.state import Plan, Request, RunOptions, StepProgress, TrajectoryState


def plan_for_review(plan: Plan) -> dict[str, Any]:
    """The plan in the planner's own answer format, which a person edits and sends back."""
    return {
        "execution_plan": [
            {
                "step_number": step.number,
                "step_name": step.name,
                "instruction": step.instruction,
                "prompt": step.prompt,
                "auxiliary_text": step.text,
                "sources": [
                    int(source.split(":")[1]) if source.startswith("step:") else source
                    for source in step.sources
                ],
            }
            for step in plan.steps
        ]
    }


def check_edited_plan(answer: Any, request: Request, options: RunOptions) -> Plan:
    """The edited plan as a Plan, or a ConfigurationError saying what is wrong with it."""
    try:
        return parse_plan(
            json.dumps(answer), input_images=len(request.images), max_steps=options.max_steps
        )
    except (OutputParseError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"the edited plan is not valid: {exc}",
            hint="keep the execution_plan format you were given; resume again with a fixed plan",
        ) from exc


async def review_plan(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    plan, request = state["plan"], state["request"]
    assert plan is not None
    # Resumed with True/None the plan stands; with a dict, that dict is the new plan.
    answer = interrupt({"kind": "review_plan", "plan": plan_for_review(plan)})
    if answer is None or answer is True:
        return {}
    edited = check_edited_plan(answer, request, state["settings"].options)
    progress = tuple(
        StepProgress(
            number=step.number,
            status="text" if step.action == "none" else "pending",
            next_prompt=step.prompt,
        )
        for step in edited.steps
    )
    emit(runtime, PlanReady(steps=[step.model_dump(mode="json") for step in edited.steps]))
    for item in progress:
        if item.finished:
            emit_committed(runtime, edited, item)
    return {"plan": edited, "progress": progress}
