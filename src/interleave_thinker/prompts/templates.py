"""System prompts and chat-message builders for the planner and the critic."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from interleave_thinker.state import Request

# ``{max_steps}`` is filled in by planner_messages; str.format is avoided because the
# prompts show dicts whose braces it would misread.
_MAX_STEPS_SLOT = "{max_steps}"
# Left out when no step limit is set: the cap is opt-in.
_MAX_STEPS_LINE = "- Write at most {max_steps} steps.\n"

_PLAN_FORMAT = """\
How to reply:
First think it through inside <think> and </think>. Then give the plan inside <answer> and \
</answer> as one dict with a single key, "execution_plan", whose value is the list of steps:

<think>your reasoning</think>
<answer>{"execution_plan": [
  {"step_number": 1, "step_name": "short title", "instruction": "what this step shows",
   "prompt": "what the image generator should do, or null", "auxiliary_text": "text for the \
reader, or null"}
]}</answer>

Field notes:
- step_number: a whole number; numbers go up by one from step to step.
- sources (optional, rarely needed): a list naming the images a step works from, either \
earlier step numbers of this plan or "input:N" for the user's Nth image. The first entry is \
the image that gets edited, any others are references. Use [] to draw the step from nothing. \
Leave the key out to get the usual chain, where each step edits the latest image.
- Write at most {max_steps} steps.
- Write nothing after </answer>."""

PLANNER_NARRATIVE_PROMPT = (
    """\
You plan illustrated sequences: stories, tutorials, processes, comics. The user describes \
what they want in words only. Break it into an ordered list of steps, each of which \
produces one picture, and write the complete plan in one go.

For each step:
- instruction: one or two sentences on what the picture of this step must show.
- prompt: the command sent to the image generator. In step 1 it is a complete, \
self-contained description of the first picture: subjects, setting, composition, \
lighting and visual style, because nothing exists yet. From step 2 on, the generator \
receives the picture of the step before, so the prompt is an edit of that picture: say \
what to change ("turn the sky to dusk", "the girl now holds the kite") and what to leave \
alone.
- auxiliary_text: words the reader should see next to the picture (a caption, a line of \
the story, a how-to tip). Fill it only when the user asks for text to go with the \
pictures; otherwise set it to null.

Keep the sequence coherent: the same characters must keep their faces, clothes and \
proportions, and the art style, palette and setting should only change when the story \
calls for it. Pick a number of steps that suits the request rather than padding it.

"""
    + _PLAN_FORMAT
)

PLANNER_GUIDANCE_PROMPT = (
    """\
You continue illustrated sequences. The user shows you one or more pictures, numbered in \
the order given, and says in words what should happen next or what they want to know. \
Treat their pictures as the first steps of the sequence and write the plan for the steps \
that follow, all at once.

For each step:
- step_number: carry on from the user's numbering. If they gave three pictures, your \
first step is number 4.
- instruction: one or two sentences on what this step must show or answer.
- prompt: the edit command for the image generator. It is applied to the latest picture \
in the sequence (the user's last one for your first image step, then your own previous \
image), so describe the change and what must stay as it is.
- auxiliary_text: words for the reader. When a step only needs a written answer (naming \
an object, explaining what happens, counting something) and no new picture, set prompt \
to null and put the answer here. Otherwise fill it only if the user asked for text.

Keep everything consistent with the user's pictures: the same people, objects, viewpoint \
and style, unless the request asks for a change.

"""
    + _PLAN_FORMAT
)

CRITIC_PROMPT = """\
You review one step of an image sequence. You receive two pictures: the previous picture \
(a plain white canvas if this is the first step) and a candidate produced for the current \
step. You also receive the step's name and instruction, the prompt the plan intended for \
this step, and the prompt the generator was actually given on this try.

Decide whether the candidate can be accepted. Two things must both hold:
(a) the step is done: going from the previous picture to the candidate, the change asked \
for is visibly there and matches the instruction;
(b) nothing broke: no malformed bodies or hands, no melted or duplicated objects, no \
damage to parts of the picture that should have stayed the same, and people or things \
carried over from the previous picture are still recognisably the same.

If either fails, write a better generator prompt in refine_prompt: one that states the \
missing change plainly and says what must be kept, written so the generator can act on \
it from the previous picture. If the candidate passes, refine_prompt is null.

How to reply:
First reason inside <think> and </think>, comparing the two pictures. Then answer inside \
<answer> and </answer> with one dict:

<think>your comparison</think>
<answer>{"previous_step_success": true or false, "refine_prompt": "improved prompt, or \
null", "score": 0 to 10}</answer>

score is optional: your rating of the candidate from 0 (unusable) to 10 (perfect). \
Write nothing after </answer>."""

_REQUEST_MARKER = re.compile(r"<request>\n(.*)\n</request>", re.DOTALL)
_PROMPT_MARKERS = re.compile(
    r"<planned_prompt>(.*)</planned_prompt>\s*<used_prompt>(.*)</used_prompt>", re.DOTALL
)
_REASK_LIMIT = 500


def planner_prompt(mode: Literal["narrative", "guidance"], *, max_steps: int | None) -> str:
    """The planner system prompt for a mode, with the step limit filled in (or left out)."""
    template = PLANNER_GUIDANCE_PROMPT if mode == "guidance" else PLANNER_NARRATIVE_PROMPT
    if max_steps is None:
        return template.replace(_MAX_STEPS_LINE, "")
    return template.replace(_MAX_STEPS_SLOT, str(max_steps))


def planner_messages(
    request: Request | str, image_blocks: Sequence[dict], *, max_steps: int | None
) -> list[BaseMessage]:
    """System prompt for the mode (guidance when there are images), then the user's images and
    the marked request."""
    text = request.text if isinstance(request, Request) else request
    mode: Literal["narrative", "guidance"] = "guidance" if image_blocks else "narrative"
    content: list[str | dict] = [dict(block) for block in image_blocks]
    content.append({"type": "text", "text": f"<request>\n{text}\n</request>"})
    return [
        SystemMessage(content=planner_prompt(mode, max_steps=max_steps)),
        HumanMessage(content=content),
    ]


def critic_messages(
    *,
    step_name: str,
    instruction: str,
    planned_prompt: str,
    used_prompt: str,
    previous_image: dict,
    candidate_image: dict,
) -> list[BaseMessage]:
    """System prompt, the two images (previous first), then the step and both prompts."""
    details = (
        f"step: {step_name}\n"
        f"instruction: {instruction}\n"
        f"<planned_prompt>{planned_prompt}</planned_prompt>\n"
        f"<used_prompt>{used_prompt}</used_prompt>"
    )
    content: list[str | dict] = [
        {"type": "text", "text": "previous image:"},
        dict(previous_image),
        {"type": "text", "text": "candidate image:"},
        dict(candidate_image),
        {"type": "text", "text": details},
    ]
    return [SystemMessage(content=CRITIC_PROMPT), HumanMessage(content=content)]


def reask_message(error: str, *, what: Literal["plan", "verdict"]) -> HumanMessage:
    """Ask again after a reply that could not be parsed, quoting (a bounded part of) the error."""
    quoted = error if len(error) <= _REASK_LIMIT else error[: _REASK_LIMIT - 3] + "..."
    keys = '"execution_plan"' if what == "plan" else '"previous_step_success" and "refine_prompt"'
    return HumanMessage(
        content=(
            f"Your last reply could not be read as a {what}. The problem: {quoted}\n"
            f"Send the {what} again using only the required format: your reasoning inside "
            f"<think></think>, then <answer></answer> holding one dict with {keys}. "
            "Nothing else."
        )
    )


def request_from_messages(messages: Sequence[BaseMessage]) -> str | None:
    """The request text marked in the latest user message that carries one."""
    for text in _human_texts(messages):
        match = _REQUEST_MARKER.search(text)
        if match:
            return match.group(1)
    return None


def prompts_from_messages(messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
    """The (planned, used) prompts marked in the latest user message that carries them."""
    for text in _human_texts(messages):
        match = _PROMPT_MARKERS.search(text)
        if match:
            return match.group(1), match.group(2)
    return None


def _human_texts(messages: Sequence[BaseMessage]) -> list[str]:
    """Text of each user message, newest first.

    Newest first but not only the newest: after a re-ask the last user message is the
    complaint, and the marked request sits in the one before it.
    """
    texts: list[str] = []
    for message in reversed(messages):
        if not isinstance(message, HumanMessage):
            continue
        content = message.content
        if isinstance(content, str):
            texts.append(content)
            continue
        parts = [
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text")
        ]
        texts.append("\n".join(parts))
    return texts
