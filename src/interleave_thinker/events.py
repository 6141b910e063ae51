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
    """The image of an attempt is stored, reused from an earlier, interrupted run (``reused``),
    or taken from an earlier attempt of the step whose request this one repeats (``repeats``)."""

    event: Literal["image"] = "image"
    attempt: int
    image: str = Field(description="sha256 of the image in the image store.")
    reused: bool = Field(
        default=False,
        description="Drawn for this very attempt before a restart and found in the generation "
        "ledger: not drawn again (it was counted as a call when it was drawn).",
    )
    repeats: int | None = Field(
        default=None,
        description="The earlier attempt of this step with the same prompt and seed: its image "
        "is reused, nothing is drawn and no generator call is counted.",
    )


# What follows a rejection that leaves the step open: its next attempt is drawn, it repeats
# an earlier request (same prompt and seed: the image is reused, nothing is drawn), or no
# generator call is left for it (--max-calls), so it is committed as forced when the run ends.
NextAttempt = Literal["drawn", "repeated", "none"]


class Verdict(_StepEvent):
    """The critic judged an attempt; success is None when the attempt was kept unjudged."""

    event: Literal["verdict"] = "verdict"
    attempt: int
    success: bool | None
    status: str
    # Set when the step stays open (rejected with attempts left); None once it is decided.
    next_attempt: NextAttempt | None = None


class BudgetExhausted(_Event):
    """The run ends with steps the call budget could not finish (sent before they are committed).

    ``forced`` steps keep an attempt the critic did not accept; ``skipped`` steps have no image.
    """

    event: Literal["budget"] = "budget"
    calls: int = Field(description="Generator calls made (backend draws).")
    max_calls: int
    forced: list[int] = Field(default=[], description="Step numbers committed as forced.")
    skipped: list[int] = Field(default=[], description="Step numbers committed as skipped.")


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
    ThreadStarted
    | PlanReady
    | StepStarted
    | ImageReady
    | Verdict
    | StepCommitted
    | BudgetExhausted
    | DocumentReady,
    Field(discriminator="event"),
]
_ADAPTER: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)


def parse_event(chunk: dict[str, Any]) -> ProgressEvent | None:
    """The typed event of a ``custom`` stream chunk, or None for chunks that are not ours."""
    if not isinstance(chunk, dict) or chunk.get("event") not in _EVENT_NAMES:
        return None
    return _ADAPTER.validate_python(chunk)


_EVENT_NAMES = {"thread", "plan", "generating", "image", "verdict", "committed", "budget", "document"}
