"""Property-based tests of every parser of outside input: model replies, progress events, CLI and
settings values, prompt files, exported documents, checkpointer URLs, thread ids, source names
and review answers. Each may raise only its documented error, gives back what it was given when
that is valid, and stays fast on large input.

tests/test_parsing.py already holds three reply-parser properties (not repeated here):
test_arbitrary_text_only_raises_output_parse_error, test_round_trip (flat dicts in JSON or
Python style) and test_arbitrary_plans_only_raise_output_parse_error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from interleave_thinker.batch import read_prompt_file, thread_id_for
from interleave_thinker.checkpoints.postgres import parse_url
from interleave_thinker.cli.options import parse_size
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.events import (
    BudgetExhausted,
    DocumentReady,
    ImageReady,
    PlanReady,
    StepCommitted,
    StepStarted,
    ThreadStarted,
    Verdict,
    parse_event,
)
from interleave_thinker.nodes.review import check_review_answer
from interleave_thinker.prompts import answers
from interleave_thinker.prompts.parsing import (
    OutputParseError,
    parse_answer_dict,
    parse_plan,
    parse_verdict,
    split_think_answer,
)
from interleave_thinker.render.json_doc import document_json, load_document_json
from interleave_thinker.settings import ModelSettings, load_model_settings
from interleave_thinker.state import (
    Attempt,
    Critique,
    Document,
    DocumentStep,
    ImageRef,
    Plan,
    Request,
    RunOptions,
    RunSettings,
    Step,
    StepProgress,
    parse_source,
)
from interleave_thinker.workspace import THREAD_ID_PATTERN, validate_thread_id

# Modest budgets: the whole file runs in seconds.
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ================================================================================================
# Planner and critic replies (prompts/parsing.py)

_REPLY_PIECES = [
    *"{}[]()'\":,\n\\`",
    "<think>", "</think>", "<answer>", "</answer>", "< Answer >", "</ANSWER >", "```json\n",
    "true", "false", "null", "None", "nan", "'execution_plan'", '"step_number"', "'prompt'",
    "'instruction'", "'sources'", "'step:1'", "'input:1'", "'previous_step_success'",
    "'refine_prompt'", "'score'", "1", "-3", "1e999", "99999999999999999999", "\x00", "\u2028",
    *SURROGATES,
]
REPLIES = st.lists(st.sampled_from(_REPLY_PIECES) | st.text(max_size=4), max_size=80).map("".join)


@PROPERTY
@given(REPLIES)
def test_reply_errors_are_short_single_lines_that_any_terminal_can_print(text: str) -> None:
    results: list[Any] = []
    for parse in (split_think_answer, parse_answer_dict, parse_verdict,
                  lambda t: parse_plan(t, input_images=1, max_steps=4)):
        try:
            results.append(parse(text))
        except OutputParseError as error:
            message = str(error)
            # The message goes into a re-ask, an exception and the CLI's one-line report.
            assert len(message) <= 400, message
            assert "\n" not in message and encodable(message), ascii(message)
    for result in results:
        if isinstance(result, Plan):
            assert all(encodable(json.dumps(step.model_dump(), ensure_ascii=False))
                       for step in result.steps)
        elif isinstance(result, Critique):
            assert encodable(result.reasoning) and encodable(result.refine_prompt or "")


# Text inside the answer dict. '<' is left out: a tag inside a string would cut the answer
# short, which is reported as unreadable and re-asked (a limit of tag splitting, not a crash).
FIELD_TEXT = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)),
                     max_size=25)
NULLISH = {"", "none", "null", "n/a"}


def python_style(value: Any, *, json_literals: bool) -> str:
    """A dict written as a model might: Python strings, and JSON's or Python's literals, one
    item of a list per line (several lines reach the tokenizer-based literal rewriting)."""
    if value is None or isinstance(value, bool):
        if json_literals:
            return {None: "null", True: "true", False: "false"}[value]
        return repr(value)
    if isinstance(value, dict):
        items = (f"{k!r}: {python_style(v, json_literals=json_literals)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[\n" + ",\n".join(python_style(v, json_literals=json_literals) for v in value) + "\n]"
    return repr(value)


WRITERS: dict[str, Callable[[Any], str]] = {
    "json": json.dumps,
    "json-unicode": lambda value: json.dumps(value, ensure_ascii=False, indent=1),
    "python": lambda value: python_style(value, json_literals=False),
    "python-with-json-literals": lambda value: python_style(value, json_literals=True),
}
WRAPPERS: dict[str, Callable[[str, str], str]] = {
    "tags": lambda thinking, answer: f"<think>{thinking}</think>\n<answer>\n{answer}\n</answer>",
    "no-think-open-tag": lambda thinking, answer: f"{thinking}</think><answer>{answer}</answer>",
    "fenced-without-answer-tags": lambda thinking, answer: (
        f"<think>{thinking}</think>\nHere it is:\n```json\n{answer}\n```\nDone."
    ),
    "answer-cut-off": lambda thinking, answer: f"<think>{thinking}</think><answer>{answer}",
}
THINKING = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)),
                   max_size=40)


@st.composite
def valid_plans(draw: st.DrawFn) -> tuple[list[dict[str, Any]], Plan]:
    """A plan as the planner writes it, and the Plan it must read as."""
    count = draw(st.integers(1, 8))
    numbers = sorted(draw(st.sets(st.integers(1, 10**6), min_size=count, max_size=count)))
    written, expected, image_steps = [], [], []
    for number in numbers:
        name, instruction = draw(FIELD_TEXT), draw(FIELD_TEXT)
        prompt = draw(st.none() | FIELD_TEXT.filter(lambda t: t.strip().lower() not in NULLISH))
        if prompt is None and not instruction.strip():
            instruction = "say it"
        auxiliary = draw(st.none() | FIELD_TEXT)
        number_as = draw(st.sampled_from([number, str(number), f"00{number}", f" {number} "]))
        item: dict[str, Any] = {"step_number": number_as, "step_name": name,
                                "instruction": instruction, "prompt": prompt,
                                "auxiliary_text": auxiliary}
        sources: tuple[str, ...] = ()
        if prompt is not None:
            if image_steps and draw(st.booleans()):
                chosen = draw(st.lists(st.sampled_from(image_steps), unique=True, min_size=1,
                                       max_size=3))
                item["sources"] = [draw(st.sampled_from([n, f"step:{n}", f"Step : {n}"]))
                                   for n in chosen]
                sources = tuple(f"step:{n}" for n in chosen)
            elif image_steps:
                sources = (f"step:{image_steps[-1]}",)  # the paper's chain, when none are named
            image_steps.append(number)
        text = auxiliary.strip() if auxiliary is not None else None
        expected.append(Step(
            number=number, name=name.strip(), instruction=instruction.strip(),
            prompt=prompt.strip() if prompt is not None else None,
            text=None if text is None or text.lower() in NULLISH else text, sources=sources,
        ))
        written.append(item)
    return written, Plan(steps=tuple(expected))


@PROPERTY
@given(valid_plans(), st.sampled_from(list(WRITERS)), st.sampled_from(list(WRAPPERS)), THINKING)
def test_valid_plans_read_back_exactly(plan: tuple[list[dict[str, Any]], Plan], writer: str,
                                       wrapper: str, thinking: str) -> None:
    written, expected = plan
    answer = WRITERS[writer]({"execution_plan": written})
    text = WRAPPERS[wrapper](thinking, answer)
    assert parse_plan(text, input_images=0, max_steps=8) == expected


@FEW
@given(st.integers(1, 40), st.integers(1, 20))
def test_a_plan_longer_than_max_steps_is_refused_naming_the_limit(count: int, max_steps: int) -> None:
    steps = [{"step_number": n, "instruction": "go", "prompt": "p"} for n in range(1, count + 1)]
    text = f"<answer>{json.dumps({'execution_plan': steps})}</answer>"
    if count <= max_steps:
        assert len(parse_plan(text, input_images=0, max_steps=max_steps).steps) == count
    else:
        with pytest.raises(OutputParseError, match=f"has {count} steps; at most {max_steps} are"):
            parse_plan(text, input_images=0, max_steps=max_steps)


SUCCESS_WORDS = st.sampled_from([(True, True), (False, False), ("yes", True), (" No ", False),
                                 ("TRUE", True), ("false", False), (1, True), (0, False)])


@PROPERTY
@given(SUCCESS_WORDS, st.none() | FIELD_TEXT,
       st.none() | st.booleans() | st.integers(-20, 20) | st.floats(-1e300, 1e300) | st.text(max_size=3),
       st.sampled_from(list(WRITERS)), THINKING)
def test_valid_verdicts_read_back_exactly(success: tuple[Any, bool], refine: str | None, score: Any,
                                          writer: str, thinking: str) -> None:
    written, meant = success
    answer = WRITERS[writer]({"previous_step_success": written, "refine_prompt": refine,
                              "score": score})
    critique = parse_verdict(f"<think>{thinking}</think><answer>{answer}</answer>")
    kept = refine.strip() if refine is not None else None
    in_range = (isinstance(score, int | float) and not isinstance(score, bool)
                and math.isfinite(score) and 0 <= score <= 10)
    assert critique == Critique(
        success=meant,
        # On success there is nothing to refine: critics echo the prompt they were shown.
        refine_prompt=None if meant or kept is None or kept.lower() in NULLISH else kept,
        reasoning=thinking.strip(),
        # The optional score is kept only when it is a number from 0 to 10.
        score=float(score) if in_range else None,
    )


def _reference_last_answer_block(text: str, start: int) -> tuple[int, str] | None:
    """The straightforward (quadratic) search that _last_answer_block replaced."""
    best = None
    for match in answers._ANSWER_OPEN.finditer(text, start):
        close = answers._ANSWER_CLOSE.search(text, match.end())
        content = text[match.end() : close.start() if close else len(text)]
        if content.strip():
            best = (match.start(), content)
    return best


TAGGY = st.lists(st.sampled_from(["<answer>", "</answer>", "< ANSWER>", "</ answer >", "<think>",
                                  "</think>", " ", "\n", "x", "{'a': 1}", "<", ">", "/"]),
                 max_size=40).map("".join)


@PROPERTY
@given(TAGGY, st.integers(0, 60))
def test_the_linear_answer_search_agrees_with_the_plain_one(text: str, start: int) -> None:
    start = min(start, len(text))
    assert answers._last_answer_block(text, start) == _reference_last_answer_block(text, start)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | FIELD_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(FIELD_TEXT, children, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(st.dictionaries(FIELD_TEXT, JSON_VALUES, max_size=5),
       st.sampled_from(["python", "python-with-json-literals", "json-unicode"]))
def test_nested_dicts_in_any_writing_style_read_back_exactly(value: dict[str, Any], writer: str) -> None:
    # test_parsing.py's round trip covers flat dicts; this one nests and spans lines.
    assert parse_answer_dict(WRITERS[writer](value)) == value


@PROPERTY
@given(st.lists(st.sampled_from([*SURROGATES, "a", "\U0001f600"]), max_size=12).map("".join),
       st.sampled_from(["python", "json"]))
def test_surrogates_from_escapes_never_reach_a_plan(prompt: str, writer: str) -> None:
    body = {"execution_plan": [{"step_number": 1, "instruction": "x", "prompt": prompt + "!"}]}
    # Both writers escape the surrogates; the parser unescapes them into Python strings.
    answer = repr(body) if writer == "python" else json.dumps(body)
    (only,) = parse_plan(f"<answer>{answer}</answer>", input_images=0, max_steps=2).steps
    # A high surrogate followed by a low one is one character (as UTF-16 reads it); any
    # other surrogate becomes U+FFFD.
    meant = (prompt + "!").encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    assert only.prompt == meant and encodable(meant)


# About a megabyte each (just under the reading limit), shaped to push one code path hard.
_LARGE = 990_000
LARGE_REPLIES = {
    "answer tags repeated (a model stuck in a loop)": "<answer>" * (_LARGE // 8),
    "answer tags with text": "<answer>x" * (_LARGE // 9),
    "think tags repeated": "<think>{" * (_LARGE // 8),
    "brace pairs": "{}" * (_LARGE // 2),
    "open braces and quotes": "{'" * (_LARGE // 2),
    "JSON literals in a Python dict": "{'a': [" + "true," * (_LARGE // 5 - 2) + "]}",
    "line breaks inside a string": "{'a': '" + "\n" * (_LARGE - 9) + "'}",
    "nested brackets": "{'a': " + "[" * (_LARGE // 2 - 4) + "]" * (_LARGE // 2 - 4) + "}",
    "many keys": "{" + ",".join(f"'k{i}': {i}" for i in range(_LARGE // 12)) + "}",
}


@pytest.mark.parametrize("text", list(LARGE_REPLIES.values()), ids=list(LARGE_REPLIES))
def test_large_replies_are_read_in_bounded_time(text: str) -> None:
    # Linear work: about a second per megabyte on a slow shared CPU. Quadratic paths (which
    # '<answer>' repeated and JSON literals once hit) take minutes.
    for parse in (lambda t: parse_plan(t, input_images=0, max_steps=12), parse_verdict):
        started = time.perf_counter()
        with contextlib.suppress(OutputParseError):
            parse(text)
        assert time.perf_counter() - started < 8


# ================================================================================================
# Progress events (events.py)

_EVENT_NAMES = ["thread", "plan", "generating", "image", "verdict", "committed", "budget", "document",
                "other"]
_EVENT_FIELDS = ["event", "thread_id", "resumed", "steps", "step", "index", "total", "attempt",
                 "prompt", "image", "reused", "repeats", "success", "status", "next_attempt",
                 "calls", "max_calls", "forced", "skipped", "extra"]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
CHUNKS = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(_EVENT_FIELDS), SCALARS | st.lists(SCALARS, max_size=2),
                    max_size=8).flatmap(
        lambda fields: st.sampled_from(_EVENT_NAMES).map(lambda name: {**fields, "event": name})
    ),
)
EVENT_CLASSES = (ThreadStarted, PlanReady, StepStarted, ImageReady, Verdict, StepCommitted,
                 BudgetExhausted, DocumentReady)


@PROPERTY
@given(CHUNKS)
def test_parse_event_gives_none_an_event_or_a_validation_error(chunk: Any) -> None:
    try:
        event = parse_event(chunk)
    except ValidationError:
        assert isinstance(chunk, dict) and chunk.get("event") in _EVENT_NAMES[:-1]
        return
    assert event is None or isinstance(event, EVENT_CLASSES)
    if not isinstance(chunk, dict) or chunk.get("event") not in _EVENT_NAMES[:-1]:
        assert event is None


_INT = st.integers(-(2**40), 2**40)
_TEXT = st.text(max_size=20)
_JSONISH = st.dictionaries(_TEXT, st.none() | st.booleans() | _INT | _TEXT, max_size=4)
EVENTS = st.one_of(
    st.builds(ThreadStarted, thread_id=_TEXT, resumed=st.booleans()),
    st.builds(PlanReady, steps=st.lists(_JSONISH, max_size=3)),
    st.builds(StepStarted, step=_INT, index=_INT, total=_INT, attempt=_INT, prompt=_TEXT),
    st.builds(ImageReady, step=_INT, index=_INT, total=_INT, attempt=_INT, image=_TEXT,
              reused=st.booleans(), repeats=st.none() | _INT),
    st.builds(Verdict, step=_INT, index=_INT, total=_INT, attempt=_INT,
              success=st.none() | st.booleans(), status=_TEXT,
              next_attempt=st.sampled_from([None, "drawn", "repeated", "none"])),
    st.builds(StepCommitted, step=_INT, index=_INT, total=_INT, status=_TEXT,
              image=st.none() | _TEXT),
    st.builds(BudgetExhausted, calls=_INT, max_calls=_INT, forced=st.lists(_INT, max_size=3),
              skipped=st.lists(_INT, max_size=3)),
    st.builds(DocumentReady, steps=_INT),
)


@PROPERTY
@given(EVENTS)
def test_events_read_back_from_their_stream_form(event: Any) -> None:
    assert parse_event(event.model_dump(mode="json")) == event


# ================================================================================================
# CLI --size (cli/options.py)


@PROPERTY
@given(st.text(max_size=20) | st.sampled_from(["²x2", "٣x٣", "1" * 5000 + "x2", "64x64\n", "0x0"]))
def test_size_option_gives_ascii_numbers_or_a_configuration_error(text: str) -> None:
    try:
        width, height = parse_size(text)
    except ConfigurationError as error:
        assert "is not WIDTHxHEIGHT" in error.message and len(error.message) < 100
        return
    left, right = re.split("[xX]", text)
    for part, number in ((left, width), (right, height)):
        assert part.isascii() and part.isdigit() and int(part) == number


@PROPERTY
@given(st.integers(0, 999_999), st.integers(0, 999_999), st.sampled_from(["x", "X"]), st.integers(0, 3))
def test_size_option_reads_back(width: int, height: int, sep: str, zeros: int) -> None:
    assert parse_size(f"{'0' * zeros}{width}{sep}{height}") == (width, height)


# ================================================================================================
# Thread ids (runner.py) and the ids batch runs derive from prompt ids (batch.py)


@PROPERTY
@given(st.text(max_size=140) | st.from_regex(THREAD_ID_PATTERN, fullmatch=True)
       | st.sampled_from([None, 7, b"run", ["a"]]))
def test_thread_ids_are_returned_unchanged_or_refused(thread_id: Any) -> None:
    if isinstance(thread_id, str) and THREAD_ID_PATTERN.fullmatch(thread_id):
        assert validate_thread_id(thread_id) == thread_id
    else:
        with pytest.raises(ConfigurationError):
            validate_thread_id(thread_id)


@PROPERTY
@given(st.text(min_size=1, max_size=600), st.text(min_size=1, max_size=600))
def test_every_prompt_id_gives_a_valid_stable_thread_id(first: str, second: str) -> None:
    thread = thread_id_for(first)
    assert validate_thread_id(thread) == thread == thread_id_for(first)
    if first != second:
        assert thread_id_for(second) != thread


# ================================================================================================
# Source references (state.py)


@PROPERTY
@given(st.text(max_size=20) | st.from_regex(r"(step|input):[0-9]{1,5000}", fullmatch=True))
def test_source_names_give_a_kind_and_number_or_a_value_error(source: str) -> None:
    try:
        kind, number = parse_source(source)
    except ValueError:
        return
    assert f"{kind}:{number}" == source and number >= 1


@PROPERTY
@given(st.sampled_from(["step", "input"]), st.integers(1, 10**12))
def test_source_names_read_back(kind: str, number: int) -> None:
    assert parse_source(f"{kind}:{number}") == (kind, number)


# ================================================================================================
# Run option changes (state.py)

# 'budget' itself is left out: a non-dict budget next to a budget field raises TypeError
# (test_known_parser_bugs).
_OPTION_NAMES = [*(name for name in RunOptions.model_fields if name != "budget"), "max_attempts",
                 "max_calls", "selection", "accept_final_without_critic", "no_such_option"]


@PROPERTY
@given(st.dictionaries(st.sampled_from(_OPTION_NAMES),
                       SCALARS | st.lists(st.integers(), max_size=2) | st.dictionaries(_TEXT, _INT),
                       max_size=4))
def test_option_changes_give_valid_options_or_a_value_error(changes: dict[str, Any]) -> None:
    try:
        options = RunOptions().with_changes(**changes)
    except ValueError:  # pydantic's ValidationError is one
        return
    assert RunOptions.model_validate(options.model_dump()) == options


# ================================================================================================
# Model settings: environment and TOML file (settings.py)

_SETTING_NAMES = [*ModelSettings.model_fields]
_TOML_PIECES = [
    *(f"{name} = " for name in _SETTING_NAMES), "\n", '"text"', "'x'", '"""', "3", "-1", "0.5",
    "inf", "nan", "true", "[", "]", "{", "}", ",", "=", "[table]", "#", "1979-05-27", "\\u00e9",
    "unknown = 1", "[" * 3000, "\x00",
]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@FEW
@given(st.dictionaries(st.sampled_from(_SETTING_NAMES),
                       st.text(st.characters(blacklist_characters="\x00",
                                             blacklist_categories=("Cs",)), max_size=12),
                       max_size=4))
def test_environment_values_give_settings_or_a_configuration_error(values: dict[str, str]) -> None:
    with environment({f"INTERLEAVE_{name.upper()}": value for name, value in values.items()}):
        try:
            loaded = load_model_settings(None)
        except ConfigurationError as error:
            assert error.message.startswith("invalid model setting ")
            return
    assert isinstance(loaded, ModelSettings)


@FEW
@given(st.lists(st.sampled_from(_TOML_PIECES) | st.text(max_size=3), max_size=12).map("".join)
       | st.binary(max_size=30))
def test_settings_files_give_settings_or_a_configuration_error(content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "interleave.toml"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(content)
        try:
            loaded = load_model_settings(path)
        except ConfigurationError:
            return
    assert isinstance(loaded, ModelSettings)


# ================================================================================================
# Prompt files of batch runs (batch.py)

# Nesting is kept shallow here: json.loads recurses, and a line of thousands of '[' raises
# RecursionError out of read_prompt_file (test_known_parser_bugs below).
_LINE_PIECES = ['{"id": ', '"a"', '"b"', ', "text": ', '"draw"', ', "images": ', '["x.png"]', "[",
                "]", "{", "}", ",", ":", "1", "1" * 5000, "null", "true", '"', "\\", "\u2028"]
LINES = st.lists(st.sampled_from(_LINE_PIECES) | st.text(max_size=5), max_size=12).map("".join)


@FEW
@given(st.lists(LINES, max_size=6))
def test_prompt_files_give_prompts_and_numbered_bad_lines(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            prompts, bad = read_prompt_file(path)
        except ConfigurationError:  # a file that is not UTF-8
            return
    numbers = [item.line for item in prompts] + [item.line for item in bad]
    assert len(set(numbers)) == len(numbers)
    assert len({item.prompt.id for item in prompts}) == len(prompts)


# ================================================================================================
# Exported documents (render/json_doc.py)

_REF = ImageRef(sha256="ab" * 32, media_type="image/png", width=8, height=8)
DOCUMENTS = st.builds(
    Document,
    request=st.builds(Request, text=st.text(st.characters(categories=["L", "N", "P", "Zs"]),
                                            min_size=1, max_size=30).filter(str.strip)),
    steps=st.lists(st.builds(
        DocumentStep, number=st.integers(1, 50), name=_TEXT, text=_TEXT, instruction=_TEXT,
        status=st.sampled_from(["accepted", "forced", "text", "skipped"]),
        image=st.none() | st.just(_REF),
        attempts=st.lists(st.builds(Attempt, step=st.integers(1, 50), number=st.integers(1, 5),
                                    prompt=_TEXT, seed=st.integers(0, 2**31), image=st.just(_REF)),
                          max_size=2).map(tuple),
    ), max_size=3).map(tuple),
    profile=_TEXT, generator_calls=st.integers(0, 100),
)


@FEW
@given(DOCUMENTS, st.from_regex(THREAD_ID_PATTERN, fullmatch=True))
def test_exported_documents_read_back(document: Document, thread_id: str) -> None:
    assert load_document_json(document_json(document, thread_id=thread_id)) == (thread_id, document)


@PROPERTY
@given(st.lists(st.sampled_from(['{"thread_id": "t", "document": ', '{"request": ', '{"text": "x"}',
                                 ', "steps": []', "}", "[", "]", "{", ",", "null", '"', "1e400"])
                | st.text(max_size=5), max_size=12).map("".join))
def test_document_text_gives_a_document_or_a_configuration_error(text: str) -> None:
    # Shallow nesting and short numbers: see test_known_parser_bugs for the deep and long ones.
    with contextlib.suppress(ConfigurationError):
        load_document_json(text)


# ================================================================================================
# Checkpointer URLs (checkpoints/postgres.py)

_URL_PIECES = ["postgresql://", "postgres://", "sqlite://", "user", ":", "pass@", "@", "host",
               ":5432", "/db", "?", "&", "pool_min=", "pool_max=", "0", "2", "-1", "x", "%41",
               "=", "sslmode=require", "password=secret", "#"]


# ASCII without brackets: urlsplit's ValueError for an unclosed IPv6 bracket or a host that
# NFKC-normalises to a delimiter escapes parse_url (test_known_parser_bugs).
_URL_TEXT = st.text(st.characters(max_codepoint=127, blacklist_characters="[]"), max_size=3)


@PROPERTY
@given(st.lists(st.sampled_from(_URL_PIECES) | _URL_TEXT, max_size=10).map("".join))
def test_checkpointer_urls_give_a_target_or_a_configuration_error(url: str) -> None:
    try:
        target = parse_url(url)
    except ConfigurationError:
        return
    assert 1 <= target.pool_min <= target.pool_max
    # The pool parameters are ours: libpq must not see them in the query.
    names = {segment.partition("=")[0] for segment in urlsplit(target.conninfo).query.split("&")}
    assert not names & {"pool_min", "pool_max"}


@PROPERTY
@given(st.integers(1, 64), st.integers(0, 64))
def test_pool_sizes_read_back_from_the_url(low: int, extra: int) -> None:
    target = parse_url(f"postgresql://u@h:5432/db?pool_min={low}&sslmode=require&pool_max={low + extra}")
    assert (target.pool_min, target.pool_max) == (low, low + extra)
    assert target.conninfo == "postgresql://u@h:5432/db?sslmode=require"


# ================================================================================================
# Review answers (nodes/review.py)


def _waiting_state(forced: bool) -> dict[str, Any]:
    attempts = tuple(Attempt(step=2, number=n, prompt="p", seed=1, image=_REF) for n in (1, 2))
    progress = (StepProgress(number=2, attempts=attempts, awaiting_review=forced),)
    return {"request": Request(text="x"),
            "settings": RunSettings(profile="t", planner="p", critic="c", generator="g"),
            "progress": progress}


ANSWER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
    max_leaves=12,
)
ANSWERS = st.one_of(
    ANSWER_VALUES,
    st.dictionaries(st.sampled_from(["1", "2", "3", "x", " 2 "]), ANSWER_VALUES, max_size=3),
    st.builds(lambda steps: {"execution_plan": steps},
              st.lists(st.dictionaries(st.sampled_from(["step_number", "instruction", "prompt",
                                                        "sources", "step_name", "other"]),
                                       ANSWER_VALUES, max_size=5), max_size=3)),
)


@PROPERTY
@given(ANSWERS, st.booleans())
def test_review_answers_are_accepted_or_refused_with_a_configuration_error(
    answer: Any, forced: bool
) -> None:
    with contextlib.suppress(ConfigurationError):
        check_review_answer(answer, _waiting_state(forced))  # type: ignore[arg-type]


# ================================================================================================
# Inputs that once escaped as undocumented errors (ValueError, RecursionError, OverflowError,
# TypeError) from parsers outside prompts/: each must now be a ConfigurationError that says why.

_DEEP = "[" * 100_000


def _shard(text: str) -> Any:
    from interleave_thinker.batch import parse_shard

    return parse_shard(text)


def _prompt_file_line(line: str) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        return read_prompt_file(path)


def _nested_plan(depth: int) -> dict[str, Any]:
    inner: Any = "x"
    for _ in range(depth):
        inner = [inner]
    return {"execution_plan": inner}


REFUSED_CLEARLY = {
    "batch.parse_shard: a non-ASCII digit": (lambda: _shard("²/3"), "is not I/N"),
    "batch.parse_shard: 5000 digits": (lambda: _shard("1" * 5000 + "/2"), "is not I/N"),
    "render.json_doc: deeply nested JSON": (lambda: load_document_json(_DEEP), "nested too deeply"),
    "render.json_doc: a 5000-digit number": (lambda: load_document_json("1" * 5000), "unreadable value"),
    "postgres.parse_url: an unclosed IPv6 bracket":
        (lambda: parse_url("postgresql://[abc/db"), "cannot be read"),
    "postgres.parse_url: a host with a full-width '#'":
        (lambda: parse_url("postgresql://ho\uff03st/db"), "cannot be read"),
    "review: an infinite attempt number":
        (lambda: check_review_answer({"2": float("inf")}, _waiting_state(True)),  # type: ignore[arg-type]
         "is not STEP=ATTEMPT"),
    "review: a fractional attempt number (not quietly attempt 1)":
        (lambda: check_review_answer({"2": 1.7}, _waiting_state(True)),  # type: ignore[arg-type]
         "is not STEP=ATTEMPT"),
    "review: a deeply nested edited plan":
        (lambda: check_review_answer(_nested_plan(5000), _waiting_state(False)),  # type: ignore[arg-type]
         "nested too deeply"),
}


@pytest.mark.parametrize(("call", "words"), list(REFUSED_CLEARLY.values()), ids=list(REFUSED_CLEARLY))
def test_odd_input_to_other_parsers_is_refused_clearly(call: Callable[[], Any], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as raised:
        call()
    assert raised.value.hint


def test_a_deeply_nested_batch_line_is_one_bad_line() -> None:
    prompts, bad = _prompt_file_line(_DEEP)
    assert prompts == [] and [line.error for line in bad] == ["the JSON is nested too deeply"]


def test_budget_replaced_beside_a_budget_field_is_a_validation_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="budget"):
        RunOptions().with_changes(budget=False, max_attempts=2)


def test_whole_number_review_answers_still_work() -> None:
    check_review_answer({"2": 2.0}, _waiting_state(True))  # type: ignore[arg-type]
    check_review_answer({" 2 ": "1"}, _waiting_state(True))  # type: ignore[arg-type]


def test_an_unreadable_checkpointer_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="cannot be read") as raised:
        parse_url("postgresql://me:s3cret-pw@[abc/db?password=other-s3cret")
    assert "s3cret" not in raised.value.message and "***" in raised.value.message
