"""Reading a model reply: its think/answer parts and the dict in the answer, tolerantly and in linear time."""

from __future__ import annotations

import ast
import bisect
import json
import re
from typing import Any

import json_repair

MAX_INPUT_CHARS = 1_000_000
# Values quoted in error messages are cut to this many characters.
_SHOWN_CHARS = 60
_MAX_TRIES = 8
# json-repair is a character-by-character parser written in Python: fine for a reply, slow for
# a megabyte of garbage, which fails anyway.
_MAX_REPAIR_CHARS = 100_000

_JSON_NAMES = {"true": "True", "false": "False", "null": "None"}

_THINK_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_FENCE_LINE = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$", re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANK_OR_FENCE = re.compile(r"[\s`]*")
_NON_BLANK = re.compile(r"\S")


class OutputParseError(ValueError):
    """A planner or critic reply could not be read; the message says what was wrong."""


def shown(value: object) -> str:
    """``repr(value)`` cut to a few dozen characters, for error messages (repr also escapes
    control characters and lone surrogates, so the message prints anywhere)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def well_formed(text: str) -> str:
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
    return well_formed(text)


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
            if char == quote and _closes_string(text, index + 1):
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


# What may follow the quote that closes a string in a dict literal; any other character means
# the quote is part of the text, as the apostrophe in 'the cat's head' that models print.
_AFTER_STRING = re.compile(r"[ \t\r\n]*(?:[,:}\])]|$)")


def _closes_string(text: str, after: int) -> bool:
    """Whether a quote whose next character is at ``after`` ends its string."""
    return _AFTER_STRING.match(text, after) is not None


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
    """A balanced ``{...}`` block as data: JSON, else a Python literal, else what json-repair
    makes of it (the official code's repair layer: missing commas, stray quotes, unquoted
    words). Never evaluated; the caller validates whatever comes back."""
    try:
        # strict=False lets raw newlines inside strings through, which models often print.
        return json.loads(source, strict=False)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(_as_python_literal(source))
    except SyntaxError as error:
        where = f"line {error.lineno}, column {error.offset}" if error.lineno else "unknown place"
        problem = OutputParseError(f"the answer dict has a syntax error at {where}: {error.msg}")
    except (ValueError, TypeError) as error:
        problem = OutputParseError(
            f"the answer is not a plain literal dict ({error}); write only strings, "
            "numbers, booleans, null, lists and dicts"
        )
    except (RecursionError, MemoryError):
        raise OutputParseError("the answer dict is nested too deeply to read") from None
    repaired = _repaired(source)
    if isinstance(repaired, dict) and repaired:
        return repaired
    raise problem


def _repaired(source: str) -> Any:
    """json-repair's reading of ``source``, or None when it has none (or fails)."""
    if len(source) > _MAX_REPAIR_CHARS:
        return None
    try:
        return json_repair.loads(source)
    except Exception:  # any failure of the repair layer means "no repair"
        return None


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
            elif char == token and not _closes_string(source, stop.end()):
                # An apostrophe inside the text ('the cat's head'): kept, escaped.
                out.append("\\" + char)
                index = stop.end()
            else:
                out.append(_ESCAPED_BREAKS.get(char, char))
                index = stop.end()
                if char == token:
                    break
    return "".join(out)
