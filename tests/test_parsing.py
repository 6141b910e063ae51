"""Tests for the tolerant planner/critic reply parser, on realistic and arbitrary model output."""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interleave_thinker.prompts.parsing import (
    OutputParseError,
    parse_answer_dict,
    parse_plan,
    parse_verdict,
    read_plan,
    split_think_answer,
)


def plan_reply(steps: list[dict], *, style: str = "json") -> str:
    body = {"execution_plan": steps}
    answer = json.dumps(body) if style == "json" else repr(body)
    return f"<think>Plan the steps.</think><answer>{answer}</answer>"


def step(number, prompt="draw it", **extra) -> dict:
    record = {
        "step_number": number,
        "step_name": f"Step {number}",
        "instruction": f"show stage {number}",
        "prompt": prompt,
        "auxiliary_text": None,
    }
    record.update(extra)
    return record


# --- split_think_answer ------------------------------------------------------------------------


def test_split_clean_tags():
    reasoning, answer = split_think_answer("<think> why </think>\n<answer>{'a': 1}</answer>")
    assert reasoning == "why"
    assert answer == "{'a': 1}"


def test_split_missing_think_open_tag():
    text = 'The user wants a cat.\nSo one step.</think>\n<answer>{"a": 1}</answer>'
    reasoning, answer = split_think_answer(text)
    assert reasoning == "The user wants a cat.\nSo one step."
    assert answer == '{"a": 1}'


def test_split_missing_answer_close_tag():
    reasoning, answer = split_think_answer("<think>r</think><answer>{'a': 1}")
    assert (reasoning, answer) == ("r", "{'a': 1}")


def test_split_answer_without_tags_uses_last_brace_block():
    text = "<think>draft {'a': 0}</think>Here it is: {'a': 1} and {'a': 2}. Done."
    reasoning, answer = split_think_answer(text)
    assert reasoning == "draft {'a': 0}"
    assert answer == "{'a': 2}"


def test_split_no_tags_at_all():
    reasoning, answer = split_think_answer('I\'d say {"a": 1}')
    assert answer == '{"a": 1}'
    assert reasoning == "I'd say"


def test_split_several_answer_blocks_uses_last():
    text = "<think>x</think><answer>{'a': 1}</answer> oops <answer>{'a': 2}</answer>"
    assert split_think_answer(text)[1] == "{'a': 2}"


def test_split_prefers_answer_after_reasoning_over_one_quoted_inside_it():
    text = "<think>I will write <answer>{'a': 0}</answer></think><answer>{'a': 1}</answer>"
    reasoning, answer = split_think_answer(text)
    assert answer == "{'a': 1}"
    assert reasoning.startswith("I will write")


def test_split_case_insensitive_tags():
    reasoning, answer = split_think_answer("<THINK>r</Think><Answer>{'a': 1}</ANSWER>")
    assert (reasoning, answer) == ("r", "{'a': 1}")


def test_split_trailing_prose_after_answer():
    text = "<think>r</think><answer>{'a': 1}</answer>\nHope this helps! {not a dict}"
    assert split_think_answer(text)[1] == "{'a': 1}"


# --- parse_answer_dict -------------------------------------------------------------------------


def test_dict_clean_json():
    assert parse_answer_dict('{"a": [1, 2], "b": {"c": null}}') == {"a": [1, 2], "b": {"c": None}}


def test_dict_python_single_quotes_with_none():
    assert parse_answer_dict("{'a': None, 'b': 'None', 'c': True}") == {
        "a": None,
        "b": "None",
        "c": True,
    }


@pytest.mark.parametrize("fence", ["```", "```json", "```python"])
def test_dict_code_fenced(fence):
    text = f"Sure, here:\n{fence}\n{{'a': 1}}\n```\nLet me know."
    assert parse_answer_dict(text) == {"a": 1}


def test_dict_braces_inside_strings():
    text = """{'prompt': 'a sign reading "}{" and a { bracket', "x": "it's {fine}"}"""
    assert parse_answer_dict(text) == {
        "prompt": 'a sign reading "}{" and a { bracket',
        "x": "it's {fine}",
    }


def test_dict_json_literals_mixed_with_python_quotes():
    text = "{'ok': true, 'refine': null, 'bad': false, 'note': 'true or null stay text'}"
    assert parse_answer_dict(text) == {
        "ok": True,
        "refine": None,
        "bad": False,
        "note": "true or null stay text",
    }


def test_dict_raw_newline_inside_single_quoted_string():
    assert parse_answer_dict("{'a': 'line one\nline two'}") == {"a": "line one\nline two"}


def test_dict_trailing_comma():
    assert parse_answer_dict("{'a': [1, 2,],}") == {"a": [1, 2]}


def test_dict_truncated_mentions_truncation():
    with pytest.raises(OutputParseError, match="truncated"):
        parse_answer_dict("{'execution_plan': [{'step_number': 1, 'step_name': 'Cat")


def test_dict_missing():
    with pytest.raises(OutputParseError, match="no dict found"):
        parse_answer_dict("I cannot help with that.")


def test_dict_missing_commas_are_repaired_by_json_repair():
    assert parse_answer_dict("{'a': 'x' 'b': 'y'}") == {"a": "x", "b": "y"}
    assert parse_answer_dict('{"previous_step_success": false "refine_prompt": "a hat"}') == {
        "previous_step_success": False,
        "refine_prompt": "a hat",
    }


def test_dict_a_block_nothing_can_read_names_the_syntax_error():
    with pytest.raises(OutputParseError, match="syntax error at line 1"):
        parse_answer_dict("{: :}")


def test_dict_never_evaluates_code():
    value = parse_answer_dict("{'a': __import__('os').getcwd()}")
    # json-repair reads the call as text; nothing ran.
    assert isinstance(value["a"], str) and value["a"] != os.getcwd()


def test_dict_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(OutputParseError):
        parse_answer_dict("{'a': " + "[" * 5000 + "]" * 5000 + "}")


def test_one_megabyte_of_garbage_fails_fast():
    garbage = ("{[(<'\"\\ junk " * 100_000)[:1_048_576]
    started = time.perf_counter()
    for function in (parse_answer_dict, split_think_answer, parse_verdict):
        with pytest.raises(OutputParseError, match="characters"):
            function(garbage)
    assert time.perf_counter() - started < 1.0


def test_just_under_the_limit_still_fails_cleanly_and_quickly():
    started = time.perf_counter()
    with pytest.raises(OutputParseError):
        parse_plan("{" * 999_999, input_images=0, max_steps=12)
    with pytest.raises(OutputParseError):
        parse_answer_dict("{a} " * 249_999)
    assert time.perf_counter() - started < 5.0


# --- parse_plan --------------------------------------------------------------------------------

RELEASED_STYLE = """<think>
The user wants a three-panel story about a fox.
</think>
<answer>
{'execution_plan': [{'step_number': 1, 'step_name': 'Fox wakes', 'instruction': 'A fox wakes \
in its den.', 'prompt': 'A red fox curled in a cozy den at dawn, storybook watercolor', \
'auxiliary_text': None}, {'step_number': 2, 'step_name': 'Fox leaves', 'instruction': 'The fox \
steps outside.', 'prompt': 'Move the fox to the den entrance, keep the style', \
'auxiliary_text': 'None'}]}
</answer>"""


def test_plan_released_style():
    plan = parse_plan(RELEASED_STYLE, input_images=0, max_steps=12)
    assert [s.number for s in plan.steps] == [1, 2]
    first, second = plan.steps
    assert first.name == "Fox wakes"
    assert first.prompt.startswith("A red fox")
    assert first.text is None and second.text is None
    assert first.sources == () and first.action == "generate"
    assert second.sources == ("step:1",) and second.action == "edit"


@pytest.mark.parametrize("empty", [None, "", "None", "none", " null ", "N/A"])
def test_plan_nullish_prompt_and_text(empty):
    reply = plan_reply([step(1, prompt=empty, auxiliary_text=empty)], style="python")
    only = parse_plan(reply, input_images=1, max_steps=12).steps[0]
    assert only.prompt is None and only.text is None and only.action == "none"


def test_plan_auxiliary_text_kept():
    reply = plan_reply([step(1, auxiliary_text="  Once upon a time. ")])
    assert parse_plan(reply, input_images=0, max_steps=12).steps[0].text == "Once upon a time."


def test_plan_step_number_as_string():
    reply = plan_reply([step("1"), step(" 2 ")])
    assert [s.number for s in parse_plan(reply, input_images=0, max_steps=12).steps] == [1, 2]


def test_plan_code_fenced_with_prose():
    reply = (
        "</think>Here is the plan:\n```json\n"
        + json.dumps({"execution_plan": [step(1)]})
        + "\n```\nEnjoy!"
    )
    assert len(parse_plan(reply, input_images=0, max_steps=12).steps) == 1


def test_plan_narrative_chain_skips_text_steps():
    reply = plan_reply([step(1), step(2, prompt=None), step(3), step(4)])
    steps = parse_plan(reply, input_images=0, max_steps=12).steps
    assert [s.sources for s in steps] == [(), (), ("step:1",), ("step:3",)]


def test_plan_guidance_numbering_and_chain():
    reply = plan_reply([step(4), step(5, prompt="None", auxiliary_text="It is a kettle."), step(6)])
    steps = parse_plan(reply, input_images=3, max_steps=12).steps
    assert [s.number for s in steps] == [4, 5, 6]
    assert [s.sources for s in steps] == [("input:3",), (), ("step:4",)]
    assert steps[1].display_text == "It is a kettle."


def test_plan_explicit_sources_normalised():
    reply = plan_reply(
        [
            step(1, sources=[]),
            step(2, sources=["input:1", 1]),
            step(3, sources=["2", "Step: 1", "step:1"]),
        ]
    )
    steps = parse_plan(reply, input_images=1, max_steps=12).steps
    assert [s.sources for s in steps] == [(), ("input:1", "step:1"), ("step:2", "step:1")]
    assert steps[0].action == "generate"


def test_plan_explicit_empty_sources_means_text_to_image_even_with_inputs():
    reply = plan_reply([step(1, sources=[])])
    assert parse_plan(reply, input_images=2, max_steps=12).steps[0].sources == ()


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([2], "no earlier step 2"),
        (["step:3"], "no earlier step 3"),
        (["input:2"], "no input image 2"),
        (["input:0"], "out of range"),
        (["picture one"], "expected an earlier step number"),
        ([True], "expected an earlier step number"),
    ],
)
def test_plan_invalid_sources(sources, message):
    reply = plan_reply([step(1), step(2, sources=sources)])
    with pytest.raises(OutputParseError, match=message):
        parse_plan(reply, input_images=1, max_steps=12)


def test_plan_source_must_draw_an_image():
    reply = plan_reply([step(1, prompt=None), step(2, sources=[1])])
    with pytest.raises(OutputParseError, match="no earlier step 1 draws an image"):
        parse_plan(reply, input_images=0, max_steps=12)


def test_plan_max_steps_exceeded():
    reply = plan_reply([step(n) for n in range(1, 41)])
    with pytest.raises(OutputParseError, match="plan has 40 steps; at most 12 are allowed"):
        parse_plan(reply, input_images=0, max_steps=12)


def test_plan_empty():
    with pytest.raises(OutputParseError, match="empty"):
        parse_plan(plan_reply([]), input_images=0, max_steps=12)


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [([1, 1], [1, 2]), ([2, 1], [2, 3]), ([1, 3, 2], [1, 2, 3]), ([1, 2, 1, 2], [1, 2, 3, 4])],
)
def test_plan_repeated_or_restarting_numbers_are_renumbered_with_a_note(numbers, expected):
    plan, notes = read_plan(plan_reply([step(n) for n in numbers]), input_images=0, max_steps=12)
    assert [s.number for s in plan.steps] == expected
    # The chain follows the new numbers.
    assert [s.sources for s in plan.steps[1:]] == [(f"step:{n}",) for n in expected[:-1]]
    assert len(notes) == 1 and "renumbered" in notes[0]


def test_plan_in_order_gets_no_note():
    assert read_plan(plan_reply([step(1), step(2)]), input_images=0)[1] == ()


def test_plan_gaps_in_numbering_are_allowed():
    steps = parse_plan(plan_reply([step(1), step(3)]), input_images=0, max_steps=12).steps
    assert steps[1].sources == ("step:1",)


def test_plan_step_without_instruction_or_prompt():
    with pytest.raises(OutputParseError, match="step 2 has neither an instruction, a prompt nor"):
        parse_plan(
            plan_reply([step(1), step(2, prompt=None, instruction="")]),
            input_images=0,
            max_steps=12,
        )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("{'execution_plan': 'draw a cat'}", "must be a list"),
        ("{'execution_plan': [[1, 'cat']]}", "step 1 of the plan is a list"),
        ("{'plan': []}", "no 'execution_plan' key"),
        ("{'execution_plan': [{'step_name': 'x', 'prompt': 'p'}]}", "no 'step_number'"),
        ("{'execution_plan': [{'step_number': 'one', 'prompt': 'p'}]}", "whole number"),
        ("{'execution_plan': [{'step_number': 0, 'prompt': 'p'}]}", "from 1"),
        ("{'execution_plan': [{'step_number': 1, 'prompt': ['p']}]}", "'prompt' must be text"),
    ],
)
def test_plan_wrong_types(answer, message):
    with pytest.raises(OutputParseError, match=message):
        parse_plan(f"<answer>{answer}</answer>", input_images=0, max_steps=12)


def test_plan_truncated_reply():
    truncated = RELEASED_STYLE[: RELEASED_STYLE.index("'Fox leaves'")]
    with pytest.raises(OutputParseError, match="truncated"):
        parse_plan(truncated, input_images=0, max_steps=12)


# --- parse_verdict -----------------------------------------------------------------------------


def test_verdict_clean_json():
    text = (
        '<think>\nThe hat is blue, not red.\n</think>\n<answer>{"previous_step_success": false, '
        '"refine_prompt": "Make the hat red; keep the face unchanged."}</answer>'
    )
    verdict = parse_verdict(text)
    assert verdict.success is False
    assert verdict.refine_prompt == "Make the hat red; keep the face unchanged."
    assert verdict.reasoning == "The hat is blue, not red."
    assert verdict.score is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("'True'", True), ("'no'", False), ("' YES '", True), ("1", True), ("0", False)],
)
def test_verdict_success_variants(value, expected):
    text = f"<answer>{{'previous_step_success': {value}, 'refine_prompt': 'x'}}</answer>"
    assert parse_verdict(text).success is expected


@pytest.mark.parametrize("value", ["'maybe'", "2", "0.5", "[True]", "None"])
def test_verdict_bad_success_type(value):
    with pytest.raises(OutputParseError, match="previous_step_success"):
        parse_verdict(f"<answer>{{'previous_step_success': {value}}}</answer>")


def test_verdict_missing_success_key():
    with pytest.raises(OutputParseError, match="no 'previous_step_success'"):
        parse_verdict("<answer>{'refine_prompt': 'x'}</answer>")


def test_verdict_failure_without_refine_prompt():
    verdict = parse_verdict("</think><answer>{'previous_step_success': False}</answer>")
    assert verdict.success is False and verdict.refine_prompt is None


def test_verdict_nullish_refine_prompt():
    text = "<answer>{'previous_step_success': True, 'refine_prompt': 'None'}</answer>"
    assert parse_verdict(text).refine_prompt is None


def test_verdict_refine_prompt_wrong_type():
    with pytest.raises(OutputParseError, match="refine_prompt"):
        parse_verdict("<answer>{'previous_step_success': True, 'refine_prompt': 3}</answer>")


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        ("7", 7.0),
        ("9.5", 9.5),
        ("0", 0.0),
        ("11", None),
        ("-1", None),
        ("'8'", None),
        ("True", None),
        ("1e999", None),
    ],
)
def test_verdict_score(score, expected):
    text = f"<answer>{{'previous_step_success': True, 'score': {score}}}</answer>"
    assert parse_verdict(text).score == expected


# --- properties --------------------------------------------------------------------------------

# Pieces of realistic replies mixed with arbitrary characters, so the fuzzing reaches the
# dict and plan checks instead of stopping at "no dict found".
_PIECES = [
    *"{}[]()'\":,\n\\",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "```json\n",
    "true",
    "null",
    "None",
    "'execution_plan'",
    '"step_number"',
    "'prompt'",
    "'sources'",
    "'previous_step_success'",
    "'refine_prompt'",
    "'score'",
    "'input:1'",
    "1",
    "-3",
    "1e999",
]
_ANY_TEXT = st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=80).map("".join)


@settings(max_examples=300, deadline=None)
@given(_ANY_TEXT)
def test_arbitrary_text_only_raises_output_parse_error(text):
    for parse in (
        parse_answer_dict,
        split_think_answer,
        parse_verdict,
        lambda t: parse_plan(t, input_images=2, max_steps=5),
    ):
        with contextlib.suppress(OutputParseError):
            parse(text)


_SCALAR = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=40)
_FLAT_DICT = st.dictionaries(st.text(max_size=15), _SCALAR, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_FLAT_DICT, st.sampled_from(["repr", "json"]), st.text(max_size=60))
def test_round_trip(value, writer, reasoning):
    reasoning = reasoning.replace("<", "(")  # keep the tags unambiguous
    answer = repr(value) if writer == "repr" else json.dumps(value)
    _, parsed_answer = split_think_answer(f"<think>{reasoning}</think><answer>{answer}</answer>")
    assert parse_answer_dict(parsed_answer) == value


_STEP_DICT = st.fixed_dictionaries(
    {
        "step_number": st.integers(-2, 8) | st.text(max_size=3),
        "step_name": _SCALAR,
        "instruction": _SCALAR,
        "prompt": _SCALAR,
        "auxiliary_text": _SCALAR,
    },
    optional={
        "sources": st.lists(
            st.integers(-1, 8) | st.sampled_from(["input:1", "input:3", "step:2", "x", "2"]),
            max_size=3,
        )
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP_DICT, max_size=6), st.sampled_from(["repr", "json"]))
def test_arbitrary_plans_only_raise_output_parse_error(items, writer):
    body = {"execution_plan": items}
    answer = repr(body) if writer == "repr" else json.dumps(body)
    try:
        plan = parse_plan(f"<answer>{answer}</answer>", input_images=2, max_steps=5)
    except OutputParseError:
        return
    numbers = [s.number for s in plan.steps]
    assert numbers == sorted(set(numbers))
