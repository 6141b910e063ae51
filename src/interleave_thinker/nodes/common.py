"""Small helpers every node shares: the thread id and progress events."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from interleave_thinker.state import Plan


def thread_of(runtime: Runtime[Any]) -> str:
    info = runtime.execution_info
    return (info.thread_id if info else None) or "(no thread)"


def emit(runtime: Runtime[Any], event: str, **fields: Any) -> None:
    """Send a progress event on the ``custom`` stream (shown by the CLI, free when nobody listens)."""
    runtime.stream_writer({"event": event, **fields})


def position(plan: Plan, number: int) -> dict[str, int]:
    """Event fields that place step ``number`` in the plan ("step 2 of 5")."""
    numbers = [step.number for step in plan.steps]
    return {"step": number, "index": numbers.index(number) + 1, "total": len(numbers)}
