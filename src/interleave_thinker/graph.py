"""Wiring: planner -> [review_plan] -> generator -> critic -> [review_forced] -> (generator | compose)."""

from __future__ import annotations

from typing import Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from interleave_thinker.context import Context
from interleave_thinker.nodes import retrying
from interleave_thinker.nodes.compose import compose_document
from interleave_thinker.nodes.critic import judge_attempts
from interleave_thinker.nodes.generator import generate_images
from interleave_thinker.nodes.planner import plan_trajectory
from interleave_thinker.nodes.retrying import MODEL_RETRY, TRANSIENT_ERRORS, is_transient
from interleave_thinker.nodes.review import review_forced, review_plan
from interleave_thinker.nodes.scheduling import calls_left, ready_steps
from interleave_thinker.state import TrajectoryState

GRAPH_NAME = "interleave_thinker"
# Re-exported: the retry rules live beside the nodes that name them in their messages.
__all__ = ["GRAPH_NAME", "MODEL_RETRY", "TRANSIENT_ERRORS", "build_graph", "is_transient"]


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


def build_graph(
    *, checkpointer: BaseCheckpointSaver | None = None
) -> CompiledStateGraph[TrajectoryState, Context]:
    """The compiled trajectory graph; pass a checkpointer to make runs resumable."""
    builder = StateGraph(TrajectoryState, context_schema=Context)
    # Transient failures (overload, lost connections, calls past their timeout) are retried
    # with exponential backoff; the nodes re-ask unreadable output themselves.
    policy = retrying.MODEL_RETRY
    builder.add_node("planner", plan_trajectory, retry_policy=policy)
    builder.add_node("generator", generate_images, retry_policy=policy)
    builder.add_node("critic", judge_attempts, retry_policy=policy)
    builder.add_node("review_plan", review_plan)
    builder.add_node("review_forced", review_forced)
    builder.add_node("compose", compose_document)
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
    return builder.compile(checkpointer=checkpointer, name=GRAPH_NAME)
