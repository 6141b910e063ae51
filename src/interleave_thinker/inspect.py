"""Read threads without running them: list them, report one in full, load a finished document."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from langgraph.types import StateSnapshot

from interleave_thinker.checkpoints.faults import check_state, storage_faults
from interleave_thinker.checkpoints.savers import list_thread_ids
from interleave_thinker.errors import DamagedCheckpointError, UnknownThreadError
from interleave_thinker.runner import run_blocking
from interleave_thinker.state import Document, DocumentStep, StepProgress
from interleave_thinker.workspace import Workspace, thread_config


async def aload_document(
    thread_id: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
) -> Document:
    """The finished document of a thread; refuses a thread that has not finished."""
    workspace = Workspace.open(run_dir, checkpointer)
    workspace.refuse_missing_thread(thread_id)  # before opening: that would create the run dir
    async with workspace.graph() as graph:
        state = await workspace.existing_state(graph, thread_id)
    document = state.get("document")
    if document is None:
        raise UnknownThreadError(
            f"thread {thread_id} has not finished yet, so it has no document",
            hint=f"finish it with `interleave resume {thread_id}`",
        )
    return document


@dataclass(frozen=True)
class ThreadSummary:
    """One line of `interleave list`."""

    thread_id: str
    status: str
    request: str
    steps: int
    generator_calls: int
    updated_at: str


def _status(snapshot: StateSnapshot) -> str:
    values = snapshot.values
    if values.get("document") is not None:
        return "done"
    if snapshot.interrupts:
        return "waiting for review"
    if any(task.error for task in snapshot.tasks):
        return "failed"
    return "unfinished"


async def alist_threads(
    *, run_dir: str | os.PathLike[str] | None = None, checkpointer: str | None = None
) -> list[ThreadSummary]:
    """Every thread in the checkpointer, newest first (none when there is no run directory, which
    is not created)."""
    workspace = Workspace.open(run_dir, checkpointer)
    if workspace.missing_checkpoints() is not None:
        return []
    summaries = []
    async with workspace.graph() as graph:
        assert graph.checkpointer is not None and not isinstance(graph.checkpointer, bool)
        with storage_faults(None, workspace.checkpointer_url):
            threads = await list_thread_ids(graph.checkpointer)
        for thread in threads:
            try:
                with storage_faults(thread, workspace.checkpointer_url):
                    snapshot = await graph.aget_state(thread_config(thread))
                values = check_state(thread, snapshot.values)
            except DamagedCheckpointError:
                # One damaged thread must not hide the others; `show` says what is wrong.
                summaries.append(ThreadSummary(thread, "damaged", "(its checkpoint is damaged)", 0, 0, ""))
                continue
            if not values:
                continue
            plan = values.get("plan")
            summaries.append(
                ThreadSummary(
                    thread_id=thread,
                    status=_status(snapshot),
                    request=values["request"].text,
                    steps=len(plan.steps) if plan else 0,
                    generator_calls=values.get("generator_calls", 0),
                    updated_at=snapshot.created_at or "",
                )
            )
    return sorted(summaries, key=lambda s: s.updated_at, reverse=True)


async def athread_report(
    thread_id: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
) -> dict[str, Any]:
    """Everything about a thread as plain JSON data: settings, plan, every attempt, timings."""
    workspace = Workspace.open(run_dir, checkpointer)
    workspace.refuse_missing_thread(thread_id)
    async with workspace.graph() as graph:
        await workspace.existing_state(graph, thread_id)
        with storage_faults(thread_id, workspace.checkpointer_url):
            snapshot = await graph.aget_state(thread_config(thread_id))
    values = snapshot.values
    plan = values.get("plan")
    progress: dict[int, StepProgress | DocumentStep] = {
        item.number: item for item in values.get("progress", ())
    }
    document: Document | None = values.get("document")
    if document is not None:
        # A finished thread keeps its attempts in the document only.
        progress = {item.number: item for item in document.steps}
    steps = []
    for step in plan.steps if plan else ():
        item = progress.get(step.number)
        steps.append(
            {
                "number": step.number,
                "name": step.name,
                "instruction": step.instruction,
                "prompt": step.prompt,
                "text": step.display_text,
                "action": step.action,
                "sources": list(step.sources),
                "status": item.status if item else "pending",
                "chosen_attempt": None if item is None or item.chosen is None
                else item.attempts[item.chosen].number,
                "image": _final_image(item),
                "attempts": [a.model_dump(mode="json") for a in item.attempts] if item else [],
            }
        )
    errors = [f"{task.name}: {task.error}" for task in snapshot.tasks if task.error]
    path = workspace.document_path(thread_id)
    return {
        "thread_id": thread_id,
        "status": _status(snapshot),
        "request": values["request"].model_dump(mode="json"),
        "settings": values["settings"].model_dump(mode="json"),
        "generator_calls": values.get("generator_calls", 0),
        "updated_at": snapshot.created_at,
        "next": list(snapshot.next),
        "errors": errors,
        "document_path": str(path) if path.exists() else None,
        "text_answer": document.text_answer if document is not None else None,
        "steps": steps,
    }


def _final_image(item: StepProgress | DocumentStep | None) -> str | None:
    if item is None:
        return None
    image = item.image if isinstance(item, DocumentStep) else item.final_image
    return image.sha256 if image else None




def load_document(thread_id: str, **kwargs: Any) -> Document:
    """Blocking form of :func:`aload_document`; also works inside a running event loop."""
    return run_blocking(aload_document(thread_id, **kwargs))


def list_threads(**kwargs: Any) -> list[ThreadSummary]:
    """Blocking form of :func:`alist_threads`; also works inside a running event loop."""
    return run_blocking(alist_threads(**kwargs))


def thread_report(thread_id: str, **kwargs: Any) -> dict[str, Any]:
    """Blocking form of :func:`athread_report`; also works inside a running event loop."""
    return run_blocking(athread_report(thread_id, **kwargs))
