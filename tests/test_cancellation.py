"""Cancelling a run (Ctrl-C, a caller's timeout): the saver closes only after its writes in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from interleave_thinker.checkpoints.sqlite_saver import OneTripSqliteSaver
from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.generators.stand_in import StandInImageGenerator
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions

WRITE_SECONDS = 0.3


class SlowGenerator(StandInImageGenerator):
    """Takes long enough per call that a cancel lands inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.calls += 1
        await asyncio.sleep(0.5)
        return await super().agenerate(jobs)


async def test_cancel_waits_for_checkpoint_writes_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    finished: list[int] = []
    original = OneTripSqliteSaver.aput_writes

    # Slow writes keep LangGraph's background writes of the previous step running while the
    # next generator call starts.
    async def aput_writes(self: OneTripSqliteSaver, *args: Any, **kwargs: Any) -> None:
        started.append(len(started))
        await asyncio.sleep(WRITE_SECONDS)
        await original(self, *args, **kwargs)
        finished.append(len(finished))

    monkeypatch.setattr(OneTripSqliteSaver, "aput_writes", aput_writes)
    generator = SlowGenerator()
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=generator)
    options = RunOptions(width=32, height=32)
    task = asyncio.create_task(
        arun("A cat. A dog. A bird.", backends=backends, options=options, run_dir=tmp_path, thread_id="t")
    )
    while generator.calls < 2:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(finished) < len(started), "no write was in flight: the test no longer tests anything"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every write that had started finished before the saver was closed.
    assert len(finished) == len(started)

    monkeypatch.undo()
    result = await aresume("t", backends=backends, run_dir=tmp_path)
    assert [step.status for step in result.document.steps] == ["accepted"] * 3


async def test_a_node_cancelled_before_its_route_is_run_again_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is cancelled (as Ctrl-C cancels a batch's runs) between the planner's state update
    and its conditional edge. LangGraph saves the update with the error; a plain resume would
    take it as the planner's output and end the thread with no document."""
    import interleave_thinker.graph as graph_module

    route = graph_module._next_after_planning
    runs: list[asyncio.Task[Any]] = []

    async def cancelled_while_routing(state: Any) -> Any:
        if len(runs) == 1:
            runs[0].cancel()
            await asyncio.sleep(0)  # where the cancel lands: inside the route, after the update
        return route(state)

    # The graph is compiled once per process: build one with this router, then the usual one.
    graph_module._compiled_graph.cache_clear()
    monkeypatch.setattr(graph_module, "_next_after_planning", cancelled_while_routing)
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                        generator=StandInImageGenerator())
    options = RunOptions(width=32, height=32)
    try:
        runs.append(asyncio.create_task(
            arun("A cat. A dog.", backends=backends, options=options, run_dir=tmp_path,
                 thread_id="t")
        ))
        with pytest.raises(asyncio.CancelledError):
            await runs[0]
        runs.append(runs[0])  # cancel once only
        result = await aresume("t", backends=backends, run_dir=tmp_path)
    finally:
        graph_module._compiled_graph.cache_clear()
    assert [step.status for step in result.document.steps] == ["accepted"] * 2
