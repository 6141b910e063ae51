"""Small helpers every node shares: the thread id and progress events."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime
from pydantic import BaseModel

from interleave_thinker.events import PlanReady, StepCommitted
from interleave_thinker.state import Plan, StepProgress


def thread_of(runtime: Runtime[Any]) -> str:
    info = runtime.execution_info
    return (info.thread_id if info else None) or "(no thread)"


def emit(runtime: Runtime[Any], event: BaseModel) -> None:
    """Send a typed progress event on the ``custom`` stream (free when nobody listens)."""
    runtime.stream_writer(event.model_dump(mode="json"))


def emit_committed(runtime: Runtime[Any], plan: Plan, item: StepProgress) -> None:
    """Announce that a step became final."""
    image = item.final_image
    emit(
        runtime,
        StepCommitted(
            **position(plan, item.number),
            status=item.status,
            image=image.sha256 if image else None,
        ),
    )


def position(plan: Plan, number: int) -> dict[str, int]:
    """Event fields that place step ``number`` in the plan ("step 2 of 5")."""
    numbers = [step.number for step in plan.steps]
    return {"step": number, "index": numbers.index(number) + 1, "total": len(numbers)}


def adopt_plan(runtime: Runtime[Any], plan: Plan, *, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state update that starts ``plan``, announced on the progress stream."""
    progress = tuple(
        StepProgress(
            number=step.number,
            # A text-only step is finished as soon as it is planned: it draws nothing.
            status="text" if step.action == "none" else "pending",
            next_prompt=step.prompt,
        )
        for step in plan.steps
    )
    emit(runtime, PlanReady(steps=[step.model_dump(mode="json") for step in plan.steps], notes=list(notes)))
    for item in progress:
        if item.finished:
            emit_committed(runtime, plan, item)
    return {"plan": plan, "progress": progress}
