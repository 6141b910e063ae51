"""Planner and critic prompts, message builders, and parsers for the replies."""

from interleave_thinker.prompts.parsing import (
    OutputParseError,
    parse_answer_dict,
    parse_plan,
    parse_verdict,
    split_think_answer,
)
from interleave_thinker.prompts.templates import (
    CRITIC_PROMPT,
    PLANNER_GUIDANCE_PROMPT,
    PLANNER_NARRATIVE_PROMPT,
    critic_messages,
    planner_messages,
    planner_prompt,
    prompts_from_messages,
    reask_message,
    request_from_messages,
)

__all__ = [
    "CRITIC_PROMPT",
    "PLANNER_GUIDANCE_PROMPT",
    "PLANNER_NARRATIVE_PROMPT",
    "OutputParseError",
    "critic_messages",
    "parse_answer_dict",
    "parse_plan",
    "parse_verdict",
    "planner_messages",
    "planner_prompt",
    "prompts_from_messages",
    "reask_message",
    "request_from_messages",
    "split_think_answer",
]
