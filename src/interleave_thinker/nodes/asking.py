"""Ask a chat model until its reply parses, re-asking a bounded number of times."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel

from interleave_thinker.errors import (
    InterleaveError,
    ModelCallError,
    ModelOutputError,
    ModelTimeoutError,
    TransientModelError,
)
from interleave_thinker.nodes.retrying import bounded, is_transient, transient_cause
from interleave_thinker.prompts.parsing import OutputParseError
from interleave_thinker.prompts.templates import reask_message
from interleave_thinker.state import OutputMode

T = TypeVar("T")

ChatRunnable = Runnable[LanguageModelInput, Any]

# A re-ask shows the model its own reply; an enormous one is cut to its two ends, which say
# enough (a wrong start, a cut-off end) without filling the model's context.
ECHO_LIMIT = 4000
_PARSE_IN_THREAD_CHARS = 100_000

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
    reask: Callable[..., BaseMessage | None] = reask_message,
    where: str,
    config: RunnableConfig | None = None,
    identity: str = "the model",
    timeout: float | None = None,
    tries: str = "",
) -> tuple[T, str]:
    """Return (parsed value, raw reply text); after ``max_reasks`` failed re-asks raise.

    ``reask(error, what=...)`` gives the message that asks again after an unreadable reply (the
    prompt pack's), or None to sample again from the same input.

    Each reply may take ``timeout`` seconds; a slower one raises ModelTimeoutError and a lost
    connection TransientModelError, both retried by the graph. ``tries`` ("try 2 of 4") and
    ``identity`` go into those messages.
    """
    history = list(messages)
    error: OutputParseError | None = None
    for _ in range(max_reasks + 1):
        text = ""
        try:
            text = _reply_text(await _reply(model, history, config, where, identity, timeout, tries))
            if len(text) < _PARSE_IN_THREAD_CHARS:
                return parse(text), text
            # Parsing is linear but a megabyte takes about a second: off the event loop, which
            # may be serving other trajectories.
            return await asyncio.to_thread(parse, text), text
        except OutputParseError as exc:
            error = exc
            if isinstance(exc, CutReply):
                text = exc.text
            complaint = reask(str(exc), what=what)
            if complaint is not None:
                # Show the model its own reply and what was wrong with it, then ask again.
                history = [*history, AIMessage(echoed(text)), complaint]
            # Otherwise (a pack whose models were trained on one turn) sample again from the
            # same input, as the official scripts do.
    if isinstance(error, CutReply):
        hint = (
            "the replies stopped at the token limit: raise max_new_tokens "
            "(INTERLEAVE_MAX_NEW_TOKENS, or the server's limit), then `interleave resume THREAD`"
        )
    else:
        hint = (
            "check that the model prints <think>...</think><answer>{...}</answer>; "
            "raise --max-reasks or use a stronger model"
        )
    raise ModelOutputError(
        f"{where}: the {what} could not be read after {max_reasks + 1} tries: {error}", hint=hint
    )


class CutReply(OutputParseError):
    """A reply the server stopped at its token limit before the answer was complete.

    Unreadable like any reply that does not parse, so it is re-asked (showing the model the
    part it wrote), not reported as a failed call.
    """

    def __init__(self, text: str, tokens: int | None) -> None:
        length = f" ({tokens:,} tokens)" if tokens else ""
        super().__init__(
            f"the reply stopped at the token limit{length} before the answer was complete: "
            "give a shorter answer"
        )
        self.text = text


async def _reply(
    model: ChatRunnable,
    history: list[BaseMessage],
    config: RunnableConfig | None,
    where: str,
    identity: str,
    timeout: float | None,
    tries: str,
) -> Any:
    label = f" ({tries})" if tries else ""

    def too_slow() -> Exception:
        return ModelTimeoutError(
            f"{where}: {identity} did not reply within {timeout:g} s{label}",
            hint="the model may be hung or overloaded: check it, or allow more time with "
            "--model-timeout SECONDS (INTERLEAVE_MODEL_TIMEOUT), then `interleave resume THREAD`",
        )

    try:
        return await bounded(model.ainvoke(history, config=config), timeout, too_slow)
    except InterleaveError:
        raise
    except Exception as exc:
        cut = _cut_reply(exc)
        if cut is None:
            raise _call_error(exc, where, identity, label) from exc
        raise cut from exc


def _call_error(exc: Exception, where: str, identity: str, label: str) -> Exception:
    """The error to raise for a failed model call: one line with a hint that fits the cause."""
    if isinstance(exc, OutputParserException):
        # The model's own output check failed (an in-process JSON reply cut off by its token
        # limit): asking again would hit the same limit, so stop with the model's message.
        return ModelOutputError(
            f"{where}: {identity}: {' '.join(str(exc).split())[:500]}",
            hint="see the message; raise max_new_tokens or use tagged output",
        )
    if not is_transient(exc):
        # A refused key, an unknown model name, a request too long for the server: say which
        # call failed and how, in one line (the original stays chained for debugging).
        return ModelCallError(
            f"{where}: {identity} failed{label}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            hint="check the model's URL, name and API key (or the model itself), "
            "then `interleave resume THREAD`",
        )
    # Still transient (the graph retries it, and the openai SDK retried it first), but named:
    # the last try's error is what the user reads.
    cause = transient_cause(exc)
    return TransientModelError(
        f"{where}: {identity} {cause}{label}: "
        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
        hint=f"the model's server {cause} on every try; once it answers again, continue with "
        "`interleave resume THREAD` (finished steps are kept)",
    )


def _cut_reply(exc: Exception) -> CutReply | None:
    """A structured reply the openai SDK refused as cut at the token limit, as an unreadable reply."""
    # The SDK stays optional: one of its errors means it is imported already.
    openai = sys.modules.get("openai")
    length_error = getattr(openai, "LengthFinishReasonError", None) if openai is not None else None
    if not (isinstance(length_error, type) and isinstance(exc, length_error)):
        return None
    completion = getattr(exc, "completion", None)
    choices = getattr(completion, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    content = getattr(message, "content", None)
    usage = getattr(completion, "usage", None)
    tokens = getattr(usage, "completion_tokens", None)
    return CutReply(
        content if isinstance(content, str) else "", tokens if isinstance(tokens, int) else None
    )


def _reply_text(reply: Any) -> str:
    if isinstance(reply, BaseMessage):
        return reply.text
    # A plain string reply (a custom runnable) is used as it is; anything else is shown to the
    # parser as text so that it is refused with a message instead of crashing it.
    return reply if isinstance(reply, str) else str(reply)


def echoed(text: str) -> str:
    """The reply as a re-ask quotes it back: whole when short, else its two ends."""
    if len(text) <= ECHO_LIMIT:
        return text
    half = ECHO_LIMIT // 2
    return f"{text[:half]}\n[... {len(text) - ECHO_LIMIT:,} characters left out ...]\n{text[-half:]}"
