"""JSON schemas of the planner's and critic's answers, for constrained (structured) decoding."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Bounds keep constrained decoding finite even for a model that would ramble forever.
MAX_TEXT = 600


class PlannedStep(BaseModel):
    """One step as the planner writes it (the released checkpoints' field names)."""

    model_config = ConfigDict(extra="forbid")

    step_number: int = Field(ge=1, le=1000)
    step_name: str = Field(max_length=120)
    instruction: str = Field(min_length=1, max_length=MAX_TEXT)
    prompt: str | None = Field(default=None, max_length=MAX_TEXT)
    auxiliary_text: str | None = Field(default=None, max_length=MAX_TEXT)


class PlanAnswer(BaseModel):
    """The planner's answer: the whole plan."""

    model_config = ConfigDict(extra="forbid")

    execution_plan: list[PlannedStep] = Field(min_length=1, max_length=100)


class VerdictAnswer(BaseModel):
    """The critic's answer on one attempt."""

    model_config = ConfigDict(extra="forbid")

    previous_step_success: bool
    refine_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
