"""Bounded backend calls: which failures are transient, how the graph retries them, per-call timeouts."""

from __future__ import annotations

import asyncio
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
# The openai SDK's own errors for the same conditions, named so the SDK stays optional.
_TRANSIENT_OPENAI_ERRORS = {
    "APIConnectionError",
    "APITimeoutError",
    "RateLimitError",
    "InternalServerError",
}


def is_transient(error: BaseException) -> bool:
    """Whether a failed node deserves another try after a backoff."""
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    kind = type(error)
    return kind.__module__.startswith("openai") and kind.__name__ in _TRANSIENT_OPENAI_ERRORS


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
