"""Wiring: planner -> [review_plan] -> generator -> critic -> [review_forced] -> (generator | compose)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy

from interleave_thinker.context import Context
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.nodes import retrying
from interleave_thinker.nodes.compose import compose_document
from interleave_thinker.nodes.critic import judge_attempts
from interleave_thinker.nodes.generator import generate_images
from interleave_thinker.nodes.planner import plan_trajectory
from interleave_thinker.nodes.retrying import MODEL_RETRY, TRANSIENT_ERRORS, is_transient
from interleave_thinker.nodes.review import review_forced, review_plan
from interleave_thinker.nodes.scheduling import calls_left, ready_steps
from interleave_thinker.state import Request, RunSettings, TrajectoryState

GRAPH_NAME = "interleave_thinker"
# Re-exported: the retry rules live beside the nodes that name them in their messages.
__all__ = [
    "GRAPH_NAME",
    "MODEL_RETRY",
    "TRANSIENT_ERRORS",
    "build_graph",
    "check_graph_input",
    "is_transient",
    "recursion_limit",
    "thread_recursion_limit",
]

# Supersteps outside the generator -> critic -> review_forced passes (planner, review_plan,
# compose), and spare ones: a limit set too high costs nothing, one set too low stops a run.
_FIXED_SUPERSTEPS = 3
_SPARE_SUPERSTEPS = 12
# LangGraph's own default: the least we set, and what a thread without settings gets.
_DEFAULT_RECURSION_LIMIT = 25


def _next_after_planning_or_critique(state: TrajectoryState) -> Literal["generator", "compose"]:
    plan = state.get("plan")
    budget = state["settings"].options.budget
    if plan is None or calls_left(budget, state.get("generator_calls", 0)) == 0:
        return "compose"
    return "generator" if ready_steps(plan, state["progress"]) else "compose"


def _next_after_critique(
    state: TrajectoryState,
) -> Literal["review_forced", "generator", "compose"]:
    if any(item.awaiting_review for item in state["progress"]):
        return "review_forced"
    return _next_after_planning_or_critique(state)


def _next_after_planning(
    state: TrajectoryState,
) -> Literal["review_plan", "generator", "compose"]:
    if state.get("plan") is not None and state["settings"].options.review_plan:
        return "review_plan"
    return _next_after_planning_or_critique(state)


def recursion_limit(settings: RunSettings) -> int:
    """Supersteps enough for every trajectory ``settings`` allow (LangGraph's ``recursion_limit``).

    LangGraph stops a run after 25 supersteps unless told otherwise; a long trajectory needs
    more. Each node runs in a superstep of its own (retries stay in theirs): the planner, the
    optional plan review, then passes of generator, critic and the optional forced-step review,
    then compose. Every pass makes at least one attempt. Attempts that repeat an earlier request
    of their step are free (``generator_calls`` counts backend draws), but a step's first
    attempt is always a draw (or a ledger reuse, counted as the draw it was), and a step has at
    most ``max_attempts`` attempts: so at most ``max_calls`` steps are attempted and there are at
    most ``max_calls * max_attempts`` passes, and at most ``max_steps * max_attempts`` when the
    plan's length is capped. The graph cannot loop without attempts, so the limit only ever
    stops a bug.
    """
    options = settings.options
    budget = options.budget
    passes = budget.max_calls * budget.max_attempts
    if options.max_steps is not None:
        passes = min(passes, options.max_steps * budget.max_attempts)
    # Never below LangGraph's default: a small budget keeps the limit it always had.
    return max(_DEFAULT_RECURSION_LIMIT, _FIXED_SUPERSTEPS + 3 * passes + _SPARE_SUPERSTEPS)


async def thread_recursion_limit(
    graph: CompiledStateGraph[TrajectoryState, Context],
    graph_input: Any,
    config: RunnableConfig,
) -> int:
    """:func:`recursion_limit` for a run of ``graph`` on the thread in ``config``.

    The settings come from ``graph_input`` when it starts the thread (a state with
    ``settings``), else from the thread's checkpoint (a resume: None or a ``Command``).
    """
    settings = graph_input.get("settings") if isinstance(graph_input, dict) else None
    if settings is None:
        snapshot = await graph.aget_state(config)
        settings = snapshot.values.get("settings")
    if not isinstance(settings, RunSettings):
        return _DEFAULT_RECURSION_LIMIT
    return recursion_limit(settings)


_INPUT_HINT = (
    "build the input with interleave_thinker.make_input(text, context=...) and pass "
    "context=interleave_thinker.make_context(...) to ainvoke/astream"
)


def check_graph_input(state: Any, context: Any) -> None:
    """Refuse, before any model is asked, a run of the graph without its context or with an
    input that lacks a field every node reads: a ConfigurationError naming what is missing."""
    if context is None:
        raise ConfigurationError(
            "the trajectory graph was run without its context (models, image store, ledgers)",
            hint=_INPUT_HINT,
        )
    if not isinstance(context, Context):
        raise ConfigurationError(
            f"the trajectory graph's context is a {type(context).__name__}, not an "
            "interleave_thinker.Context",
            hint=_INPUT_HINT,
        )
    for field, kind in (("request", Request), ("settings", RunSettings)):
        value = state.get(field) if isinstance(state, dict) else None
        if value is None:
            raise ConfigurationError(
                f"the trajectory graph's input has no {field!r} field", hint=_INPUT_HINT
            )
        if not isinstance(value, kind):
            raise ConfigurationError(
                f"the trajectory graph's input field {field!r} is a {type(value).__name__}, "
                f"not a {kind.__name__}",
                hint=_INPUT_HINT,
            )


Node = Callable[[TrajectoryState, Runtime[Context]], Awaitable[dict[str, Any]]]


def _checked(node: Node) -> Node:
    """``node``, first checking its input and context (see :func:`check_graph_input`)."""

    @functools.wraps(node)
    async def checked(state: TrajectoryState, runtime: Runtime[Context]) -> dict[str, Any]:
        check_graph_input(state, runtime.context)
        return await node(state, runtime)

    return checked


def build_graph(
    *, checkpointer: BaseCheckpointSaver | None = None
) -> CompiledStateGraph[TrajectoryState, Context]:
    """The compiled trajectory graph; pass a checkpointer to make runs resumable."""
    # Compiling costs about 9 ms (LangGraph inspects every node), and every run opens a graph on
    # its own saver: the graph is compiled once per process and copied with the saver, as
    # LangGraph servers attach theirs. The copy drops the msgpack allowlist that compile()
    # collected (used with LANGGRAPH_STRICT_MSGPACK), so it is carried over.
    compiled = _compiled_graph(retrying.MODEL_RETRY)
    graph = compiled.copy(update={"checkpointer": checkpointer})
    graph._serde_allowlist = compiled._serde_allowlist
    return graph


@functools.cache
def _compiled_graph(policy: RetryPolicy) -> CompiledStateGraph[TrajectoryState, Context]:
    builder = StateGraph(TrajectoryState, context_schema=Context)
    # Transient failures (overload, lost connections, calls past their timeout) are retried
    # with exponential backoff (``policy``); the nodes re-ask unreadable output themselves.
    builder.add_node("planner", _checked(plan_trajectory), retry_policy=policy)
    builder.add_node("generator", _checked(generate_images), retry_policy=policy)
    builder.add_node("critic", _checked(judge_attempts), retry_policy=policy)
    builder.add_node("review_plan", _checked(review_plan))
    builder.add_node("review_forced", _checked(review_forced))
    builder.add_node("compose", _checked(compose_document))
    builder.add_edge(START, "planner")
    builder.add_conditional_edges(
        "planner", _next_after_planning, ["review_plan", "generator", "compose"]
    )
    builder.add_conditional_edges(
        "review_plan", _next_after_planning_or_critique, ["generator", "compose"]
    )
    builder.add_edge("generator", "critic")
    builder.add_conditional_edges(
        "critic", _next_after_critique, ["review_forced", "generator", "compose"]
    )
    builder.add_conditional_edges(
        "review_forced", _next_after_planning_or_critique, ["generator", "compose"]
    )
    builder.add_edge("compose", END)
    return builder.compile(name=GRAPH_NAME)
