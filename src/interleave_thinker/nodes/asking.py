"""Ask a chat model until its reply parses, re-asking a bounded number of times."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel

from interleave_thinker.errors import ModelOutputError
from interleave_thinker.prompts.parsing import OutputParseError
from interleave_thinker.prompts.templates import reask_message
from interleave_thinker.state import OutputMode

T = TypeVar("T")

ChatRunnable = Runnable[LanguageModelInput, Any]

STRUCTURED_REPLY_NOTE = (
    "Reply with the JSON object of your answer alone: no <think> or <answer> tags, no prose."
)


def for_output_mode(
    model: ChatRunnable,
    messages: Sequence[BaseMessage],
    mode: OutputMode,
    schema: type[BaseModel],
    name: str,
) -> tuple[ChatRunnable, list[BaseMessage]]:
    """The model and messages to use: in structured mode, bound to a JSON schema.

    ``response_format`` is the OpenAI convention, which vLLM, ChatOpenAI and our transformers
    model all enforce by constrained decoding; the reply is then plain JSON, which the same
    tolerant parser reads.
    """
    if mode == "tagged":
        return model, list(messages)
    if getattr(model, "_llm_type", "") == "openai-chat":
        # OpenAI's strict mode wants every field required; vLLM accepts that form too.
        from interleave_thinker.models.served import structured_binding

        bound = structured_binding(model, schema, name)
    else:
        bound = model.bind(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema.model_json_schema()},
            }
        )
    return bound, [*messages, HumanMessage(STRUCTURED_REPLY_NOTE)]


async def ask_until_parsed(
    model: ChatRunnable,
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
