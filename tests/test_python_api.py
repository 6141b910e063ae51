"""The Python API as notebook and LangGraph users meet it: blocking calls inside running loops,
RunnableConfig merged into our runs, the compiled graph used directly, and the public names."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.callbacks import AsyncCallbackManager
from langchain_core.messages import ToolCall
from langchain_core.runnables import RunnableConfig
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from typer.testing import CliRunner

import interleave_thinker
from interleave_thinker import (
    Backends,
    ConfigurationError,
    ReviewRequired,
    RunOptions,
    aresume,
    arun,
    build_graph,
    collect_garbage,
    create_interleave_tool,
    list_threads,
    load_document,
    make_context,
    make_input,
    make_serializer,
    resume,
    run,
    thread_report,
)
from interleave_thinker.cli import app
from interleave_thinker.runner import run_blocking, run_config

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = RunOptions(width=32, height=32)
STORY = "A kite rises. The wind drops."


def _walk(run: Any) -> list[Any]:
    found = [run]
    for child in run.child_runs:
        found.extend(_walk(child))
    return found


def _runs(collector: RunCollectorCallbackHandler) -> list[Any]:
    return [item for root in collector.traced_runs for item in _walk(root)]


# --- blocking calls in scripts and inside running loops ----------------------------------------


def test_blocking_calls_work_without_a_loop_and_inside_one(tmp_path: Path) -> None:
    where = {"run_dir": tmp_path / "runs", "checkpointer": f"sqlite:///{tmp_path}/runs/c.sqlite"}
    plain = run(STORY, profile="test", options=SMALL, thread_id="plain", **where)

    async def notebook_cell() -> None:
        # What a notebook does: the cell's code runs while the kernel's loop is running.
        asyncio.get_running_loop()
        inside = run(STORY, profile="test", options=SMALL, thread_id="inside", **where)
        assert inside.document.content_for_comparison() == plain.document.content_for_comparison()
        assert load_document("inside", **where) == inside.document
        assert resume("inside", **where).document == inside.document
        assert {t.thread_id for t in list_threads(**where)} == {"plain", "inside"}
        assert thread_report("plain", **where)["status"] == "done"
        assert collect_garbage(**where, min_age_s=0).threads == 2  # a dry run, read in the loop

    asyncio.run(notebook_cell())


async def test_run_inside_the_test_loop_itself(tmp_path: Path) -> None:
    result = run(STORY, profile="test", options=SMALL, run_dir=tmp_path, checkpointer="memory://")
    assert [step.status for step in result.document.steps] == ["accepted", "accepted"]


async def test_blocking_form_keeps_context_variables_and_raises_errors() -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    marker.set("the caller's")

    async def read() -> tuple[str, str]:
        return marker.get(), threading.current_thread().name

    value, thread = run_blocking(read())
    assert value == "the caller's" and thread != threading.current_thread().name

    async def fail() -> None:
        raise ConfigurationError("refused on purpose")

    with pytest.raises(ConfigurationError, match="refused on purpose"):
        run_blocking(fail())


def _interrupted_run(start_loop: Any) -> list[str]:
    """Ctrl-C while a blocking call waits inside a running loop (started by ``start_loop``)."""
    seen: list[str] = []

    async def long_run() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def cell() -> None:
        run_blocking(long_run())

    assert threading.current_thread() is threading.main_thread()
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        start_loop(cell())
    assert time.monotonic() - started < 10
    return seen


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_in_a_notebook_cancels_the_run() -> None:
    # A Jupyter kernel's loop: SIGINT raises KeyboardInterrupt in the main thread.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = asyncio.new_event_loop()
    try:
        assert _interrupted_run(loop.run_until_complete) == ["cancelled"]
    finally:
        loop.close()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_under_asyncio_run_cancels_the_run() -> None:
    # asyncio.run() turns the first SIGINT into a cancellation of its main task.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _interrupted_run(asyncio.run) == ["cancelled"]
    finally:
        signal.signal(signal.SIGINT, previous)


# --- RunnableConfig --------------------------------------------------------------------------


def test_run_config_keeps_our_thread_and_merges_the_rest() -> None:
    mine, theirs = RunCollectorCallbackHandler(), RunCollectorCallbackHandler()
    caller: RunnableConfig = {
        "tags": ["app"],
        "metadata": {"user": "ann", "thread_id": "parent-thread"},
        "run_name": "illustrate",
        "max_concurrency": 2,
        "recursion_limit": 10,
        "callbacks": [theirs],
        "configurable": {"thread_id": "parent-thread", "checkpoint_ns": "node:1",
                         "__pregel_send": object(), "user_setting": 7},
    }
    merged = run_config("ours", 40, caller, [mine])
    assert merged["configurable"] == {"user_setting": 7, "thread_id": "ours"}
    assert merged["metadata"] == {"user": "ann", "thread_id": "ours"}
    assert merged["tags"] == ["app"] and merged["run_name"] == "illustrate"
    assert merged["max_concurrency"] == 2
    assert merged["recursion_limit"] == 40  # raised to what the thread needs
    assert merged["callbacks"] == [theirs, mine]
    assert run_config("ours", 40, {"recursion_limit": 500})["recursion_limit"] == 500
    manager = AsyncCallbackManager(handlers=[theirs])
    combined = run_config("ours", 40, {"callbacks": manager}, [mine])["callbacks"]
    assert isinstance(combined, AsyncCallbackManager)
    assert combined.handlers == [theirs, mine] and manager.handlers == [theirs]
    # Keys that are not config keys are configurable values, as LangChain reads them.
    assert run_config("ours", 1, {"model": "x"})["configurable"] == {"model": "x", "thread_id": "ours"}  # type: ignore[typeddict-unknown-key]


class AppState(TypedDict, total=False):
    topic: str
    pictures: list[str]


async def test_a_parent_langgraph_app_sees_its_tags_and_metadata_on_our_runs(
    tmp_path: Path, test_backends: Backends
) -> None:
    collector = RunCollectorCallbackHandler()

    async def illustrate(state: AppState, config: RunnableConfig) -> dict[str, Any]:
        # The node passes its config as it is, LangGraph's internal keys included.
        result = await arun(state["topic"], backends=test_backends, options=SMALL,
                            thread_id="illustrated", run_dir=tmp_path, checkpointer="memory://",
                            config=config)
        return {"pictures": [s.image.sha256 for s in result.document.steps if s.image]}

    builder = StateGraph(AppState)
    builder.add_node("illustrate", illustrate)
    builder.add_edge(START, "illustrate")
    builder.add_edge("illustrate", END)
    parent = builder.compile(checkpointer=InMemorySaver())
    final = await parent.ainvoke(
        {"topic": STORY},
        {"configurable": {"thread_id": "app-thread"}, "tags": ["my-app"],
         "metadata": {"app_user": "ann"}, "callbacks": [collector], "recursion_limit": 5},
    )
    assert len(final["pictures"]) == 2
    runs = _runs(collector)
    ours = next(r for r in runs if r.name == "interleave_thinker")
    node = next(r for r in runs if r.name == "illustrate")
    assert ours.parent_run_id == node.id  # nested under the app's node
    inner = _walk(ours)
    model_calls = [r for r in inner if r.name in ("planner", "critic") and r.run_type == "llm"]
    assert model_calls and any(r.name == "generator_call" for r in inner)
    for item in [ours, *model_calls]:
        assert "my-app" in (item.tags or []), item.name
        metadata = item.extra["metadata"]
        assert metadata["app_user"] == "ann" and metadata["thread_id"] == "illustrated", item.name
    # The parent's recursion limit (5) was raised to the trajectory's, and its thread is its own.
    assert (await parent.aget_state({"configurable": {"thread_id": "app-thread"}})).values["pictures"]


async def test_arun_config_names_the_run_and_adds_callbacks(tmp_path: Path) -> None:
    given, passed = RunCollectorCallbackHandler(), RunCollectorCallbackHandler()
    await arun(STORY, profile="test", options=SMALL, run_dir=tmp_path, checkpointer="memory://",
               thread_id="named", callbacks=[passed],
               config={"run_name": "my-illustration", "tags": ["t1"], "callbacks": [given],
                       "recursion_limit": 2, "metadata": {"thread_id": "not-this"}})
    for collector in (given, passed):
        (root,) = collector.traced_runs
        assert root.name == "my-illustration" and "t1" in root.tags
        assert root.extra["metadata"]["thread_id"] == "named"


async def test_aresume_merges_its_config_too(tmp_path: Path) -> None:
    where = {"run_dir": tmp_path, "checkpointer": f"sqlite:///{tmp_path}/c.sqlite"}
    with pytest.raises(ReviewRequired):
        await arun(STORY, profile="test", options=SMALL.with_changes(review_plan=True),
                   thread_id="reviewed", **where)
    collector = RunCollectorCallbackHandler()
    result = await aresume("reviewed", review=True, **where,
                           config={"tags": ["resumed"], "metadata": {"who": "ann"},
                                   "callbacks": [collector], "run_name": "second-half"})
    assert result.document.steps
    (root,) = collector.traced_runs
    assert root.name == "second-half" and "resumed" in root.tags
    assert root.extra["metadata"]["who"] == "ann" and root.extra["metadata"]["thread_id"] == "reviewed"


async def test_the_agent_tool_takes_a_config_and_the_callers(tmp_path: Path) -> None:
    collector = RunCollectorCallbackHandler()
    tool = create_interleave_tool(profile="test", options=SMALL, run_dir=tmp_path,
                                  checkpointer=f"memory://{uuid.uuid4().hex}",
                                  config={"tags": ["tool-config"], "metadata": {"via": "tool"}})
    call = ToolCall(name=tool.name, args={"request": STORY}, id="call-cfg", type="tool_call")
    message = await tool.ainvoke(call, config={"tags": ["agent"], "metadata": {"agent": "a1"},
                                               "callbacks": [collector]})
    assert message.status == "success"
    runs = _runs(collector)
    ours = next(r for r in runs if r.name == "interleave_thinker")
    assert {"agent", "tool-config"} <= set(ours.tags or [])
    metadata = ours.extra["metadata"]
    assert metadata["agent"] == "a1" and metadata["via"] == "tool"
    assert metadata["thread_id"].startswith("tool-call-cfg-")


# --- the compiled graph directly -------------------------------------------------------------


async def test_partial_inputs_and_a_missing_context_are_refused_by_name(tmp_path: Path) -> None:
    context = make_context(tmp_path, profile="test")
    graph = build_graph(checkpointer=InMemorySaver(serde=make_serializer()))
    good = make_input(STORY, context=context, options=SMALL)
    cases = [
        ({"request": good["request"]}, context, "input has no 'settings' field"),
        ({"settings": good["settings"]}, context, "input has no 'request' field"),
        ({**good, "request": {"text": STORY}}, context, "'request' is a dict, not a Request"),
        (good, None, "without its context"),
        (good, "interleave-runs", "context is a str, not an interleave_thinker.Context"),
    ]
    for number, (graph_input, given_context, message) in enumerate(cases):
        config = {"configurable": {"thread_id": f"bad-{number}"}}
        with pytest.raises(ConfigurationError, match=message) as caught:
            await graph.ainvoke(graph_input, config, context=given_context)  # type: ignore[arg-type]
        assert "make_input" in (caught.value.hint or "")
    state = await graph.ainvoke(good, {"configurable": {"thread_id": "good"}}, context=context)
    assert state["settings"].profile == "test"
    assert [step.status for step in state["document"].steps] == ["accepted", "accepted"]


async def test_each_build_graph_has_its_own_saver_and_threads_stay_apart(tmp_path: Path) -> None:
    """The graph is compiled once per process and copied per call: each copy keeps the saver it
    was given, and a graph built without one has none."""
    context = make_context(tmp_path, profile="test")
    first_saver, second_saver = InMemorySaver(serde=make_serializer()), InMemorySaver(serde=make_serializer())
    first, second = build_graph(checkpointer=first_saver), build_graph(checkpointer=second_saver)
    assert first is not second and build_graph().checkpointer is None
    assert (first.checkpointer, second.checkpointer) == (first_saver, second_saver)
    config = {"configurable": {"thread_id": "only-in-first"}}
    await first.ainvoke(make_input(STORY, context=context, options=SMALL), config, context=context)
    assert (await first.aget_state(config)).values["document"].steps
    assert not (await second.aget_state(config)).values


def test_make_input_refuses_what_run_refuses(tmp_path: Path) -> None:
    context = make_context(tmp_path, profile="test")
    with pytest.raises(ConfigurationError, match=r"must be an interleave_thinker\.Context"):
        make_input(STORY, context={"profile": "test"})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        make_input("   ", context=context)
    with pytest.raises(ConfigurationError, match="paper mode needs the official prompts"):
        make_input(STORY, context=context, options=RunOptions(paper=True))


async def test_a_thread_started_directly_resumes_with_the_runner(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/checkpoints.sqlite"
    from interleave_thinker.checkpoints.savers import open_checkpointer

    context = make_context(tmp_path, profile="test")
    async with open_checkpointer(url) as saver:
        graph = build_graph(checkpointer=saver)
        state = await graph.ainvoke(make_input(STORY, context=context, options=SMALL),
                                    {"configurable": {"thread_id": "direct"}}, context=context)
    resumed = resume("direct", run_dir=tmp_path, checkpointer=url)
    assert resumed.document == state["document"]


# --- the README's Python section, as a new user runs it ------------------------------------------


def _python_section_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    # Fragments with placeholders ("...": your own models) are not meant to run as they are.
    return [block for block in blocks if "..." not in block]


def _user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTERLEAVE_", "LANGSMITH_"))}
    env["PYTHONPATH"] = str(Path(interleave_thinker.__file__).resolve().parents[1])
    env["HOME"] = str(tmp_path)
    return env


def test_readme_python_blocks_run_as_scripts(tmp_path: Path) -> None:
    blocks = _python_section_blocks()
    assert len(blocks) >= 3
    for number, block in enumerate(blocks):
        script = tmp_path / f"block{number}.py"
        script.write_text(block)
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_user_env(tmp_path),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"block {number}:\n{block}\n{done.stderr}"


async def test_readme_python_blocks_run_in_a_notebook_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("INTERLEAVE_")]:
        monkeypatch.delenv(name)
    for number, block in enumerate(_python_section_blocks()):
        # The README's own advice for a notebook, where asyncio.run() cannot start a loop.
        if "asyncio.run(draw())" in block:
            block = block.replace("asyncio.run(draw())", "await draw()")
        code = compile(block, f"README block {number}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        outcome = eval(code, {"__name__": "__main__"})  # our own README
        if inspect.iscoroutine(outcome):
            await outcome


# --- the public names -------------------------------------------------------------------------


def test_every_public_name_imports_and_nothing_private_is_public() -> None:
    names = interleave_thinker.__all__
    assert len(names) == len(set(names)) and names == sorted(names, key=lambda n: (n[0].islower(), n))
    namespace: dict[str, Any] = {}
    exec("from interleave_thinker import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(names)
    for name in names:
        assert not name.startswith("_")
        value = getattr(interleave_thinker, name)
        module = getattr(value, "__module__", "") or ""
        assert module.startswith("interleave_thinker") or name == "ProgressEvent", name


def test_the_readme_table_lists_exactly_the_public_names() -> None:
    text = README.read_text()
    table = text.split("\n### The public API\n", 1)[1].split("\n\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in re.findall(r"`([A-Za-z_]\w*)`", row.split("|")[1])]
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert set(listed) == set(interleave_thinker.__all__)


# --- interleave demo traces like run ----------------------------------------------------------


def test_demo_takes_a_trace_file_and_honours_langsmith_tracing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interleave_thinker import tracing
    from interleave_thinker.cli import generation

    real_arun = generation.arun
    langsmith = RunCollectorCallbackHandler()

    async def on_test_models(text: str, **kwargs: Any) -> Any:
        # The demo's tiny models take a while to build; the test profile shows the wiring.
        return await real_arun(text, **{**kwargs, "profile": "test", "options": SMALL})

    monkeypatch.setattr(generation, "arun", on_test_models)
    monkeypatch.setattr(tracing, "tracing_enabled", lambda: True)
    monkeypatch.setattr(tracing, "langsmith_tracer", lambda project=None: langsmith)
    monkeypatch.setenv("INTERLEAVE_DEMO_DIR", str(tmp_path / "demo-models"))
    trace = tmp_path / "demo.jsonl"
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path / "runs"), "--checkpointer",
                                      "memory://", "--trace-file", str(trace)])
    assert result.exit_code == 0, result.stderr
    names = {line.split('"name": "')[1].split('"')[0] for line in trace.read_text().splitlines()}
    assert {"planner", "generator_call", "critic", "compose"} <= names
    assert langsmith.traced_runs, "with LANGSMITH_TRACING on, demo traces to LangSmith"
