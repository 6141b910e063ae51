"""Replies written the way the released planner and critic print them, read into plans and
verdicts; the broken ones refused, never half-used."""

# The replies keep the long lines the models print.
# ruff: noqa: E501

from __future__ import annotations

import pytest

from interleave_thinker.prompts.parsing import OutputParseError, parse_plan, parse_verdict, read_plan

PYTHON_PLAN_WITH_APOSTROPHES = """<think>
The user's request: a cat's day. I'll plan three images; the cat's look must stay the same.
</think>

<answer>
{
   'execution_plan':
   [
      {'step_number': 1, 'step_name': 'Morning', 'instruction': 'The cat wakes up on the windowsill.', 'prompt': 'A ginger cat's morning stretch on a sunny windowsill, soft light', 'auxiliary_text': None},
      {'step_number': 2, 'step_name': 'Breakfast', 'instruction': 'It eats from its bowl.', 'prompt': 'Change the scene: the cat eats from a blue bowl, keep the cat's stripes', 'auxiliary_text': 'None'},
      {'step_number': 3, 'step_name': 'Nap', 'instruction': 'It naps in the sun.', 'prompt': "The cat curls up asleep in a patch of sun, don't change its fur", 'auxiliary_text': null}
   ]
}
</answer>"""

FENCED_WITHOUT_THINK_OPEN = """The plan is simple.</think>
```json
{"execution_plan": [{"step_number": 1, "step_name": "Sketch", "instruction": "Draw the outline.",
"prompt": "a pencil outline of an owl", "auxiliary_text": "Start with two circles."}]}
```"""

TASK_A_GUIDANCE = """<think>The user gave three pictures and asks what happens in each. Task A.</think>
<answer>
{'execution_plan': [
  {'step_number': 1, 'step_name': 'First picture', 'instruction': None, 'prompt': None, 'auxiliary_text': 'A seed is planted in the soil.'},
  {'step_number': 2, 'step_name': 'Second picture', 'instruction': None, 'prompt': None, 'auxiliary_text': 'The seedling's first leaves appear.'},
  {'step_number': 3, 'step_name': 'Third picture', 'instruction': None, 'prompt': None, 'auxiliary_text': 'It has grown into a young plant.'}
]}
</answer>"""

RESTARTING_NUMBERS = """<answer>{'execution_plan': [
 {'step_number': 1, 'step_name': 'a', 'instruction': 'one', 'prompt': 'draw one', 'auxiliary_text': None},
 {'step_number': 2, 'step_name': 'b', 'instruction': 'two', 'prompt': 'draw two', 'auxiliary_text': None},
 {'step_number': 1, 'step_name': 'c', 'instruction': 'three', 'prompt': 'draw three', 'auxiliary_text': None}
]}</answer>"""

CRITIC_REJECT_APOSTROPHE = """<think>
The hat is missing; the cat's head is bare.
</think>

<answer>
{
   'previous_step_success': False,
   'refine_prompt': 'Add a red hat on the cat's head, keep the background unchanged'
}
</answer>"""

CRITIC_ACCEPT_ECHOING = """<think>The edit is right and nothing broke.</think>
<answer>
{'previous_step_success': 'True', 'refine_prompt': 'Add a red hat on the cat'}
</answer>"""


def _plan_of(count: int) -> str:
    steps = ", ".join(
        f"{{'step_number': {n}, 'step_name': 'S{n}', 'instruction': 'part {n}', "
        f"'prompt': 'draw part {n}', 'auxiliary_text': None}}"
        for n in range(1, count + 1)
    )
    return f"<think>many steps</think><answer>{{'execution_plan': [{steps}]}}</answer>"


def test_python_style_plan_with_apostrophes_in_single_quoted_strings() -> None:
    plan = parse_plan(PYTHON_PLAN_WITH_APOSTROPHES, input_images=0)
    assert [step.prompt for step in plan.steps] == [
        "A ginger cat's morning stretch on a sunny windowsill, soft light",
        "Change the scene: the cat eats from a blue bowl, keep the cat's stripes",
        "The cat curls up asleep in a patch of sun, don't change its fur",
    ]
    assert [step.text for step in plan.steps] == [None, None, None]
    assert [step.sources for step in plan.steps] == [(), ("step:1",), ("step:2",)]


def test_fenced_json_with_the_think_open_tag_missing() -> None:
    (step,) = parse_plan(FENCED_WITHOUT_THINK_OPEN, input_images=0).steps
    assert (step.prompt, step.text) == ("a pencil outline of an owl", "Start with two circles.")


def test_task_a_answers_are_text_steps() -> None:
    plan = parse_plan(TASK_A_GUIDANCE, input_images=3)
    assert [step.action for step in plan.steps] == ["none"] * 3
    assert plan.steps[1].display_text == "The seedling's first leaves appear."
    assert [step.instruction for step in plan.steps] == ["", "", ""]


def test_restarting_numbers_are_renumbered_and_noted() -> None:
    plan, notes = read_plan(RESTARTING_NUMBERS, input_images=0)
    assert [step.number for step in plan.steps] == [1, 2, 3]
    assert notes and "1, 2, 1" in notes[0]


@pytest.mark.parametrize("count", [13, 25])
def test_long_plans_pass_without_a_cap_and_are_refused_with_one(count: int) -> None:
    assert len(parse_plan(_plan_of(count), input_images=0).steps) == count
    with pytest.raises(OutputParseError, match=f"has {count} steps; at most 12"):
        parse_plan(_plan_of(count), input_images=0, max_steps=12)


def test_critic_rejection_with_an_apostrophe_in_the_refined_prompt() -> None:
    verdict = parse_verdict(CRITIC_REJECT_APOSTROPHE)
    assert verdict.success is False
    assert verdict.refine_prompt == "Add a red hat on the cat's head, keep the background unchanged"


def test_critic_acceptance_ignores_the_echoed_prompt() -> None:
    verdict = parse_verdict(CRITIC_ACCEPT_ECHOING)
    assert verdict.success is True and verdict.refine_prompt is None


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (PYTHON_PLAN_WITH_APOSTROPHES[:600], "truncated"),
        (PYTHON_PLAN_WITH_APOSTROPHES.split("'step_number': 3")[0], "truncated"),
        ("", "no dict found"),
        ("<think>I will plan four steps", "ends inside its <think> block"),
        ("<think>ok</think>", "stops after its reasoning"),
        # A string left open swallows the next step: the official code refuses this too.
        ("<answer>{'execution_plan': [{'step_number': 1, 'instruction': 'a', 'prompt': 'a', "
         "'auxiliary_text': \"None}, {'step_number': 2, 'instruction': 'b'\"}]}</answer>", "runs on"),
    ],
    ids=["cut mid-plan", "cut before the last step", "empty", "cut while thinking", "think only",
         "swallowed step"],
)
def test_broken_plans_are_refused(reply: str, words: str) -> None:
    with pytest.raises(OutputParseError, match=words):
        parse_plan(reply, input_images=0)


@pytest.mark.parametrize(
    "reply",
    [
        CRITIC_REJECT_APOSTROPHE[: CRITIC_REJECT_APOSTROPHE.index("'refine_prompt'") + 30],
        "",
        "<think>The hat looks",
        "<answer>{'refine_prompt': 'a hat'}</answer>",
        "<answer>{'previous_step_success': 'maybe', 'refine_prompt': 'a hat'}</answer>",
    ],
    ids=["cut", "empty", "cut while thinking", "no verdict", "not boolean-ish"],
)
def test_broken_verdicts_are_refused(reply: str) -> None:
    with pytest.raises(OutputParseError):
        parse_verdict(reply)
