"""Training samples from finished trajectories, built by the prompt pack code the graph runs.

A planner sample is the planner's input for a request (``pack.planner_messages``, exactly what
the planner node sends) and the plan it gave, written back in the format the pack asks for. A
critic sample is the critic's input for one judged attempt (``pack.critic_messages``: the
previous image, a white canvas before the first step, the candidate, the planned and the used
prompt) and the verdict it gave. So a model trained on these samples sees at inference the very
inputs it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from langchain_core.messages import BaseMessage

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models.messages import image_block
from interleave_thinker.prompts.official import FETCH_COMMAND, recorded_clone
from interleave_thinker.prompts.packs import (
    INTERLEAVE,
    OFFICIAL,
    InterleavePack,
    OfficialPack,
    PromptPack,
    read_official_templates,
    resolve_prompt_pack,
)
from interleave_thinker.prompts.parsing import MAX_REASONING_CHARS
from interleave_thinker.state import Attempt, Critique, ImageRef, Plan, Step
from interleave_thinker.storage.image_store import CheckedImage, blank_png, image_ref
from interleave_thinker.training.threads import Trajectory

# What parse_verdict appends to a reasoning it had to cut: such a sample would teach the marker.
_CUT_MARKER = " [... reasoning cut ...]"


@dataclass(frozen=True)
class PlannerSample:
    """The planner's input for one request and the plan it gave (as the assistant's reply)."""

    thread_id: str
    messages: list[BaseMessage]
    reply: str


@dataclass(frozen=True)
class CriticSample:
    """The critic's input for one judged attempt and the verdict it gave."""

    thread_id: str
    step: Step
    status: str
    attempt: Attempt
    critique: Critique
    previous: ImageRef
    # Set when ``previous`` is the white canvas before the first step (not in the image store).
    canvas: CheckedImage | None
    messages: list[BaseMessage]
    reply: str

    @property
    def planned_prompt(self) -> str:
        return self.step.prompt or ""


class PackChooser:
    """The prompt pack for each thread: the one ``spec`` names, or (``None``/``auto``) the one the
    thread was run with, rebuilt (official: from the fetched clone, whose text must match)."""

    def __init__(self, spec: str | None) -> None:
        self.spec = None if spec in (None, "", "auto") else spec
        self._fixed: PromptPack | None = resolve_prompt_pack(self.spec) if self.spec else None
        self._official: OfficialPack | None = None

    def pack_for(self, trajectory: Trajectory) -> PromptPack:
        if self._fixed is not None:
            return self._fixed
        recorded = trajectory.settings.prompts
        if recorded == INTERLEAVE:
            return InterleavePack()
        if recorded.startswith(f"{OFFICIAL}:"):
            if self._official is None:
                clone = recorded_clone()
                if clone is None:
                    raise ConfigurationError(
                        f"thread {trajectory.thread_id} was run with the official prompts, which are "
                        "not available here",
                        hint=f"run `{FETCH_COMMAND}`, or pass --prompts official:PATH (or interleave)",
                    )
                self._official = OfficialPack(read_official_templates(clone))
            if self._official.identity != recorded:
                raise ConfigurationError(
                    f"thread {trajectory.thread_id} was run with the official prompts {recorded}, but "
                    f"the clone at {self._official.source} holds {self._official.identity}",
                    hint="pass --prompts official:PATH with the clone the thread used, or choose the "
                    "pack to train on with --prompts",
                )
            return self._official
        raise ConfigurationError(
            f"thread {trajectory.thread_id} records an unknown prompt pack {recorded!r}",
            hint="choose the pack with --prompts interleave, official or official:PATH",
        )


# ---------------------------------------------------------------------------------------------
# Replies in the format each pack asks for


def _literal(data: dict, pack: PromptPack) -> str:
    """The answer dict as the pack's models print it: a Python literal (single quotes, True,
    None) for the official checkpoints, JSON for our prompts."""
    if isinstance(pack, OfficialPack):
        return repr(data)
    return json.dumps(data, ensure_ascii=False)


def _reply(reasoning: str, data: dict, pack: PromptPack) -> str:
    return f"<think>{reasoning}</think>\n<answer>{_literal(data, pack)}</answer>"


def _default_sources(step: Step, image_steps: list[int], input_images: int) -> tuple[str, ...]:
    """The sources the plan parser gives a step that names none (see ``prompts.parsing``)."""
    if step.prompt is None:
        return ()
    if image_steps:
        return (f"step:{image_steps[-1]}",)
    if input_images > 0:
        return (f"input:{input_images}",)
    return ()


def plan_answer(plan: Plan, *, input_images: int) -> dict:
    """The plan as the planner writes it: ``{'execution_plan': [...]}``; ``sources`` only where
    they differ from the usual chain (so a re-read gives the same plan)."""
    steps = []
    image_steps: list[int] = []
    for step in plan.steps:
        item: dict = {
            "step_number": step.number,
            "step_name": step.name,
            "instruction": step.instruction or None,
            "prompt": step.prompt,
            "auxiliary_text": step.text,
        }
        if step.sources != _default_sources(step, image_steps, input_images):
            item["sources"] = list(step.sources)
        steps.append(item)
        if step.prompt is not None:
            image_steps.append(step.number)
    return {"execution_plan": steps}


def planner_reply(plan: Plan, pack: PromptPack, *, input_images: int, reasoning: str = "") -> str:
    """The planner's reply for ``plan``. The graph keeps the plan, not the planner's reasoning,
    so the think block holds ``reasoning`` (empty by default)."""
    return _reply(reasoning, plan_answer(plan, input_images=input_images), pack)


def critic_reply(critique: Critique, *, used_prompt: str, pack: PromptPack) -> str:
    """The critic's reply for ``critique``. The official checkpoints always write a string
    ``refine_prompt`` and echo the prompt they were shown when they accept; ours write null."""
    if isinstance(pack, OfficialPack):
        refine: str | None = used_prompt if critique.success else (critique.refine_prompt or used_prompt)
    else:
        refine = None if critique.success else (critique.refine_prompt or used_prompt)
    data: dict = {"previous_step_success": critique.success, "refine_prompt": refine}
    if critique.score is not None and not isinstance(pack, OfficialPack):
        data["score"] = critique.score
    return _reply(critique.reasoning, data, pack)


# ---------------------------------------------------------------------------------------------
# Samples


def white_canvas(width: int, height: int) -> tuple[ImageRef, CheckedImage]:
    """The white canvas the critic sees before the first step, byte for byte the one the graph
    stores (``storage.image_store.blank_canvas``), made here without writing to the store."""
    checked = blank_png(width, height)
    return image_ref(checked), checked


def planner_sample(trajectory: Trajectory, pack: PromptPack) -> PlannerSample:
    request = trajectory.request
    messages = pack.planner_messages(
        request.text, [image_block(ref) for ref in request.images],
        max_steps=trajectory.settings.options.max_steps,
    )
    reply = planner_reply(trajectory.plan, pack, input_images=len(request.images))
    return PlannerSample(trajectory.thread_id, messages, reply)


def _previous_image(trajectory: Trajectory, step: Step) -> ImageRef | None:
    """The image the step edits (its first source), as the critic node resolves it."""
    if not step.sources:
        return None
    kind, _, number = step.sources[0].partition(":")
    if kind == "input":
        return trajectory.request.images[int(number) - 1]
    for item in trajectory.document.steps:
        if item.number == int(number):
            return item.image
    return None


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def critic_samples(
    trajectory: Trajectory, pack: PromptPack, statuses: frozenset[str], skipped: dict[str, int]
) -> Iterator[CriticSample]:
    """One sample per judged attempt of the steps whose status is in ``statuses``; attempts
    kept without a verdict, or whose reasoning was cut, are counted in ``skipped``."""
    for item in trajectory.document.steps:
        if item.status not in statuses:
            continue
        step = trajectory.step(item.number)
        for attempt in item.attempts:
            critique = attempt.critique
            if critique is None:
                _count(skipped, "attempts kept without a verdict")
                continue
            if critique.reasoning.endswith(_CUT_MARKER) and len(critique.reasoning) > MAX_REASONING_CHARS:
                _count(skipped, "verdicts whose reasoning was cut")
                continue
            previous = _previous_image(trajectory, step)
            canvas = None
            if previous is None:
                previous, canvas = white_canvas(attempt.image.width, attempt.image.height)
            messages = pack.attempt_messages(step, attempt, previous)
            yield CriticSample(
                thread_id=trajectory.thread_id, step=step, status=item.status, attempt=attempt,
                critique=critique, previous=previous, canvas=canvas, messages=messages,
                reply=critic_reply(critique, used_prompt=attempt.prompt, pack=pack),
            )
