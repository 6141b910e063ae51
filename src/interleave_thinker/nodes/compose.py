"""The compose node: commits what is left when the loop ends and assembles the document."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from interleave_thinker.context import Context
from interleave_thinker.events import BudgetExhausted, DocumentReady
from interleave_thinker.nodes.common import emit, emit_committed
from interleave_thinker.nodes.scheduling import finish_out_of_budget
from interleave_thinker.state import Document, DocumentStep, TrajectoryState


async def compose_document(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Commit the steps still open and assemble the interleaved document.

    Reads ``plan``, ``request``, ``settings`` (budget, profile), ``progress`` and
    ``generator_calls``. Steps not finished ran out of the call budget: each is committed as
    forced (it has attempts) or skipped. Writes ``document`` and empties ``progress``. Emits
    ``BudgetExhausted`` (which steps are forced, which skipped) when it commits any, then
    ``StepCommitted`` for each step it committed, then ``DocumentReady``.
    """
    plan, settings = state["plan"], state["settings"]
    assert plan is not None
    # Steps still pending here ran out of the trajectory's call budget.
    progress = tuple(
        item if item.finished else finish_out_of_budget(item, settings.options.budget)
        for item in state["progress"]
    )
    left_open = [
        after for before, after in zip(state["progress"], progress, strict=True) if not before.finished
    ]
    if left_open:
        emit(
            runtime,
            BudgetExhausted(
                calls=state.get("generator_calls", 0),
                max_calls=settings.options.budget.max_calls,
                forced=[item.number for item in left_open if item.status == "forced"],
                skipped=[item.number for item in left_open if item.status == "skipped"],
            ),
        )
    by_step = {item.number: item for item in progress}
    steps = tuple(
        DocumentStep(
            number=step.number,
            name=step.name,
            text=step.display_text,
            instruction=step.instruction,
            status=by_step[step.number].status,
            image=by_step[step.number].final_image,
            attempts=by_step[step.number].attempts,
            chosen=by_step[step.number].chosen,
        )
        for step in plan.steps
    )
    document = Document(
        request=state["request"],
        steps=steps,
        profile=settings.profile,
        generator_calls=state.get("generator_calls", 0),
    )
    for before, after in zip(state["progress"], progress, strict=True):
        if not before.finished:
            emit_committed(runtime, plan, after)
    emit(runtime, DocumentReady(steps=len(steps)))
    # The document now holds every step's attempts: keeping them in `progress` as well would
    # store each attempt twice in the final checkpoint (about half its size).
    return {"progress": (), "document": document}
