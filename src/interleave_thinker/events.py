"""Typed progress events a run streams on LangGraph's ``custom`` stream mode."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StepEvent(_Event):
    step: int
    index: int = Field(description="Position of the step in the plan, from 1.")
    total: int = Field(description="Number of steps in the plan.")


class ThreadStarted(_Event):
    """A run started or resumed a thread (sent by the runner, before the graph streams)."""

    event: Literal["thread"] = "thread"
    thread_id: str
    resumed: bool


class PlanReady(_Event):
    """The planner's plan was parsed; no image has been drawn yet."""

    event: Literal["plan"] = "plan"
    steps: list[dict[str, Any]]
    # What was corrected while reading the plan (e.g. renumbered steps).
    notes: list[str] = []


class StepStarted(_StepEvent):
    """A generator call for this step and attempt is about to start."""

    event: Literal["generating"] = "generating"
    attempt: int
    prompt: str


class ImageReady(_StepEvent):
    """The image of an attempt is stored (or reused from an earlier, interrupted run)."""

    event: Literal["image"] = "image"
    attempt: int
    image: str = Field(description="sha256 of the image in the image store.")
    reused: bool = False


class Verdict(_StepEvent):
    """The critic judged an attempt; success is None when the attempt was kept unjudged."""

    event: Literal["verdict"] = "verdict"
    attempt: int
    success: bool | None
    status: str


class StepCommitted(_StepEvent):
    """A step is final: accepted, forced, text-only or skipped."""

    event: Literal["committed"] = "committed"
    status: str
    image: str | None = None


class DocumentReady(_Event):
    """The document is composed; the run is about to end."""

    event: Literal["document"] = "document"
    steps: int


ProgressEvent = Annotated[
    ThreadStarted | PlanReady | StepStarted | ImageReady | Verdict | StepCommitted | DocumentReady,
    Field(discriminator="event"),
]
_ADAPTER: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)


def parse_event(chunk: dict[str, Any]) -> ProgressEvent | None:
    """The typed event of a ``custom`` stream chunk, or None for chunks that are not ours."""
    if not isinstance(chunk, dict) or chunk.get("event") not in _EVENT_NAMES:
        return None
    return _ADAPTER.validate_python(chunk)


_EVENT_NAMES = {"thread", "plan", "generating", "image", "verdict", "committed", "document"}
