"""Bounded backend calls: which failures are transient, how the graph retries them, per-call timeouts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy

from interleave_thinker.errors import (
    ModelTimeoutError,
    TransientGeneratorError,
    TransientModelError,
)

T = TypeVar("T")

# Network hiccups, overloaded servers and hung calls deserve another try with backoff; bad
# output does not (it is re-asked inside the node) and neither do permanent errors.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    TransientGeneratorError,
    TransientModelError,
    ModelTimeoutError,
    ConnectionError,
    TimeoutError,
)
# HTTP statuses worth another try, as the openai SDK retries them itself: request timeout, lock
# conflict, rate limit, and every server error (vLLM answers 503 while it starts or is overloaded).
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


def is_transient(error: BaseException) -> bool:
    """Whether a failed node deserves another try after a backoff."""
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    return _openai_transient(error) or _langchain_retryable(error)


def transient_cause(error: BaseException) -> str:
    """What a transient failure says about the server, in a few words for an error message."""
    status = _openai_status(error)
    if status == 429:
        return "was overloaded (429 Too Many Requests)"
    if status is not None:
        return f"was overloaded or failing (HTTP {status})"
    if isinstance(error, TimeoutError) or _openai_is(error, "APITimeoutError"):
        return "did not answer in time"
    return "could not be reached"


def _openai_transient(error: BaseException) -> bool:
    # langchain-openai re-raises the SDK's errors as its own subclasses of them
    # (OpenAIConnectionError, OpenAIAPIError, ...), so only isinstance on the SDK's classes
    # holds for every version. APITimeoutError is an APIConnectionError.
    if _openai_is(error, "APIConnectionError"):
        return True
    status = _openai_status(error)
    return status is not None and (status in _TRANSIENT_STATUSES or status >= 500)


def _openai_is(error: BaseException, name: str) -> bool:
    # The SDK stays optional: an error of one of its classes means it is imported already.
    openai = sys.modules.get("openai")
    kind = getattr(openai, name, None) if openai is not None else None
    return isinstance(kind, type) and isinstance(error, kind)


def _openai_status(error: BaseException) -> int | None:
    """The HTTP status of an openai SDK error that carries one (APIStatusError), else None."""
    if not _openai_is(error, "APIStatusError"):
        return None
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def _langchain_retryable(error: BaseException) -> bool:
    # langchain-core's provider-neutral model errors (rate limit, server error, connection,
    # timeout) say themselves whether another try may succeed; other providers' packages raise
    # them too. Older langchain-core versions have no ModelError.
    model_error = getattr(sys.modules.get("langchain_core.exceptions"), "ModelError", None)
    return (
        isinstance(model_error, type)
        and isinstance(error, model_error)
        and getattr(error, "is_retryable", False) is True
    )


# Sleeps of about 1, 2 and 4 s (each plus up to 1 s of jitter) between four tries: long enough
# for a restarting server or a passing overload, short next to a generator call. Read at call
# time by build_graph and the nodes, so tests may swap in a faster policy.
MODEL_RETRY = RetryPolicy(
    max_attempts=4, initial_interval=1.0, backoff_factor=2.0, jitter=True, retry_on=is_transient
)


def try_label(runtime: Runtime[Any]) -> str:
    """'try 2 of 4': which of the retry policy's tries of this node is running."""
    info = runtime.execution_info
    attempt = info.node_attempt if info is not None and info.node_attempt else 1
    return f"try {attempt} of {MODEL_RETRY.max_attempts}"


async def bounded(
    call: Awaitable[T], seconds: float | None, on_timeout: Callable[[], Exception]
) -> T:
    """Await ``call``, raising ``on_timeout()`` if it takes longer than ``seconds`` (None: no limit).

    A call running in a worker thread cannot be stopped: the thread finishes in the background,
    but the node no longer waits for it.
    """
    if seconds is None:
        return await call
    try:
        async with asyncio.timeout(seconds) as scope:
            return await call
    except TimeoutError:
        # Only our own deadline is a timeout of the call; a TimeoutError the call raised itself
        # goes on as it is (it is transient too).
        if scope.expired():
            raise on_timeout() from None
        raise
