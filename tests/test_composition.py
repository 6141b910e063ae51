"""The pipeline composed into other programs: as an agent's tool and as a subgraph node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict
from uuid import UUID

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from PIL import Image

from conftest import RecordingGenerator, scripted
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.context import Backends, Context
from interleave_thinker.errors import ModelCallError
from interleave_thinker.events import parse_event
from interleave_thinker.graph import build_graph
from interleave_thinker.inspect import aload_document
from interleave_thinker.runner import make_settings, trajectory_input
from interleave_thinker.state import Document, Request, RunOptions, TrajectoryState
from interleave_thinker.tools.agent_tool import (
    InterleaveTool,
    create_interleave_tool,
    thread_id_for_call,
)
from interleave_thinker.workspace import Workspace, validate_thread_id
from test_graph import plan_reply, step, verdict_reply

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_with_interleave_tool.py"
STORY = "A robot wakes up. It walks to the window. It opens the curtains."


@pytest.fixture
def tiny() -> RunOptions:
    return RunOptions(width=32, height=32)


@pytest.fixture
def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


def _call(request: str, call_id: str, **args: Any) -> ToolCall:
    return ToolCall(name="interleave_document", args={"request": request, **args}, id=call_id,
                    type="tool_call")


class ToolCallingFakeModel(GenericFakeChatModel):
    """Replies with the AIMessages it is given, tool calls included; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFakeModel:
        return self


class CrashOnce:
    """A critic reply function that raises on its first call, then accepts every attempt."""

    def __init__(self) -> None:
        self.crashed = False

    def __call__(self, _: list[BaseMessage]) -> str:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("critic process died")
        return verdict_reply(True)


# --- the tool -------------------------------------------------------------------------------


class _StandardToolSetup:
    @property
    def tool_constructor(self) -> type[InterleaveTool]:
        return InterleaveTool

    @property
    def tool_constructor_params(self) -> dict:
        return {"profile": "test", "options": RunOptions(width=32, height=32),
                "run_dir": str(self.root / "runs"), "checkpointer": f"memory://{self.root}"}

    @property
    def tool_invoke_params_example(self) -> dict:
        return {"request": "A kite rises. It flies over the sea."}

    @pytest.fixture(autouse=True)
    def _root(self, tmp_path: Path) -> None:
        self.root = tmp_path


class TestInterleaveToolUnit(_StandardToolSetup, ToolsUnitTests):
    pass


class TestInterleaveToolIntegration(_StandardToolSetup, ToolsIntegrationTests):
    pass


async def test_tool_call_gives_readable_text_and_the_document_as_artifact(
    run_dir: Path, tiny: RunOptions, memory_url: str
) -> None:
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    message = await tool.ainvoke(_call(STORY, "call_a1"))
    assert isinstance(message, ToolMessage) and message.status == "success"
    document = message.artifact
    assert isinstance(document, Document) and len(document.steps) == 3
    content = message.content
    assert isinstance(content, str)
    for item in document.steps:
        assert item.image is not None
        assert f"Step {item.number}: {item.name}" in content
        assert item.text in content
        assert f"[image sha256={item.image.sha256} 32x32]" in content
    # References only: no encoded image, and short enough for any context window.
    assert "base64" not in content and "data:image" not in content and len(content) < 2000
    assert "test profile" in content  # stand-in output says so
    # The call's thread is a normal thread of the checkpointer, loadable like any other.
    thread = thread_id_for_call("call_a1", STORY, None)
    assert f"thread {thread}" in content
    assert await aload_document(thread, run_dir=run_dir, checkpointer=memory_url) == document


async def test_forced_and_text_steps_are_labelled(run_dir: Path, tiny: RunOptions,
                                                  memory_url: str) -> None:
    planner = scripted([plan_reply([step(1, "a cat"), step(2, None), step(3, "a hat")])])
    critic = scripted(lambda _: verdict_reply(False, "a cat, again"))
    backends = Backends(planner=planner, critic=critic, generator=RecordingGenerator())
    tool = InterleaveTool(backends=backends, options=tiny.with_changes(max_attempts=1),
                          run_dir=str(run_dir), checkpointer=memory_url)
    message = await tool.ainvoke(_call("a cat, a word, a hat", "call_b"))
    content = message.content
    assert "Step 1: step 1 (status: forced)" in content
    # A text-only step has no image line and no status label.
    text_step = content.split("Step 2: step 2\n", 1)[1].split("\n\n", 1)[0]
    assert "[image" not in text_step and "status" not in text_step
    assert "Step 3: step 3 (status: forced)" in content


async def test_same_call_again_returns_its_document_without_drawing(
    run_dir: Path, tiny: RunOptions, memory_url: str, test_backends: Backends
) -> None:
    tool = create_interleave_tool(backends=test_backends, options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    first = await tool.ainvoke(_call(STORY, "call_same"))
    generator = test_backends.generator
    assert isinstance(generator, RecordingGenerator)
    drawn = len(generator.jobs)
    # The sync path runs on a private loop, so it works even inside this test's loop.
    again = tool.invoke(_call(STORY, "call_same"))
    assert again.artifact == first.artifact and len(generator.jobs) == drawn
    # Another call id is another thread, drawn afresh.
    await tool.ainvoke(_call(STORY, "call_other"))
    assert len(generator.jobs) == 2 * drawn


async def test_plain_input_without_call_id_returns_text_and_starts_a_new_thread(
    run_dir: Path, tiny: RunOptions, memory_url: str
) -> None:
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    text = await tool.ainvoke({"request": "A kite rises."})
    assert isinstance(text, str) and "Step 1:" in text and "[image sha256=" in text


async def test_input_images_and_a_missing_path(run_dir: Path, tiny: RunOptions,
                                               memory_url: str, tmp_path: Path) -> None:
    photo = tmp_path / "desk.png"
    Image.new("RGB", (40, 30), "navy").save(photo)
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    message = await tool.ainvoke(_call("Tidy this desk. Add a lamp.", "call_img",
                                       images=[str(photo)]))
    assert "Input image 1: [image sha256=" in message.content and " 40x30]" in message.content
    assert message.artifact.request.mode == "guidance"
    # A wrong path is reported to the calling model, which can correct itself.
    missing = await tool.ainvoke(_call("Tidy this desk.", "call_bad", images=["nope.png"]))
    assert missing.status == "error" and "nope.png does not exist" in missing.content


def test_thread_ids_from_call_ids_are_valid_stable_and_argument_specific() -> None:
    odd = thread_id_for_call("toolu_01/ABC def:ghi" + "x" * 200, "a story", None)
    assert validate_thread_id(odd) == odd
    assert thread_id_for_call("call_1", "a story", None) == thread_id_for_call(
        "call_1", "a story", None)
    assert thread_id_for_call("call_1", "a story", None) != thread_id_for_call(
        "call_1", "another story", None)
    assert thread_id_for_call(None, "a", None) != thread_id_for_call(None, "a", None)


class RunTree(BaseCallbackHandler):
    """Records each run's name and parent, to check what nests under what in a trace."""

    def __init__(self) -> None:
        self.runs: dict[UUID, tuple[str, UUID | None]] = {}

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self.runs[run_id] = (kwargs.get("name") or "", parent_run_id)

    def on_tool_start(self, serialized: Any, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self.runs[run_id] = (f"tool:{serialized['name']}", parent_run_id)

    def ancestors(self, name: str) -> list[str]:
        run_id: UUID | None = next(r for r, (n, _) in self.runs.items() if n == name)
        names = []
        while run_id in self.runs:
            run_name, run_id = self.runs[run_id]
            names.append(run_name)
        return names


@pytest.mark.parametrize("sync", [False, True])
async def test_pipeline_runs_nest_under_the_tool_run_in_traces(
    run_dir: Path, tiny: RunOptions, memory_url: str, sync: bool
) -> None:
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    tree = RunTree()
    config: RunnableConfig = {"callbacks": [tree]}
    call = _call("A kite rises. It flies.", f"call_trace_{sync}")
    await asyncio.to_thread(tool.invoke, call, config) if sync else await tool.ainvoke(
        call, config)
    assert tree.ancestors("planner") == ["planner", "interleave_thinker", f"tool:{tool.name}"]


# --- an agent calling the tool --------------------------------------------------------------


async def test_agent_calls_the_tool_reads_the_document_and_answers(
    run_dir: Path, tiny: RunOptions, memory_url: str
) -> None:
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    model = ToolCallingFakeModel(messages=iter([
        AIMessage("", tool_calls=[_call(STORY, "call_agent")]),
        AIMessage("Your three-step robot story is ready."),
    ]))
    agent = create_agent(model, [tool], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "agent-thread"}}
    chunks = [
        chunk async for chunk in agent.astream(
            {"messages": [{"role": "user", "content": "Illustrate a robot's morning."}]},
            config, stream_mode=["custom", "values"],
        )
    ]
    messages = [value for mode, value in chunks if mode == "values"][-1]["messages"]
    tool_message = next(m for m in messages if isinstance(m, ToolMessage))
    assert messages[-1].content == "Your three-step robot story is ready."
    document = tool_message.artifact
    assert isinstance(document, Document) and "Step 3:" in tool_message.content
    # The document's thread lives in our checkpointer, independent of the agent's.
    thread = thread_id_for_call("call_agent", STORY, None)
    assert await aload_document(thread, run_dir=run_dir, checkpointer=memory_url) == document
    # Progress reaches the agent's custom stream, wrapped so callers know which call it is.
    progress = [value for mode, value in chunks if mode == "custom"]
    assert progress and all(p["tool"] == tool.name and p["thread_id"] == thread for p in progress)
    assert [parse_event(p["progress"]).event for p in progress][-1] == "document"
    # Checkpointed by the agent, the artifact comes back as plain data.
    stored = (await agent.aget_state(config)).values["messages"]
    restored = next(m for m in stored if isinstance(m, ToolMessage)).artifact
    assert Document.model_validate(restored) == document


def test_sync_agent_with_a_small_recursion_limit_streams_a_longer_trajectory(
    run_dir: Path, tiny: RunOptions, memory_url: str
) -> None:
    tool = create_interleave_tool(profile="test", options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    model = ToolCallingFakeModel(messages=iter([
        AIMessage("", tool_calls=[_call(STORY, "call_sync")]), AIMessage("Done."),
    ]))
    agent = create_agent(model, [tool])
    # The agent needs 3 supersteps, the trajectory 8: the caller's limit is for its own loop.
    chunks = list(agent.stream({"messages": [{"role": "user", "content": "go"}]},
                               {"recursion_limit": 5}, stream_mode=["custom", "values"]))
    assert chunks[-1][1]["messages"][-1].content == "Done."
    events = [parse_event(value["progress"]) for mode, value in chunks if mode == "custom"]
    assert sum(event.event == "image" for event in events) == 3


async def test_agent_resumed_after_a_crash_in_the_tool_continues_the_same_thread(
    run_dir: Path, tiny: RunOptions, memory_url: str
) -> None:
    planner = scripted([plan_reply([step(1, "a fox"), step(2, "an owl", sources=[1])])])
    generator = RecordingGenerator()
    backends = Backends(planner=planner, critic=scripted(CrashOnce()), generator=generator)
    tool = create_interleave_tool(backends=backends, options=tiny, run_dir=run_dir,
                                  checkpointer=memory_url)
    model = ToolCallingFakeModel(messages=iter([
        AIMessage("", tool_calls=[_call("fox and owl", "call_crash")]),
        AIMessage("Done."),
    ]))
    agent = create_agent(model, [tool], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "agent-crash"}}
    with pytest.raises(ModelCallError, match="critic process died"):
        await agent.ainvoke({"messages": [{"role": "user", "content": "fox and owl"}]}, config)
    assert len(generator.jobs) == 1
    # Resuming the agent re-runs the same tool call, which continues the same thread.
    result = await agent.ainvoke(None, config)
    assert result["messages"][-1].content == "Done."
    document = next(m for m in result["messages"] if isinstance(m, ToolMessage)).artifact
    assert [s.status for s in document.steps] == ["accepted", "accepted"]
    assert len(planner.calls) == 1 and len(generator.jobs) == 2
    assert not any(a.reused for s in document.steps for a in s.attempts)


# --- the graph as a subgraph ----------------------------------------------------------------


class IllustratedState(TrajectoryState, total=False):
    """A parent's state: its own fields plus the trajectory fields it hands the subgraph."""

    topic: str
    summary: str


def _crashing_backends() -> tuple[Backends, RecordingGenerator]:
    planner = scripted([plan_reply([step(1, "a fox"), step(2, "an owl", sources=[1])])])
    generator = RecordingGenerator()
    return Backends(planner=planner, critic=scripted(CrashOnce()), generator=generator), generator


async def test_graph_as_a_node_of_a_parent_that_shares_its_state_and_checkpointer(
    run_dir: Path, tiny: RunOptions
) -> None:
    backends, generator = _crashing_backends()
    settings = make_settings("custom", backends, tiny)

    def prepare(state: IllustratedState) -> dict[str, Any]:
        return {**trajectory_input(Request(text=state["topic"]), settings)}

    def summarise(state: IllustratedState) -> dict[str, Any]:
        document = state["document"]
        assert document is not None
        return {"summary": f"{len(document.steps)} illustrated steps"}

    # The parent declares the same context schema; the context given to its invocation
    # reaches the subgraph's nodes as their Runtime.context.
    builder = StateGraph(IllustratedState, context_schema=Context)
    builder.add_node("prepare", prepare)
    builder.add_node("illustrate", build_graph())
    builder.add_node("summarise", summarise)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "illustrate")
    builder.add_edge("illustrate", "summarise")
    builder.add_edge("summarise", END)
    saver = InMemorySaver(serde=make_serializer())
    parent = builder.compile(checkpointer=saver)
    context = Workspace.open(run_dir, "memory://unused").context(backends)
    config = {"configurable": {"thread_id": "parent-shared"}}

    with pytest.raises(ModelCallError, match="critic process died"):
        await parent.ainvoke({"topic": "a fox meets an owl"}, config, context=context)
    # The parent's checkpointer holds the subgraph's own progress, down to its next node.
    snapshot = await parent.aget_state(config, subgraphs=True)
    (task,) = snapshot.tasks
    assert task.name == "illustrate" and "critic process died" in (task.error or "")
    assert task.state is not None and task.state.next == ("critic",)
    assert task.state.values["generator_calls"] == 1
    assert task.state.config["configurable"]["checkpoint_ns"].startswith("illustrate:")

    final = await parent.ainvoke(None, config, context=context)
    assert final["summary"] == "2 illustrated steps"
    # Resumed from the subgraph's checkpoint: no replanning, no redrawing, no ledger reuse.
    assert len(generator.jobs) == 2
    assert not any(a.reused for s in final["document"].steps for a in s.attempts)


class StoryState(TypedDict, total=False):
    """A parent with none of the trajectory's fields."""

    topic: str
    pictures: list[str]


@dataclass(frozen=True)
class AppContext:
    """The parent's own context, carrying the trajectory's context as one field."""

    user: str
    interleave: Context


async def test_graph_called_from_a_wrapper_node_with_other_schemas(
    run_dir: Path, tiny: RunOptions
) -> None:
    backends, generator = _crashing_backends()
    settings = make_settings("custom", backends, tiny)
    trajectory = build_graph()

    async def illustrate(state: StoryState, runtime: Runtime[AppContext]) -> dict[str, Any]:
        # Another context schema would reach the subgraph unconverted: pass ours explicitly.
        out = await trajectory.ainvoke(
            trajectory_input(Request(text=state["topic"]), settings),
            context=runtime.context.interleave,
        )
        return {"pictures": [s.image.sha256 for s in out["document"].steps if s.image]}

    builder = StateGraph(StoryState, context_schema=AppContext)
    builder.add_node("illustrate", illustrate)
    builder.add_edge(START, "illustrate")
    builder.add_edge("illustrate", END)
    parent = builder.compile(checkpointer=InMemorySaver(serde=make_serializer()))
    context = AppContext("ann", Workspace.open(run_dir, "memory://unused").context(backends))
    config = {"configurable": {"thread_id": "parent-wrapper"}}

    with pytest.raises(ModelCallError, match="critic process died"):
        await parent.ainvoke({"topic": "a fox meets an owl"}, config, context=context)
    (task,) = (await parent.aget_state(config, subgraphs=True)).tasks
    assert task.state is not None and task.state.values["generator_calls"] == 1
    final = await parent.ainvoke(None, config, context=context)
    assert len(final["pictures"]) == 2 and len(generator.jobs) == 2


# --- the example ----------------------------------------------------------------------------


@pytest.mark.slow
def test_example_script_runs_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INTERLEAVE_EXAMPLE_MODEL"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--run-dir", str(tmp_path / "runs")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tool call: interleave_document" in out
    assert "Step 1:" in out and "[image sha256=" in out and "base64" not in out
    assert "agent answer:" in out
    assert "subgraph checkpoints: illustrate:" in out
    assert "parent summary: 3 steps" in out
