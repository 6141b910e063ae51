"""Human review through interrupt(): the plan before drawing, forced steps before committing."""

from __future__ import annotations

import json
import re
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import interrupt

from interleave_thinker.context import Context
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.nodes.common import adopt_plan, emit_committed
from interleave_thinker.nodes.scheduling import select_attempt
from interleave_thinker.prompts.parsing import OutputParseError, parse_plan
from interleave_thinker.state import Plan, Request, RunOptions, TrajectoryState

REVIEW_KINDS = ("review_plan", "review_forced")


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
    except RecursionError as exc:
        raise ConfigurationError(
            "the edited plan is nested too deeply",
            hint="keep the execution_plan format you were given; resume again with a fixed plan",
        ) from exc
    except (OutputParseError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"the edited plan is not valid: {exc}",
            hint="keep the execution_plan format you were given; resume again with a fixed plan",
        ) from exc


async def review_plan(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Pause for a person to keep or edit the plan (``--review-plan``), before anything is drawn.

    Reads ``plan``, ``request`` and ``settings``; interrupts with ``{"kind": "review_plan",
    "plan": ...}`` (the plan in the planner's answer format). Resumed with True or None it writes
    nothing; with a dict, that dict is checked and becomes the new ``plan`` and ``progress``, and
    ``PlanReady`` (plus ``StepCommitted`` for text-only steps) is emitted as for the planner's.
    """
    plan, request = state["plan"], state["request"]
    assert plan is not None
    # Resumed with True/None the plan stands; with a dict, that dict is the new plan.
    answer = interrupt({"kind": "review_plan", "plan": plan_for_review(plan)})
    if answer is None or answer is True:
        return {}
    return adopt_plan(runtime, check_edited_plan(answer, request, state["settings"].options))


def forced_for_review(state: TrajectoryState) -> dict[str, Any]:
    """The steps waiting for a choice, each with its attempts and the policy's own pick."""
    plan = state["plan"]
    assert plan is not None
    policy = state["settings"].options.budget.selection
    steps = []
    for item in state["progress"]:
        if not item.awaiting_review:
            continue
        steps.append(
            {
                "step": item.number,
                "name": plan.step(item.number).name,
                "policy_keeps": item.attempts[select_attempt(item.attempts, policy)].number,
                "attempts": [
                    {
                        "attempt": attempt.number,
                        "prompt": attempt.prompt,
                        "image": attempt.image.sha256,
                        "critique": attempt.critique.model_dump(mode="json")
                        if attempt.critique
                        else None,
                    }
                    for attempt in item.attempts
                ],
            }
        )
    return {"kind": "review_forced", "steps": steps}


def _chosen_attempts(answer: Any, state: TrajectoryState) -> dict[int, int]:
    """Step number -> attempt number to keep, from True (the policy's picks) or a mapping."""
    waiting = {item.number: item for item in state["progress"] if item.awaiting_review}
    if answer is True:
        return {}
    if not isinstance(answer, dict):
        raise ConfigurationError(
            "the answer to a forced-step review must be true or a mapping step -> attempt",
            hint="for example {\"2\": 1} keeps attempt 1 of step 2",
        )
    chosen: dict[int, int] = {}
    for raw_step, raw_attempt in answer.items():
        step, attempt = _whole_number(raw_step), _whole_number(raw_attempt)
        if step is None or attempt is None:
            raise ConfigurationError(
                f"{str(raw_step)[:40]}={str(raw_attempt)[:40]} is not STEP=ATTEMPT",
                hint="both are whole numbers: {\"2\": 1} keeps attempt 1 of step 2",
            )
        if step not in waiting:
            raise ConfigurationError(
                f"step {step} is not waiting for review",
                hint=f"waiting: {', '.join(map(str, sorted(waiting))) or 'none'}",
            )
        if not 1 <= attempt <= len(waiting[step].attempts):
            raise ConfigurationError(
                f"step {step} has attempts 1 to {len(waiting[step].attempts)}, not {attempt}"
            )
        chosen[step] = attempt
    return chosen


def _whole_number(value: Any) -> int | None:
    """An int from an int, a digit string or a float with no fraction; None for anything else.

    1.7 must not quietly become attempt 1, nor inf crash the check.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value):
        return int(value)
    return None


def check_review_answer(answer: Any, state: TrajectoryState) -> None:
    """Refuse an answer that does not fit the review the thread is waiting for."""
    if any(item.awaiting_review for item in state.get("progress", ())):
        _chosen_attempts(answer, state)
    elif isinstance(answer, dict):
        check_edited_plan(answer, state["request"], state["settings"].options)


async def review_forced(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Pause for a person to pick the attempt each forced step keeps (``--review-forced``).

    Reads ``plan``, ``settings`` (selection policy) and ``progress`` (the steps
    ``awaiting_review``); interrupts with ``forced_for_review``'s payload. Resumed with True the
    policy's picks stand; with a mapping step -> attempt, those are kept. Writes ``progress``
    (each waiting step committed as forced with its chosen attempt). Emits ``StepCommitted`` for
    each of them.
    """
    plan = state["plan"]
    assert plan is not None
    policy = state["settings"].options.budget.selection
    chosen = _chosen_attempts(interrupt(forced_for_review(state)), state)
    progress = []
    for item in state["progress"]:
        if item.awaiting_review:
            index = (
                chosen[item.number] - 1
                if item.number in chosen
                else select_attempt(item.attempts, policy)
            )
            item = item.model_copy(
                update={"status": "forced", "chosen": index, "awaiting_review": False}
            )
            emit_committed(runtime, plan, item)
        progress.append(item)
    return {"progress": tuple(progress)}
