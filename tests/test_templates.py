"""Tests for the planner/critic prompts and the message builders' markers."""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from interleave_thinker.prompts import (
    CRITIC_PROMPT,
    PLANNER_GUIDANCE_PROMPT,
    PLANNER_NARRATIVE_PROMPT,
    critic_messages,
    planner_messages,
    prompts_from_messages,
    reask_message,
    request_from_messages,
)
from interleave_thinker.state import ImageRef, Request

IMAGE = {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}
OTHER = {"type": "image", "base64": "R0lGODlh", "mime_type": "image/png"}


def image_ref(fill: str) -> ImageRef:
    return ImageRef(sha256=fill * 64, media_type="image/png", width=8, height=8)


def test_prompts_ask_for_the_paper_format():
    for prompt in (PLANNER_NARRATIVE_PROMPT, PLANNER_GUIDANCE_PROMPT):
        for needle in (
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
            "execution_plan",
            "step_number",
            "step_name",
            "instruction",
            "prompt",
            "auxiliary_text",
            "sources",
            "input:N",
            "{max_steps}",
        ):
            assert needle in prompt
    for needle in ("<think>", "<answer>", "previous_step_success", "refine_prompt", "score"):
        assert needle in CRITIC_PROMPT


def test_narrative_request_uses_narrative_prompt_and_marks_the_request():
    request = Request(text="A story about a fox.\nThree panels.")
    messages = planner_messages(request, [], max_steps=7)
    assert isinstance(messages[0], SystemMessage)
    assert "<request>" not in messages[0].content
    assert "at most 7 steps" in messages[0].content
    assert "{max_steps}" not in messages[0].content
    assert messages[0].content.startswith(PLANNER_NARRATIVE_PROMPT[:40])
    human = messages[1]
    assert isinstance(human, HumanMessage)
    assert human.content == [
        {"type": "text", "text": "<request>\nA story about a fox.\nThree panels.\n</request>"}
    ]
    assert request_from_messages(messages) == "A story about a fox.\nThree panels."


def test_guidance_request_puts_images_before_the_request():
    request = Request(text="What comes next?", images=(image_ref("a"), image_ref("b")))
    messages = planner_messages(request, [IMAGE, OTHER], max_steps=4)
    assert messages[0].content.startswith(PLANNER_GUIDANCE_PROMPT[:40])
    blocks = messages[1].content
    assert blocks[:2] == [IMAGE, OTHER]
    assert blocks[2]["type"] == "text"
    assert blocks[2]["text"] == "<request>\nWhat comes next?\n</request>"
    assert request_from_messages(messages) == "What comes next?"


def test_request_is_found_after_a_reask():
    messages = planner_messages(Request(text="Draw a kite."), [], max_steps=3)
    messages += [AIMessage(content="garbage"), reask_message("no dict found", what="plan")]
    assert request_from_messages(messages) == "Draw a kite."


def test_request_helper_returns_none_without_marker():
    assert request_from_messages([HumanMessage(content="hello")]) is None
    assert request_from_messages([]) is None
    assert prompts_from_messages([HumanMessage(content="hello")]) is None


def test_critic_messages_layout_and_markers():
    messages = critic_messages(
        step_name="Add hat",
        instruction="The fox wears a red hat.",
        planned_prompt="Add a red hat to the fox",
        used_prompt="Add a bright red wool hat to the fox,\nkeep its face",
        previous_image=IMAGE,
        candidate_image=OTHER,
    )
    assert isinstance(messages[0], SystemMessage)
    assert messages[0].content == CRITIC_PROMPT
    blocks = messages[1].content
    assert blocks[0] == {"type": "text", "text": "previous image:"}
    assert blocks[1] == IMAGE
    assert blocks[2] == {"type": "text", "text": "candidate image:"}
    assert blocks[3] == OTHER
    details = blocks[4]["text"]
    assert "Add hat" in details and "The fox wears a red hat." in details
    assert "<planned_prompt>Add a red hat to the fox</planned_prompt>" in details
    assert prompts_from_messages(messages) == (
        "Add a red hat to the fox",
        "Add a bright red wool hat to the fox,\nkeep its face",
    )


def test_critic_prompts_found_after_a_reask():
    messages = critic_messages(
        step_name="s",
        instruction="i",
        planned_prompt="p",
        used_prompt="u",
        previous_image=IMAGE,
        candidate_image=OTHER,
    )
    messages.append(reask_message("bad", what="verdict"))
    assert prompts_from_messages(messages) == ("p", "u")


def test_reask_message_quotes_and_truncates_the_error():
    short = reask_message("no dict found in the answer", what="verdict")
    assert isinstance(short, HumanMessage)
    assert "no dict found in the answer" in short.content
    assert "previous_step_success" in short.content
    long = reask_message("x" * 2000, what="plan")
    assert "x" * 497 + "..." in long.content
    assert "x" * 501 not in long.content
    assert "execution_plan" in long.content
