"""Tolerant parsing of planner and critic replies (think/answer tags around a dict) into records."""

from __future__ import annotations

import ast
import bisect
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from interleave_thinker.state import Critique, Plan, Step

MAX_INPUT_CHARS = 1_000_000
# One text field of a step (or a verdict's refined prompt). Real prompts are a few hundred
# characters; a longer field is a runaway reply, and every checkpoint of the thread would carry it.
MAX_FIELD_CHARS = 20_000
# A verdict's reasoning is shown, never parsed; past this it is cut (and says so).
MAX_REASONING_CHARS = 20_000
# Values quoted in error messages are cut to this many characters.
_SHOWN_CHARS = 60
# Step numbers only ever count steps; a huge one is a model glitch, not a real sequence.
MAX_STEP_NUMBER = 1_000_000
_MAX_TRIES = 8

_NULLISH = {"", "none", "null", "n/a"}
_JSON_NAMES = {"true": "True", "false": "False", "null": "None"}
_TRUE_WORDS = {"true", "yes"}
_FALSE_WORDS = {"false", "no"}

_THINK_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_FENCE_LINE = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$", re.MULTILINE)
_DIGITS = re.compile(r"[0-9]+")
_SOURCE = re.compile(r"(step|input)\s*:\s*([0-9]+)", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANK_OR_FENCE = re.compile(r"[\s`]*")
_NON_BLANK = re.compile(r"\S")


class OutputParseError(ValueError):
    """A planner or critic reply could not be read; the message says what was wrong."""


def _shown(value: object) -> str:
    """``repr(value)`` cut to a few dozen characters, for error messages (repr also escapes
    control characters and lone surrogates, so the message prints anywhere)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _well_formed(text: str) -> str:
    """``text`` with lone UTF-16 surrogates replaced by U+FFFD (and split pairs joined).

    Models print them through JSON escapes (``"\\ud800"``); left in, they fail later where the
    text is encoded as UTF-8 (checkpoints, HTML, the terminal).
    """
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# ---------------------------------------------------------------------------------------------
# Think / answer split


def _check_size(text: object) -> str:
    if not isinstance(text, str):
        raise OutputParseError(f"expected the reply as text, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise OutputParseError(
            f"the reply is {len(text):,} characters long; at most {MAX_INPUT_CHARS:,} are read"
        )
    return _well_formed(text)


def split_think_answer(text: str) -> tuple[str, str]:
    """Split a reply into (reasoning, answer text), tolerating missing or stray tags."""
    text = _check_size(text)
    think_close = _THINK_CLOSE.search(text)
    think_end = think_close.end() if think_close else 0

    # Prefer answer tags after the reasoning: the reasoning may quote the tags while drafting.
    answer = _last_answer_block(text, think_end)
    if answer is None and think_end:
        answer = _last_answer_block(text, 0)

    think_open = _THINK_OPEN.search(text)
    if answer is not None:
        answer_start, answer_text = answer
    elif think_close is None and think_open is not None:
        answer_start, answer_text = _answer_in_open_think(text, think_open.end())
    else:
        # No answer tags: the dict is the last brace block after the reasoning.
        answer_start, answer_text = _last_brace_block(text, think_end)
        if think_close is not None and not answer_text.strip():
            raise OutputParseError(
                "the reply stops after its reasoning: nothing follows </think>; "
                "the answer dict must come after it, in <answer></answer>"
            )

    if think_close is not None and think_close.start() <= answer_start:
        think_open = _THINK_OPEN.search(text, 0, think_close.start())
        # Qwen3 often omits the opening tag: then everything before the closing tag is reasoning.
        reasoning = (
            text[think_open.end() : think_close.start()]
            if think_open
            else text[: think_close.start()]
        )
    else:
        think_open = _THINK_OPEN.search(text, 0, answer_start)
        reasoning = text[think_open.end() : answer_start] if think_open else text[:answer_start]
        reasoning = _THINK_CLOSE.sub("", reasoning)
    return reasoning.strip(), answer_text.strip()


def _last_answer_block(text: str, start: int) -> tuple[int, str] | None:
    """The last non-blank ``<answer>`` block at or after ``start``: (tag start, content).

    Linear in the text: a reply that repeats ``<answer>`` a hundred thousand times (a model
    stuck in a loop) must not make the search quadratic.
    """
    opens = list(_ANSWER_OPEN.finditer(text, start))
    if not opens:
        return None
    closes = [match.start() for match in _ANSWER_CLOSE.finditer(text, opens[0].end())]
    for match in reversed(opens):
        index = bisect.bisect_left(closes, match.end())
        # A missing closing tag means the reply was cut off: take everything to the end.
        end = closes[index] if index < len(closes) else len(text)
        # Each search stops at the next tag, so all of them together read the text once.
        if _NON_BLANK.search(text, match.end(), end):
            return match.start(), text[match.end() : end]
    return None


def _answer_in_open_think(text: str, start: int) -> tuple[int, str]:
    """The answer of a reply whose <think> block never closes and that has no answer tags.

    A dict that ends the reply is taken as the answer (the model forgot its tags); a dict with
    more reasoning after it is a draft of a reply cut off while thinking, and is refused.
    """
    blocks, unclosed = _brace_blocks(text, start)
    if unclosed is not None:
        # A dict cut off at the end: parse_answer_dict reports the truncation.
        return unclosed, text[unclosed:]
    if blocks and _BLANK_OR_FENCE.fullmatch(text, blocks[-1][1]):
        begin, end = blocks[-1]
        return begin, text[begin:end]
    raise OutputParseError(
        "the reply ends inside its <think> block (no </think> and no <answer>): it was "
        "probably cut off while reasoning, before the answer"
    )


def _last_brace_block(text: str, start: int) -> tuple[int, str]:
    """The last top-level ``{...}`` block from ``start`` (unclosed ones run to the end)."""
    blocks, unclosed = _brace_blocks(text, start)
    if unclosed is not None:
        return unclosed, text[unclosed:]
    if blocks:
        begin, end = blocks[-1]
        return begin, text[begin:end]
    return start, text[start:]


# ---------------------------------------------------------------------------------------------
# Brace matching


def _brace_blocks(text: str, start: int = 0) -> tuple[list[tuple[int, int]], int | None]:
    """Top-level balanced ``{...}`` spans from ``start``, and the start of an unclosed one.

    Quotes are tracked only inside a block, so apostrophes in surrounding prose do no harm.
    Once a block is left unclosed the rest of the text is inside it, so the scan stops there;
    this keeps the whole search linear in the text length.
    """
    blocks: list[tuple[int, int]] = []
    position = text.find("{", start)
    while position != -1:
        end = _match_brace(text, position)
        if end is None:
            return blocks, position
        blocks.append((position, end))
        position = text.find("{", end)
    return blocks, None


def _match_brace(text: str, begin: int) -> int | None:
    """The index just past the brace closing the one at ``begin``, or None if it never closes."""
    depth = 0
    quote = ""
    index = begin
    length = len(text)
    while index < length:
        char = text[index]
        if quote:
            if char == "\\":
                index += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


# ---------------------------------------------------------------------------------------------
# Dict parsing


def parse_answer_dict(text: str) -> dict:
    """Find and parse the dict in an answer: JSON first, then a Python literal (never eval)."""
    text = _check_size(text)
    # Code fences sit outside the dict; dropping whole fence lines cannot touch its contents.
    text = _FENCE_LINE.sub("", text)
    blocks, unclosed = _brace_blocks(text)
    if not blocks:
        if unclosed is not None:
            raise OutputParseError(
                "the answer's braces are unbalanced ('{' is never closed); "
                "the reply was probably truncated"
            )
        raise OutputParseError("no dict found in the answer: expected a '{...}' block")

    # The largest top-level block is almost always the answer; smaller ones are prose asides.
    # Only a few are tried, so text full of tiny brace pairs cannot make parsing slow.
    ordered = sorted(blocks, key=lambda span: span[1] - span[0], reverse=True)[:_MAX_TRIES]
    first_error: OutputParseError | None = None
    for begin, end in ordered:
        try:
            value = _parse_literal(text[begin:end])
        except OutputParseError as error:
            first_error = first_error or error
            continue
        if isinstance(value, dict):
            return value
        first_error = first_error or OutputParseError(
            f"the answer is a {type(value).__name__}, not a dict"
        )
    if unclosed is not None:
        raise OutputParseError(
            "the answer's braces are unbalanced ('{' is never closed); "
            "the reply was probably truncated"
        )
    assert first_error is not None
    raise first_error


def _parse_literal(source: str) -> Any:
    try:
        # strict=False lets raw newlines inside strings through, which models often print.
        return json.loads(source, strict=False)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(_as_python_literal(source))
    except SyntaxError as error:
        where = f"line {error.lineno}, column {error.offset}" if error.lineno else "unknown place"
        raise OutputParseError(
            f"the answer dict has a syntax error at {where}: {error.msg}"
        ) from None
    except (ValueError, TypeError) as error:
        raise OutputParseError(
            f"the answer is not a plain literal dict ({error}); write only strings, "
            "numbers, booleans, null, lists and dicts"
        ) from None
    except (RecursionError, MemoryError):
        raise OutputParseError("the answer dict is nested too deeply to read") from None


# What ends a run of ordinary characters inside a string, and what matters outside strings.
_STRING_STOPS = {"'": re.compile(r"[\\'\n\r]"), '"': re.compile(r'[\\"\n\r]')}
_OUTSIDE_STRINGS = re.compile(r"[\"']|[A-Za-z_][A-Za-z0-9_]*")
_ESCAPED_BREAKS = {"\n": "\\n", "\r": "\\r"}


def _as_python_literal(source: str) -> str:
    """``source`` as a Python literal: line breaks inside strings escaped (Python strings may
    not hold them) and JSON's true/false/null outside strings turned into Python's names.

    One pass that jumps from one quote, escape or word to the next: linear in time, and with
    no per-character state (a tokenizer's regular expressions used hundreds of MB on one long
    string).
    """
    out: list[str] = []
    index, end = 0, len(source)
    while index < end:
        found = _OUTSIDE_STRINGS.search(source, index)
        if found is None:
            out.append(source[index:])
            break
        out.append(source[index : found.start()])
        token = found.group()
        index = found.end()
        if token not in _STRING_STOPS:
            out.append(_JSON_NAMES.get(token, token))
            continue
        out.append(token)
        stops = _STRING_STOPS[token]
        while index < end:
            stop = stops.search(source, index)
            if stop is None:
                # An unclosed string: ast reports it.
                out.append(source[index:])
                index = end
                break
            out.append(source[index : stop.start()])
            char = stop.group()
            if char == "\\":
                out.append(source[stop.start() : stop.start() + 2])
                index = stop.start() + 2
            else:
                out.append(_ESCAPED_BREAKS.get(char, char))
                index = stop.end()
                if char == token:
                    break
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Plans


def parse_plan(text: str, *, input_images: int, max_steps: int) -> Plan:
    """Read a planner reply into a Plan, checking numbering, step count and image sources."""
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
    if len(items) > max_steps:
        raise OutputParseError(
            f"the plan has {len(items):,} steps; at most {max_steps} are allowed "
            "(the max_steps setting): merge or drop steps"
        )

    steps: list[Step] = []
    # Step numbers whose step draws an image, in order: the targets sources may name.
    image_steps: list[int] = []
    for position, item in enumerate(items, start=1):
        label = f"step {position} of the plan"
        if not isinstance(item, Mapping):
            raise OutputParseError(f"{label} is a {type(item).__name__}, not a dict")
        number = _step_number(item, label)
        label = f"step {number}"
        if steps and number <= steps[-1].number:
            raise OutputParseError(
                f"step numbers must be unique and increasing: step {number} "
                f"follows step {steps[-1].number}"
            )
        name = _text_field(item, "step_name", label) or ""
        instruction = _text_field(item, "instruction", label) or ""
        prompt = _nullish(_text_field(item, "prompt", label))
        auxiliary = _nullish(_text_field(item, "auxiliary_text", label))
        if not instruction and prompt is None:
            raise OutputParseError(f"{label} has neither an instruction nor a prompt")

        if prompt is None:
            # A text-only step draws nothing, so it edits nothing.
            sources: tuple[str, ...] = ()
        elif item.get("sources") is not None:
            sources = _explicit_sources(item["sources"], label, image_steps, input_images)
        elif image_steps:
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
    return Plan(steps=tuple(steps))


_MISSING = object()


def _key_list(data: Mapping) -> str:
    keys = [_shown(key) for key in list(data)[:10]]
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
        raise OutputParseError(f"{label} has step_number {_shown(value)}; expected a whole number")
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
    return _well_formed(value.strip())


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
                f"{label} names source {_shown(raw)}, but no earlier step {number} draws an image "
                "(sources must be earlier image steps, or 'input:N' for the user's images)"
            )
        if kind == "input" and not 1 <= number <= input_images:
            available = f"1..{input_images}" if input_images else "none were given"
            raise OutputParseError(
                f"{label} names source {_shown(raw)}, but there is no input image {number} "
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
            f"{label} has source {_shown(raw)}; expected an earlier step number or 'input:N'"
        )
    if not 1 <= number <= MAX_STEP_NUMBER:
        raise OutputParseError(f"{label} has source {_shown(raw)}, which is out of range")
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
    refine = _nullish(_well_formed(refine.strip()) if refine is not None else None)
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
    raise OutputParseError(f"'previous_step_success' is {_shown(value)}; expected true or false")


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
