"""Long trajectories: the graph's recursion limit follows the budget, so no allowed trajectory
stops at LangGraph's default of 25 supersteps."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphRecursionError

from conftest import RecordingGenerator, scripted
from interleave_thinker import runner, server
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.context import Backends
from interleave_thinker.graph import recursion_limit
from interleave_thinker.prompts.packs import InterleavePack
from interleave_thinker.runner import arun
from interleave_thinker.state import Budget, RunOptions, RunSettings
from interleave_thinker.workspace import RUN_DIR_ENV
from test_graph import plan_reply, step, verdict_reply

LANGGRAPH_DEFAULT_LIMIT = 25
STEPS = 10
# Each step is rejected twice and accepted at its third attempt: 30 generator/critic passes.
# Each step edits the previous one's image (the default sources), so each pass draws one image.
CHAIN = [step(n, f"frame {n}") for n in range(1, STEPS + 1)]
VERDICTS = [
    reply
    for n in range(1, STEPS + 1)
    for reply in (verdict_reply(False, f"frame {n}, sharper"), verdict_reply(False, f"frame {n}, brighter"),
                  verdict_reply(True))
]


def settings(**options: Any) -> RunSettings:
    return RunSettings(profile="test", planner="p", critic="c", generator="g", options=RunOptions(**options))


def worst_case_supersteps(passes: int) -> int:
    # planner, review_plan, then generator + critic + review_forced per pass, then compose.
    return 2 + 3 * passes + 1


def test_the_limit_covers_every_pass_the_budget_allows() -> None:
    # A 12-step plan with 3 attempts each: 36 passes at most.
    capped = settings(max_steps=12, budget=Budget(max_attempts=3))
    assert recursion_limit(capped) >= worst_case_supersteps(36) > LANGGRAPH_DEFAULT_LIMIT
    # No step cap: the call budget bounds the passes (each draws at least one image).
    uncapped = settings(budget=Budget(max_calls=200, max_attempts=5))
    assert recursion_limit(uncapped) >= worst_case_supersteps(200)
    # The smaller of the two bounds holds.
    assert recursion_limit(settings(max_steps=2, budget=Budget(max_calls=1000, max_attempts=2))) >= (
        worst_case_supersteps(4)
    )
    assert recursion_limit(settings(max_steps=2, budget=Budget(max_calls=1000, max_attempts=2))) < 100
    # Even the smallest budget gets at least LangGraph's default.
    assert recursion_limit(settings(max_steps=1, budget=Budget(max_calls=1, max_attempts=1))) >= (
        LANGGRAPH_DEFAULT_LIMIT
    )


def _critic() -> Any:
    return scripted(list(VERDICTS))


def _planner() -> Any:
    return scripted([plan_reply(CHAIN)])


async def test_a_trajectory_longer_than_25_supersteps_completes(run_dir: Path) -> None:
    generator = RecordingGenerator()
    options = RunOptions(width=64, height=64, max_steps=STEPS, budget=Budget(max_attempts=3))
    result = await arun(
        "a flip book", backends=Backends(planner=_planner(), critic=_critic(), generator=generator),
        options=options, run_dir=run_dir, checkpointer="memory://" + uuid.uuid4().hex, thread_id="long",
    )
    assert [s.status for s in result.document.steps] == ["accepted"] * STEPS
    assert [len(s.attempts) for s in result.document.steps] == [3] * STEPS
    assert len(generator.jobs) == 3 * STEPS
    # 1 planner + 30 * (generator + critic) + compose supersteps: far past LangGraph's default.
    assert 1 + 2 * 3 * STEPS + 1 > LANGGRAPH_DEFAULT_LIMIT


async def test_without_the_limit_the_same_trajectory_would_stop_at_25(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def langgraph_default(*_: Any) -> int:
        return LANGGRAPH_DEFAULT_LIMIT

    monkeypatch.setattr(runner, "thread_recursion_limit", langgraph_default)
    with pytest.raises(GraphRecursionError):
        await arun(
            "a flip book",
            backends=Backends(planner=_planner(), critic=_critic(), generator=RecordingGenerator()),
            options=RunOptions(width=64, height=64, max_steps=STEPS, budget=Budget(max_attempts=3)),
            run_dir=run_dir, checkpointer="memory://" + uuid.uuid4().hex,
        )


async def test_a_resumed_long_trajectory_gets_the_limit_from_its_checkpoint(run_dir: Path) -> None:
    # The planner fails once (a permanent error), so the whole trajectory runs in the resume,
    # whose input is None: the limit must come from the thread's stored settings.
    calls = {"n": 0}

    def planner_reply(_: list[BaseMessage]) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("planner crashed")
        return plan_reply(CHAIN)

    ckpt = "memory://" + uuid.uuid4().hex
    planner = scripted(planner_reply)
    critic = _critic()
    options = RunOptions(width=64, height=64, max_steps=STEPS, budget=Budget(max_attempts=3))
    with pytest.raises(Exception, match="planner crashed"):
        await arun(
            "a flip book",
            backends=Backends(planner=planner, critic=critic, generator=RecordingGenerator()),
            options=options, run_dir=run_dir, checkpointer=ckpt, thread_id="long",
        )
    result = await runner.aresume(
        "long", backends=Backends(planner=planner, critic=critic, generator=RecordingGenerator()),
        run_dir=run_dir, checkpointer=ckpt,
    )
    assert [len(s.attempts) for s in result.document.steps] == [3] * STEPS


async def test_the_server_graph_runs_a_long_trajectory(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    backends = Backends(planner=_planner(), critic=_critic(), generator=RecordingGenerator())
    monkeypatch.setattr(server, "_MODELS", {("test", False): (backends, InterleavePack())})
    served = server.graph.copy(update={"checkpointer": InMemorySaver(serde=make_serializer())})
    out = await served.ainvoke(
        {"text": "a flip book", "profile": "test",
         "options": {"width": 64, "height": 64, "max_steps": STEPS, "max_attempts": 3}},
        # What the server passes by default.
        {"configurable": {"thread_id": str(uuid.uuid4())}, "recursion_limit": LANGGRAPH_DEFAULT_LIMIT},
    )
    assert [len(s.attempts) for s in out["document"].steps] == [3] * STEPS
