"""Planner and critic replies read into a Plan or a Critique, with clear errors for what is wrong."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping

from interleave_thinker.prompts.answers import (
    OutputParseError,
    parse_answer_dict,
    shown,
    split_think_answer,
    well_formed,
)
from interleave_thinker.state import Critique, Plan, Step

__all__ = ["OutputParseError", "parse_answer_dict", "parse_plan", "parse_verdict", "read_plan",
           "split_think_answer"]

# One text field of a step (or a verdict's refined prompt). Real prompts are a few hundred
# characters; a longer field is a runaway reply, and every checkpoint of the thread would carry it.
MAX_FIELD_CHARS = 20_000
# A verdict's reasoning is shown, never parsed; past this it is cut (and says so).
MAX_REASONING_CHARS = 20_000
# Step numbers only ever count steps; a huge one is a model glitch, not a real sequence.
MAX_STEP_NUMBER = 1_000_000

_NULLISH = {"", "none", "null", "n/a"}
_TRUE_WORDS = {"true", "yes"}
_FALSE_WORDS = {"false", "no"}
_DIGITS = re.compile(r"[0-9]+")
_SWALLOWED_STEP = re.compile(r"\}\s*,\s*\{\s*['\"]step_number['\"]\s*:")
_SOURCE = re.compile(r"(step|input)\s*:\s*([0-9]+)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Plans


def parse_plan(text: str, *, input_images: int, max_steps: int | None = None) -> Plan:
    """Read a planner reply into a Plan (see :func:`read_plan`)."""
    return read_plan(text, input_images=input_images, max_steps=max_steps)[0]


def read_plan(
    text: str, *, input_images: int, max_steps: int | None = None
) -> tuple[Plan, tuple[str, ...]]:
    """Read a planner reply into a Plan, checking step count and image sources.

    Also returns notes on what was corrected: step numbers that repeat or start over are
    renumbered in reading order, as the official code (which counts steps by position) reads
    them. ``max_steps`` None sets no limit on the number of steps.
    """
    _, answer = split_think_answer(text)
    data = parse_answer_dict(answer)
    items = data.get("execution_plan", _MISSING)
    if items is _MISSING:
        raise OutputParseError(
            f"the answer has no 'execution_plan' key (found keys: {_key_list(data)})"
        )
    if not isinstance(items, list | tuple):
        raise OutputParseError(
            f"'execution_plan' must be a list of step dicts, not a {type(items).__name__}"
        )
    if not items:
        raise OutputParseError("the plan is empty: 'execution_plan' has no steps")
    if max_steps is not None and len(items) > max_steps:
        raise OutputParseError(
            f"the plan has {len(items):,} steps; at most {max_steps} are allowed "
            "(the max_steps setting): merge or drop steps"
        )
    for position, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            raise OutputParseError(f"step {position} of the plan is a {type(item).__name__}, not a dict")
    given = [_step_number(item, f"step {position} of the plan") for position, item in enumerate(items, 1)]
    notes: list[str] = []
    numbers = given
    renumbered = any(later <= earlier for earlier, later in itertools.pairwise(given))
    if renumbered:
        numbers = list(range(given[0], given[0] + len(given)))
        if numbers[-1] > MAX_STEP_NUMBER:
            numbers = list(range(1, len(given) + 1))
        notes.append(
            f"the planner numbered its steps {_number_list(given)}; they were renumbered "
            f"{numbers[0]}..{numbers[-1]} in reading order"
        )

    steps: list[Step] = []
    # Step numbers whose step draws an image, in order: the targets sources may name.
    image_steps: list[int] = []
    for item, number in zip(items, numbers, strict=True):
        label = f"step {number}"
        name = _text_field(item, "step_name", label) or ""
        instruction = _text_field(item, "instruction", label) or ""
        prompt = _nullish(_text_field(item, "prompt", label))
        auxiliary = _nullish(_text_field(item, "auxiliary_text", label))
        if not instruction and prompt is None and auxiliary is None:
            raise OutputParseError(
                f"{label} has neither an instruction, a prompt nor an auxiliary_text"
            )

        explicit = item.get("sources")
        if prompt is None:
            # A text-only step (an answer, a caption) draws nothing, so it edits nothing.
            sources: tuple[str, ...] = ()
        elif explicit is not None and not (renumbered and _names_steps(explicit)):
            sources = _explicit_sources(explicit, label, image_steps, input_images)
        else:
            if explicit is not None:
                notes.append(f"{label}: its sources named steps by their old numbers; it edits "
                             "the latest image instead")
            if image_steps:
                sources = (f"step:{image_steps[-1]}",)
            elif input_images > 0:
                sources = (f"input:{input_images}",)
            else:
                sources = ()

        steps.append(
            Step(
                number=number,
                name=name,
                instruction=instruction,
                prompt=prompt,
                text=auxiliary,
                sources=sources,
            )
        )
        if prompt is not None:
            image_steps.append(number)
    return Plan(steps=tuple(steps)), tuple(notes)


def _number_list(numbers: list[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:12])
    return shown + (", ..." if len(numbers) > 12 else "")


def _names_steps(value: object) -> bool:
    items = value if isinstance(value, list | tuple) else [value]
    return any(not (isinstance(raw, str) and raw.strip().lower().startswith("input")) for raw in items)


_MISSING = object()


def _key_list(data: Mapping) -> str:
    keys = [shown(key) for key in list(data)[:10]]
    more = f" and {len(data) - 10:,} more" if len(data) > 10 else ""
    return ", ".join(keys) + more if keys else "none"


def _step_number(item: Mapping, label: str) -> int:
    value = item.get("step_number", _MISSING)
    if value is _MISSING:
        raise OutputParseError(f"{label} has no 'step_number'")
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        digits = value.strip().lstrip("0") or "0"
        # Compare lengths first: int() refuses very long digit strings with a ValueError.
        number = int(digits) if len(digits) <= 9 else MAX_STEP_NUMBER + 1
    if number is None:
        raise OutputParseError(f"{label} has step_number {shown(value)}; expected a whole number")
    if not 1 <= number <= MAX_STEP_NUMBER:
        raise OutputParseError(
            f"{label} has step_number {number}; expected a number from 1 to {MAX_STEP_NUMBER}"
        )
    return number


def _text_field(item: Mapping, key: str, label: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise OutputParseError(f"{label}: '{key}' must be text, not a boolean")
    if isinstance(value, int | float):
        # A bare number is still usable text (e.g. a step named 3).
        return str(value)
    if not isinstance(value, str):
        raise OutputParseError(f"{label}: '{key}' must be text, not a {type(value).__name__}")
    if len(value) > MAX_FIELD_CHARS:
        raise OutputParseError(
            f"{label}: '{key}' is {len(value):,} characters long; at most {MAX_FIELD_CHARS:,} "
            "are allowed"
        )
    if _SWALLOWED_STEP.search(value):
        # A quote the model left open made this string run on over the next steps (the
        # official code refuses the same glitch).
        raise OutputParseError(
            f"{label}: '{key}' runs on into the next step's fields (an unescaped quote)"
        )
    return well_formed(value.strip())


def _nullish(value: str | None) -> str | None:
    if value is None or value.strip().lower() in _NULLISH:
        return None
    return value


def _explicit_sources(
    value: object, label: str, image_steps: list[int], input_images: int
) -> tuple[str, ...]:
    # A lone reference instead of a one-item list is a harmless slip; accept it.
    items = value if isinstance(value, list | tuple) else [value]
    sources: list[str] = []
    for raw in items:
        source = _source_name(raw, label)
        kind, _, digits = source.partition(":")
        number = int(digits)
        if kind == "step" and number not in image_steps:
            raise OutputParseError(
                f"{label} names source {shown(raw)}, but no earlier step {number} draws an image "
                "(sources must be earlier image steps, or 'input:N' for the user's images)"
            )
        if kind == "input" and not 1 <= number <= input_images:
            available = f"1..{input_images}" if input_images else "none were given"
            raise OutputParseError(
                f"{label} names source {shown(raw)}, but there is no input image {number} "
                f"(input images: {available})"
            )
        if source not in sources:
            sources.append(source)
    return tuple(sources)


def _source_name(raw: object, label: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
        kind = "step"
    elif isinstance(raw, str) and _DIGITS.fullmatch(raw.strip()):
        number, kind = _bounded_int(raw.strip()), "step"
    elif isinstance(raw, str) and (match := _SOURCE.fullmatch(raw.strip())):
        number, kind = _bounded_int(match.group(2)), match.group(1).lower()
    else:
        raise OutputParseError(
            f"{label} has source {shown(raw)}; expected an earlier step number or 'input:N'"
        )
    if not 1 <= number <= MAX_STEP_NUMBER:
        raise OutputParseError(f"{label} has source {shown(raw)}, which is out of range")
    return f"{kind}:{number}"


def _bounded_int(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else MAX_STEP_NUMBER + 1


# ---------------------------------------------------------------------------------------------
# Verdicts


def parse_verdict(text: str) -> Critique:
    """Read a critic reply into a Critique."""
    reasoning, answer = split_think_answer(text)
    data = parse_answer_dict(answer)
    if "previous_step_success" not in data:
        raise OutputParseError(
            f"the answer has no 'previous_step_success' key (found keys: {_key_list(data)})"
        )
    success = _verdict_bool(data["previous_step_success"])

    refine = data.get("refine_prompt")
    if refine is not None and not isinstance(refine, str):
        raise OutputParseError(
            f"'refine_prompt' must be text or null, not a {type(refine).__name__}"
        )
    if refine is not None and len(refine) > MAX_FIELD_CHARS:
        raise OutputParseError(
            f"'refine_prompt' is {len(refine):,} characters long; at most {MAX_FIELD_CHARS:,} "
            "are allowed"
        )
    refine = _nullish(well_formed(refine.strip()) if refine is not None else None)
    if success:
        # Critics trained on the official prompt echo the prompt they were shown on success;
        # there is nothing to refine.
        refine = None
    if len(reasoning) > MAX_REASONING_CHARS:
        reasoning = reasoning[:MAX_REASONING_CHARS] + " [... reasoning cut ...]"

    return Critique(success=success, refine_prompt=refine, reasoning=reasoning, score=_score(data))


def _verdict_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise OutputParseError(f"'previous_step_success' is {shown(value)}; expected true or false")


def _score(data: Mapping) -> float | None:
    # The score is an optional extra: a bad one is dropped rather than failing the verdict.
    value = data.get("score")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        score = float(value)
    except OverflowError:
        return None
    if not math.isfinite(score) or not 0 <= score <= 10:
        return None
    return score
