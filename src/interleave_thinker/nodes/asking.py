"""Ask a chat model until its reply parses, re-asking a bounded number of times."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig

from interleave_thinker.errors import ModelOutputError
from interleave_thinker.prompts.parsing import OutputParseError
from interleave_thinker.prompts.templates import reask_message

T = TypeVar("T")


async def ask_until_parsed(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    parse: Callable[[str], T],
    *,
    what: Literal["plan", "verdict"],
    max_reasks: int,
    where: str,
    config: RunnableConfig | None = None,
) -> tuple[T, str]:
    """Return (parsed value, raw reply text); after ``max_reasks`` failed re-asks raise."""
    history = list(messages)
    error: OutputParseError | None = None
    for _ in range(max_reasks + 1):
        reply = await model.ainvoke(history, config=config)
        text = reply.text if isinstance(reply, BaseMessage) else str(reply)
        try:
            return parse(text), text
        except OutputParseError as exc:
            error = exc
            # Show the model its own reply and what was wrong with it, then ask again.
            history = [*history, AIMessage(text), reask_message(str(exc), what=what)]
    raise ModelOutputError(
        f"{where}: the {what} could not be read after {max_reasks + 1} tries: {error}",
        hint="check that the model prints <think>...</think><answer>{...}</answer>; "
        "raise --max-reasks or use a stronger model",
    )
