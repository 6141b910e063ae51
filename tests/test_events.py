"""Streaming: the graph's custom stream carries typed progress events, beside LangGraph's updates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.context import Backends
from interleave_thinker.events import (
    DocumentReady,
    ImageReady,
    PlanReady,
    StepCommitted,
    StepStarted,
    ThreadStarted,
    Verdict,
    parse_event,
)
from interleave_thinker.graph import build_graph
from interleave_thinker.runner import arun, make_settings
from interleave_thinker.state import Request, RunOptions
from interleave_thinker.workspace import Workspace

REQUEST = "A kite rises. Why does it fly? The kite lands."


async def test_astream_updates_and_custom_give_typed_events(tmp_path: Path,
                                                            test_backends: Backends) -> None:
    workspace = Workspace.open(tmp_path, "memory://events")
    settings = make_settings("custom", test_backends, RunOptions(width=32, height=32))
    state = {"request": Request(text=REQUEST), "settings": settings, "plan": None,
             "progress": (), "generator_calls": 0, "document": None}
    config = {"configurable": {"thread_id": "events"}}
    nodes: list[str] = []
    events = []
    async with open_checkpointer(workspace.checkpointer_url) as saver:
        graph = build_graph(checkpointer=saver)
        async for mode, chunk in graph.astream(state, config, context=workspace.context(
                test_backends), stream_mode=["updates", "custom"], durability="sync"):
            if mode == "updates":
                nodes.extend(chunk)
            else:
                events.append(parse_event(chunk))
    assert nodes[0] == "planner" and nodes[-1] == "compose"
    assert {"generator", "critic"} <= set(nodes)
    assert isinstance(events[0], PlanReady) and isinstance(events[-1], DocumentReady)
    committed = [e for e in events if isinstance(e, StepCommitted)]
    # Every step is committed exactly once; the text-only step as soon as it is planned.
    assert Counter(e.step for e in committed) == {1: 1, 2: 1, 3: 1}
    assert committed[0].step == 2 and committed[0].status == "text" and committed[0].image is None
    started = [e for e in events if isinstance(e, StepStarted)]
    images = [e for e in events if isinstance(e, ImageReady)]
    verdicts = [e for e in events if isinstance(e, Verdict)]
    assert len(started) == len(images) == len(verdicts) >= 2
    assert all(e.total == 3 for e in started)


async def test_runner_hands_typed_events_to_the_handler(tmp_path: Path,
                                                        test_backends: Backends) -> None:
    seen = []
    await arun(REQUEST, backends=test_backends, options=RunOptions(width=32, height=32),
               run_dir=tmp_path, checkpointer="memory://handler", on_event=seen.append)
    assert isinstance(seen[0], ThreadStarted) and not seen[0].resumed
    kinds = [type(event).__name__ for event in seen]
    assert kinds.count("StepCommitted") == 3 and kinds[-1] == "DocumentReady"


def test_foreign_chunks_are_not_events() -> None:
    assert parse_event({"event": "something else"}) is None
    assert parse_event({"progress": 1}) is None
