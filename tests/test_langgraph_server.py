"""The graph langgraph.json serves: in-process behaviour, then a real `langgraph dev` driven by the SDK."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command
from PIL import Image

from conftest import RecordingGenerator
from interleave_thinker import server
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.context import Backends, Timeouts
from interleave_thinker.errors import (
    ConfigurationError,
    GeneratorError,
    ImageError,
    SettingsMismatchError,
    StorageError,
)
from interleave_thinker.events import parse_event
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.prompts.packs import InterleavePack
from interleave_thinker.server import ServerContext
from interleave_thinker.state import Document, ImageRef, RunOptions
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES, ImageStore
from interleave_thinker.workspace import RUN_DIR_ENV, Workspace

REPO = Path(__file__).resolve().parents[1]
LANGGRAPH = Path(sys.executable).with_name("langgraph")
HOST = "127.0.0.1"
REQUEST = "A paper boat sets sail. A storm tosses it. A rainbow follows."
SMALL = {"width": 64, "height": 64}
SERVER_START_TIMEOUT_S = 60.0
# The test profile's run takes about a second; a hung server must not hang the test suite.
RUN_TIMEOUT_S = 60.0

# `langgraph dev` fails a run that makes a blocking call on the event loop (blockbuster); no
# flag turns that off here, so every live test checks it.
DEV_FLAGS: tuple[str, ...] = ()


# --- In process: the served graph with an in-memory checkpointer -----------------------------


class FailsOnceOnSecondBatch(RecordingGenerator):
    """The test generator, failing its second backend call once (a crash between batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        if len(self.batch_sizes) == 1 and not self.failed:
            self.failed = True
            raise GeneratorError("planned failure of the second batch", hint="resume the thread")
        return await super().agenerate(jobs)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> CompiledStateGraph:
    """The served graph with a checkpointer as the server lends one, and a fresh backends cache."""
    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    monkeypatch.setattr(server, "_MODELS", {})
    monkeypatch.setattr(server, "_TIMEOUTS", {})
    return server.graph.copy(update={"checkpointer": InMemorySaver(serde=make_serializer())})


def _use_test_backends(monkeypatch: pytest.MonkeyPatch, generator: RecordingGenerator) -> None:
    # The "test" profile with a generator the test can watch; same identities as the profile's.
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=generator)
    monkeypatch.setattr(server, "_MODELS", {("test", False): (backends, InterleavePack())})


def _thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


async def test_plain_json_input_runs_to_a_document_and_an_html_page(
    served: CompiledStateGraph, run_dir: Path
) -> None:
    config = _thread()
    out = await served.ainvoke(
        {"text": REQUEST, "profile": "test", "options": {**SMALL, "max_attempts": 2}}, config
    )
    assert set(out) == set(server.TRAJECTORY_KEYS)
    document = out["document"]
    assert isinstance(document, Document)
    assert [step.number for step in document.steps] == [1, 2, 3]
    assert all(isinstance(step.image, ImageRef) for step in document.steps)
    settings = out["settings"]
    assert settings.profile == "test"
    assert settings.options.budget.max_attempts == 2
    assert (settings.options.width, settings.options.height) == (64, 64)
    thread_id = config["configurable"]["thread_id"]
    page = run_dir / "documents" / thread_id / "document.html"
    assert "A storm tosses it" in page.read_text()
    # The trajectory ran as a subgraph: its own checkpoints, one per planner/generator/critic pass.
    assert [name for name, _ in served.get_subgraphs()] == ["trajectory"]
    root = [s async for s in served.aget_state_history(config)]
    task = next(t for s in root for t in s.tasks if t.name == "trajectory")
    inner_config = {"configurable": {**config["configurable"], "checkpoint_ns": f"trajectory:{task.id}"}}
    inner = [s async for s in served.aget_state_history(inner_config)]
    assert len(inner) > len(root)
    assert {"planner", "generator", "critic", "compose"} <= {n for s in inner for n in s.next}


async def test_profile_from_the_context_and_nested_options(served: CompiledStateGraph) -> None:
    options = {"budget": {"max_attempts": 1}, "seed": 7, **SMALL}
    out = await served.ainvoke(
        {"text": "One lighthouse.", "options": options}, _thread(), context=ServerContext(profile="test")
    )
    assert out["settings"].profile == "test"
    assert out["settings"].options.budget.max_attempts == 1
    assert out["settings"].options.seed == 7


@pytest.mark.parametrize(
    ("graph_input", "context", "error", "words"),
    [
        ({"text": "  ", "profile": "test"}, None, ConfigurationError, "request text is empty"),
        ({"text": ["A cat."], "profile": "test"}, None, ConfigurationError, "request text"),
        ({"text": "A cat. " * 2000, "profile": "test"}, None, ConfigurationError, "10,000"),
        ({"text": "A cat.\x1b[2J", "profile": "test"}, None, ConfigurationError, "control character"),
        ({"text": "A cat.", "profile": "test"}, ServerContext(profile="demo"), ConfigurationError,
         "'test' but the context for 'demo'"),
        ({"text": "A cat.", "profile": "nope"}, None, ConfigurationError, "unknown profile 'nope'"),
        ({"text": "A cat.", "profile": "test", "options": {"colour": "red"}}, None,
         ConfigurationError, "unknown run option 'colour'"),
        ({"text": "A cat.", "profile": "test", "options": {"width": 2}}, None,
         ConfigurationError, "options are not valid"),
        ({"text": "A cat.", "profile": "test", "images": ["0" * 64]}, None, ImageError,
         "no image 000000000000"),
    ],
)
async def test_bad_input_fails_with_a_message_the_server_shows(
    served: CompiledStateGraph, graph_input: dict[str, Any], context: ServerContext | None,
    error: type[Exception], words: str,
) -> None:
    with pytest.raises(error) as raised:
        await served.ainvoke(graph_input, _thread(), context=context)
    # The server reports the text of ValueErrors only; others read "An internal error occurred".
    assert isinstance(raised.value, ValueError)
    assert words in str(raised.value)
    assert "hint:" in str(raised.value)


async def test_input_images_are_named_by_hash_and_stay_references(
    served: CompiledStateGraph, run_dir: Path
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "navy").save(buffer, format="PNG")
    ref = ImageStore(run_dir / "images").put(buffer.getvalue())
    out = await served.ainvoke(
        {"text": "Make it night.", "profile": "test", "options": SMALL,
         "images": [ref.sha256, ref.model_dump(mode="json")]},
        _thread(),
    )
    assert out["request"].images == (ref, ref)


async def test_same_input_again_draws_nothing_and_other_input_is_refused(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = RecordingGenerator()
    _use_test_backends(monkeypatch, generator)
    config = _thread()
    graph_input = {"text": REQUEST, "profile": "test", "options": SMALL}
    first = await served.ainvoke(graph_input, config)
    drawn = len(generator.jobs)
    again = await served.ainvoke(graph_input, config)
    assert again["document"] == first["document"]
    assert len(generator.jobs) == drawn
    with pytest.raises(SettingsMismatchError, match="request: the text or input images differ"):
        await served.ainvoke({**graph_input, "text": "Something else."}, config)
    with pytest.raises(SettingsMismatchError, match=r"options\.width: thread has 64, this run has 1024"):
        await served.ainvoke({**graph_input, "options": {}}, config)
    # The refused input leaves the thread as it was: its own input still finds the document.
    assert (await served.ainvoke(graph_input, config))["document"] == first["document"]
    assert len(generator.jobs) == drawn


async def test_failed_run_is_readable_and_resumes_where_it_stopped(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = FailsOnceOnSecondBatch()
    _use_test_backends(monkeypatch, generator)
    config = _thread()
    with pytest.raises(GeneratorError, match="planned failure"):
        await served.ainvoke({"text": REQUEST, "profile": "test", "options": SMALL}, config)
    # What a client sees mid-trajectory: the subgraph's state, with the plan and first attempt.
    snapshot = await served.aget_state(config, subgraphs=True)
    assert snapshot.next == ("trajectory",)
    inner = snapshot.tasks[0].state
    assert inner is not None and not isinstance(inner, dict)
    assert len(inner.values["plan"].steps) == 3
    assert inner.values["progress"][0].attempts
    with pytest.raises(SettingsMismatchError, match="runs with profile 'test', not 'demo'"):
        await served.ainvoke(None, config, context=ServerContext(profile="demo"))
    # Resume = input None: the failed task re-enters the subgraph at its last checkpoint.
    out = await served.ainvoke(None, config)
    assert len(out["document"].steps) == 3
    drawn = Counter((job.step, job.attempt) for job in generator.jobs)
    assert drawn and set(drawn.values()) == {1}, drawn
    assert out["generator_calls"] == len(generator.jobs)


def test_input_and_output_schemas_are_not_empty() -> None:
    # Studio builds its form from these; with typing.TypedDict they were {} on Python 3.11.
    inputs = server.graph.get_input_jsonschema()
    assert {"text", "options", "images", "profile"} <= set(inputs["properties"])
    assert inputs["required"] == ["text"]
    outputs = server.graph.get_output_jsonschema()
    assert set(outputs["properties"]) == set(server.TRAJECTORY_KEYS)
    assert "Document" in outputs["$defs"] and "RunSettings" in outputs["$defs"]
    assert set(server.ServerOutput.__annotations__) == set(server.TRAJECTORY_KEYS)
    assert server.graph.get_context_jsonschema()["properties"]["profile"]


def test_copies_keep_the_strict_msgpack_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    # Servers attach their checkpointer with copy(); LangGraph's copy() drops the list of record
    # types compile() allowed, and with LANGGRAPH_STRICT_MSGPACK=true our records then came back
    # as dicts on a thread's second input.
    allowed = {("interleave_thinker.state", "RunSettings")}
    graph = server.build_server_graph()
    graph._serde_allowlist = allowed
    copied = graph.copy(update={"checkpointer": InMemorySaver()})
    assert isinstance(copied, server.ServedGraph)
    assert copied._serde_allowlist == allowed
    assert copied.with_config({"tags": ["x"]})._serde_allowlist == allowed


class SlowGenerator(RecordingGenerator):
    """The test generator, taking its time over each batch."""

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        await asyncio.sleep(0.3)
        return await super().agenerate(jobs)


async def test_plan_progress_and_events_are_visible_during_a_run(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_test_backends(monkeypatch, SlowGenerator())
    config = _thread()
    events: list[Any] = []

    async def run() -> None:
        # No subgraphs=True: the trajectory's events reach the top-level custom stream.
        async for chunk in served.astream(
            {"text": REQUEST, "profile": "test", "options": SMALL}, config, stream_mode="custom"
        ):
            events.append(parse_event(chunk))

    task = asyncio.create_task(run())
    seen = None
    while not task.done():
        snapshot = await served.aget_state(config, subgraphs=True)
        inner = snapshot.tasks[0].state if snapshot.tasks else None
        values = inner.values if inner is not None and not isinstance(inner, dict) else {}
        if any(item.attempts for item in values.get("progress", ())):
            seen = values
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(task, RUN_TIMEOUT_S)
    assert seen is not None, "the plan and progress never showed mid-run"
    assert len(seen["plan"].steps) == 3
    kinds = [type(event).__name__ for event in events]
    assert kinds[0] == "PlanReady" and kinds[-1] == "DocumentReady"
    assert {"StepStarted", "ImageReady", "Verdict", "StepCommitted"} <= set(kinds)


async def test_runs_use_sync_durability_and_the_configured_timeouts(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLEAVE_GENERATOR_TIMEOUT", "123")
    monkeypatch.setenv("INTERLEAVE_MODEL_TIMEOUT", "45")
    seen: list[tuple[Any, Any]] = []
    trajectory = server.TRAJECTORY

    class Spy:
        def astream(self, *args: Any, **kwargs: Any) -> Any:
            seen.append((kwargs.get("durability"), kwargs["context"].timeouts))
            return trajectory.astream(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(trajectory, name)

    monkeypatch.setattr(server, "TRAJECTORY", Spy())
    await served.ainvoke({"text": "A lamp.", "profile": "test", "options": SMALL}, _thread())
    assert seen == [("sync", Timeouts(generator=123.0, model=45.0))]


async def _interrupt_of(served: CompiledStateGraph, config: dict[str, Any]) -> Any:
    snapshot = await served.aget_state(config)
    assert snapshot.next == ("trajectory",)
    (pending,) = snapshot.interrupts
    return pending


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"execution_plan": "nonsense"}, "the edited plan is not valid"),
        ("yes", "must be true or an edited plan"),
        ({"execution_plan": [{"step_number": 1}]}, "the edited plan is not valid"),
    ],
)
async def test_a_bad_plan_review_answer_is_refused_and_the_thread_keeps_waiting(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch, bad: Any, words: str
) -> None:
    generator = RecordingGenerator()
    _use_test_backends(monkeypatch, generator)
    config = _thread()
    options = {**SMALL, "review_plan": True}
    await served.ainvoke({"text": REQUEST, "profile": "test", "options": options}, config)
    asked = await _interrupt_of(served, config)
    assert asked.value["kind"] == "review_plan"
    # Refused before the trajectory takes it, as a plain answer or by interrupt id: the run ends
    # on the same review (same id), which now says what was wrong; nothing was drawn.
    for command in (Command(resume=bad), Command(resume={asked.id: bad})):
        out = await served.ainvoke(command, config)
        (refused,) = out["__interrupt__"]
        assert refused.id == asked.id
        assert words in refused.value["error"] and refused.value["hint"]
        assert refused.value["plan"] == asked.value["plan"]
        assert (await _interrupt_of(served, config)).id == asked.id
        # Resuming without an answer meets the refused one again, and refuses it again.
        assert words in (await served.ainvoke(None, config))["__interrupt__"][0].value["error"]
    assert generator.jobs == []
    # A good answer then continues the thread: an edited plan, as the review showed it.
    plan = asked.value["plan"]
    plan["execution_plan"][0]["prompt"] = "A red paper boat"
    out = await served.ainvoke(Command(resume=plan), config)
    assert out["document"] is not None
    assert out["plan"].steps[0].prompt == "A red paper boat"
    assert generator.jobs[0].prompt == "A red paper boat"


async def test_a_bad_forced_step_answer_is_refused_too(
    served: CompiledStateGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_test_backends(monkeypatch, RecordingGenerator())
    config = _thread()
    # One attempt each: the stand-in critic rejects some first attempts, which are then forced.
    options = {**SMALL, "review_forced": True, "max_attempts": 1}
    out = await served.ainvoke({"text": "A boat. A storm.", "profile": "test", "options": options}, config)
    (asked,) = out["__interrupt__"]
    assert asked.value["kind"] == "review_forced"
    step = asked.value["steps"][0]["step"]
    out = await served.ainvoke(Command(resume={"99": 1}), config)
    assert "step 99 is not waiting for review" in out["__interrupt__"][0].value["error"]
    out = await served.ainvoke(Command(resume={str(step): 1}), config)
    while "__interrupt__" in out:  # another pass may force another step
        out = await served.ainvoke(Command(resume=True), config)
    assert out["document"] is not None


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("image /srv/runs/images/ab/cd.png is damaged", "image <path> is damaged"),
        ("no image at ~/runs/x.png", "no image at <path>"),
        ("upload it with POST /interleave/images", "upload it with POST /interleave/images"),
        ("see http://host:8000/a/b, 1/2 and input/output", "see http://host:8000/a/b, 1/2 and input/output"),
    ],
)
def test_error_texts_name_no_server_path(text: str, shown: str) -> None:
    assert server.hide_paths(text) == shown


def test_server_errors_shown_to_clients_hide_the_run_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "runs"))
    error = server._shown_to_client(
        StorageError(f"disk full writing {tmp_path / 'runs' / 'images'}", hint="free space")
    )
    assert isinstance(error, ValueError) and isinstance(error, StorageError)
    assert str(tmp_path) not in str(error)
    assert str(error) == "disk full writing <path> (hint: free space)"


def test_the_server_lease_lives_in_the_postgresql_image_store() -> None:
    on_files = Workspace(Path("runs"), "sqlite:///x", "file://")
    in_postgres = Workspace(Path("runs"), "sqlite:///x", "postgresql://u@db:5432/images?pool_max=2")
    assert server._lease_url(on_files) is None
    assert server._lease_url(in_postgres) == "postgresql://u@db:5432/images?pool_max=2"


# --- The extra routes ----------------------------------------------------------------------


@pytest.fixture
def routes_client(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from interleave_thinker.routes import make_starlette_app

    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    with TestClient(make_starlette_app(max_uploads=1)) as client:
        yield client


def test_routes_store_serve_and_refuse_images(routes_client: Any, run_dir: Path) -> None:
    uploaded = routes_client.post("/interleave/images", content=_png("teal"))
    assert uploaded.status_code == 201
    sha256 = uploaded.json()["sha256"]
    assert routes_client.get(f"/interleave/images/{sha256}").content == _png("teal")
    assert routes_client.post("/interleave/images", content=b"no image").status_code == 400
    assert routes_client.get("/interleave/threads/../document").status_code == 404
    assert routes_client.get("/interleave/threads/x%20y/document").status_code == 400
    missing = routes_client.get("/interleave/threads/nope/document")
    assert missing.status_code == 404 and "has not finished" in missing.json()["detail"]
    # A damaged file in the store: refused, and the body names no path of the server.
    (path,) = (run_dir / "images").rglob(f"{sha256}*")
    path.write_bytes(b"damaged")
    damaged = routes_client.get(f"/interleave/images/{sha256}")
    assert damaged.status_code == 404
    assert str(run_dir) not in damaged.text and "/images/" not in damaged.text, damaged.text


def test_uploads_are_bounded_in_size_and_number(
    routes_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interleave_thinker import routes

    # Over the limit by its Content-Length: refused before the body is read.
    too_large = routes_client.post(
        "/interleave/images", content=b"x", headers={"content-length": str(MAX_IMAGE_BYTES + 1)}
    )
    assert too_large.status_code == 413
    # Over the limit while streaming (no Content-Length): cut off at the limit.
    monkeypatch.setattr(routes, "MAX_IMAGE_BYTES", 1000)
    chunks = iter([b"x" * 600, b"x" * 600, b"x" * 600])
    assert routes_client.post("/interleave/images", content=chunks).status_code == 413
    # All upload turns taken: a new upload waits its turn, then is told to come back.
    monkeypatch.setattr(routes, "UPLOAD_WAIT_S", 0.2)
    gate = next(route.endpoint for route in routes_client.app.routes if route.path == routes.UPLOAD_PATH)
    gate.__self__.uploads._value = 0  # the one turn is taken
    busy = routes_client.post("/interleave/images", content=_png("navy"))
    assert busy.status_code == 503 and busy.headers["retry-after"]
    gate.__self__.uploads._value = 1
    assert routes_client.post("/interleave/images", content=_png("navy")).status_code == 201


def test_the_fastapi_app_has_the_same_routes(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    fastapi = pytest.importorskip("fastapi", reason="FastAPI comes with the server extra (Aegra)")
    from starlette.testclient import TestClient

    from interleave_thinker.routes import make_fastapi_app

    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    app = make_fastapi_app()
    assert isinstance(app, fastapi.FastAPI)
    # API routes (not plain Starlette ones): Aegra puts its auth dependency on those only.
    assert all(isinstance(route, fastapi.routing.APIRoute) for route in app.routes
               if route.path.startswith("/interleave"))
    with TestClient(app) as client:
        sha256 = client.post("/interleave/images", content=_png("olive")).json()["sha256"]
        assert client.get(f"/interleave/images/{sha256}").status_code == 200
        assert client.get("/interleave/threads/nope/document").status_code == 404


# --- A real `langgraph dev` server, driven by the SDK ----------------------------------------


@dataclass(frozen=True)
class DevServer:
    url: str
    run_dir: Path
    project: Path
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _free_port() -> int:
    # Binding is not connecting, so pytest-socket's host rule does not apply. Another process may
    # take the port before the server binds it; start-up then fails with the log shown.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"langgraph dev exited with {process.returncode}:\n"
                                 + log.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(f"{url}/ok", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("langgraph dev did not answer in time:\n" + log.read_text(errors="replace")[-4000:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group, then kill it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def running_dev_server(
    tmp_path: Path,
    *,
    config: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[DevServer]:
    """``langgraph dev`` on the project's langgraph.json (updated with ``config``), in a scratch
    copy of the project folder holding ``files`` (the server writes .langgraph_api/ where it
    runs), with runs under ``tmp_path``. Its blocking-call detection stays on."""
    if not LANGGRAPH.exists() or importlib.util.find_spec("langgraph_sdk") is None:
        pytest.skip("the LangGraph CLI is not installed (pip install 'langgraph-cli[inmem]')")
    project = tmp_path / "project"
    project.mkdir()
    settings = {**json.loads((REPO / "langgraph.json").read_text()), **(config or {})}
    (project / "langgraph.json").write_text(json.dumps(settings))
    for name, text in (files or {}).items():
        (project / name).write_text(text)
    # Graph paths may name files under src/; the package itself is installed in the venv.
    (project / "src").symlink_to(REPO / "src", target_is_directory=True)
    run_dir = tmp_path / "runs"
    log = tmp_path / "server.log"
    port = _free_port()
    environment = {
        **os.environ,
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGGRAPH_NO_VERSION_CHECK": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
        RUN_DIR_ENV: str(run_dir),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    command = [str(LANGGRAPH), "dev", "--no-browser", "--no-reload", "--host", HOST,
               "--port", str(port), *DEV_FLAGS]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=project, env=environment, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://{HOST}:{port}"
        _wait_ready(process, url, log)
        yield DevServer(url, run_dir, project, log)
    finally:
        _stop(process)


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[DevServer]:
    """``langgraph dev`` as the README starts it, with strict msgpack loading on."""
    with running_dev_server(tmp_path, env={"LANGGRAPH_STRICT_MSGPACK": "true"}) as running:
        yield running


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.allow_hosts([HOST])
async def test_langgraph_dev_runs_a_thread_and_serves_its_state_and_images(
    dev_server: DevServer,
) -> None:
    import httpx
    from langgraph_sdk import get_client

    client = get_client(url=dev_server.url)
    assistants = await client.assistants.search(graph_id="interleave")
    assert assistants, dev_server.log_tail()

    thread = await client.threads.create()
    thread_id = thread["thread_id"]
    output = await asyncio.wait_for(
        client.runs.wait(
            thread_id,
            "interleave",
            input={"text": REQUEST, "profile": "test", "options": {**SMALL, "max_attempts": 2}},
            durability="sync",
        ),
        RUN_TIMEOUT_S,
    )
    assert "document" in output, (output, dev_server.log_tail())
    runs = await client.runs.list(thread_id)
    assert [run["status"] for run in runs] == ["success"]

    state = await client.threads.get_state(thread_id)
    values = state["values"]
    assert state["next"] == []
    assert values["settings"]["profile"] == "test"
    assert len(values["plan"]["steps"]) == 3
    # Finished: every step, with its attempts, is in the document (progress is emptied then).
    assert [item["status"] for item in values["document"]["steps"]] == ["accepted"] * 3
    assert all(item["attempts"] for item in values["document"]["steps"]) and values["progress"] == []
    steps = values["document"]["steps"]
    assert [step["text"] for step in steps] == ["A paper boat sets sail", "A storm tosses it",
                                               "A rainbow follows"]
    for step in steps:
        assert set(step["image"]) == {"sha256", "media_type", "width", "height"}
        assert (step["image"]["width"], step["image"]["height"]) == (64, 64)
    # References only: the whole state is a few kilobytes and carries no pixels.
    encoded = json.dumps(values)
    assert len(encoded) < 20_000
    assert "base64" not in encoded and "data:image" not in encoded

    history = await client.threads.get_history(thread_id, limit=50)
    assert len(history) >= 3
    task = next(t for h in history for t in h["tasks"] if t["name"] == "trajectory")
    inner = await client.threads.get_history(
        thread_id, limit=100, checkpoint={"checkpoint_ns": f"trajectory:{task['id']}"}
    )
    assert len(inner) >= 6
    assert {"planner", "generator", "critic", "compose"} <= {n for h in inner for n in h["next"]}

    async with httpx.AsyncClient(base_url=dev_server.url, timeout=10.0) as http:
        for step in steps:
            response = await http.get(f"/interleave/images/{step['image']['sha256']}")
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            assert hashlib.sha256(response.content).hexdigest() == step["image"]["sha256"]
        page = await http.get(f"/interleave/threads/{thread_id}/document")
        assert page.status_code == 200 and "A storm tosses it" in page.text
        uploaded = await http.post("/interleave/images", content=_png("teal"))
        assert uploaded.status_code == 201
        assert uploaded.json()["sha256"] == hashlib.sha256(_png("teal")).hexdigest()
        assert (await http.post("/interleave/images", content=b"not an image")).status_code == 400
        assert (await http.get(f"/interleave/images/{'0' * 64}")).status_code == 404

    # A bad request fails the run with our message, not "An internal error occurred".
    failed = await client.threads.create()
    with pytest.raises(Exception, match="request text is empty"):
        await asyncio.wait_for(
            client.runs.wait(failed["thread_id"], "interleave", input={"text": " ", "profile": "test"}),
            RUN_TIMEOUT_S,
        )

    assert (dev_server.project / ".langgraph_api").is_dir()
    assert (dev_server.run_dir / "documents" / thread_id / "document.html").is_file()


# LangGraph dev's own blocking-call rules (blockbuster), applied to the served graph and the
# routes: several runs and uploads on one run directory (the second and later runs met the
# half-done-writes sweep, once a blocking os.scandir on the loop), a second input on a finished
# thread, with strict msgpack loading on and the server's own serializer (no allowlist of ours).
BLOCKING_SCRIPT = textwrap.dedent(
    """
    import asyncio, io, sys
    from blockbuster.blockbuster import BlockingError
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph_runtime_inmem.queue import _enable_blockbuster
    from PIL import Image
    from starlette.requests import Request

    from interleave_thinker.routes import Routes
    from interleave_thinker.server import graph


    def upload_request(data):
        chunks = [data[:100], data[100:]]

        async def receive():
            body = chunks.pop(0) if chunks else b""
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        return Request({"type": "http", "method": "POST", "path": "/interleave/images",
                        "headers": []}, receive)


    async def main():
        served = graph.copy(update={"checkpointer": InMemorySaver()})
        routes = Routes()
        blockbuster = _enable_blockbuster()
        try:
            for number, colour in enumerate(["navy", "teal", "olive"]):
                buffer = io.BytesIO()
                Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
                uploaded = await routes.upload(upload_request(buffer.getvalue()))
                assert uploaded.status_code == 201, uploaded.body
                sha256 = uploaded.body.decode().split('"sha256":"')[1][:64]
                assert (await routes.image(sha256)).status_code == 200
                graph_input = {"text": "A boat. A storm. A rainbow.", "profile": "test",
                               "options": {"width": 48, "height": 48}, "images": [sha256]}
                config = {"configurable": {"thread_id": f"blocking-{number}"}}
                first = await served.ainvoke(graph_input, config)
                again = await served.ainvoke(graph_input, config)
                assert again["document"] == first["document"], "the second input"
                page = await routes.document(f"blocking-{number}")
                assert page.status_code == 200
        except BlockingError as exc:
            print(str(exc).splitlines()[0], file=sys.stderr)
            sys.exit(3)
        finally:
            blockbuster.deactivate()
        print("no blocking call")


    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_no_blocking_call_on_the_event_loop(tmp_path: Path) -> None:
    # Only looked up, not imported: importing it creates .langgraph_api/ in the working folder.
    if importlib.util.find_spec("langgraph_runtime_inmem") is None:
        pytest.skip("langgraph-runtime-inmem is not installed (pip install 'langgraph-cli[inmem]')")
    env = {**os.environ, RUN_DIR_ENV: str(tmp_path / "runs"), "LANGGRAPH_STRICT_MSGPACK": "true"}
    result = subprocess.run([sys.executable, "-c", BLOCKING_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no blocking call" in result.stdout


@pytest.mark.slow
@pytest.mark.allow_hosts([HOST])
async def test_langgraph_dev_takes_many_runs_uploads_and_inputs_per_run_directory(
    dev_server: DevServer,
) -> None:
    """The README's server, tried as a user would: runs and uploads in a row on one run
    directory (blocking detection and strict msgpack on), Studio's schemas, live events."""
    import httpx
    from langgraph_sdk import get_client

    client = get_client(url=dev_server.url)
    (assistant,) = await client.assistants.search(graph_id="interleave")
    schemas = await client.assistants.get_schemas(assistant["assistant_id"])
    assert {"text", "options", "images", "profile"} <= set(schemas["input_schema"]["properties"])
    assert {"plan", "progress", "document"} <= set(schemas["output_schema"]["properties"])
    assert {"text", "plan", "document"} <= set(schemas["state_schema"]["properties"])

    documents = []
    async with httpx.AsyncClient(base_url=dev_server.url, timeout=10.0) as http:
        for number, colour in enumerate(["navy", "teal", "olive"]):
            uploaded = await http.post("/interleave/images", content=_png(colour))
            assert uploaded.status_code == 201, uploaded.text
            thread_id = (await client.threads.create())["thread_id"]
            graph_input = {"text": f"Picture {number}. It changes.", "profile": "test",
                           "options": SMALL, "images": [uploaded.json()["sha256"]]}
            events = [
                part.data
                async for part in client.runs.stream(
                    thread_id, "interleave", input=graph_input, stream_mode="custom"
                )
                if part.event == "custom"
            ]
            assert events and events[0]["event"] == "plan" and events[-1]["event"] == "document"
            # The same input again (strict msgpack reads the thread's records back).
            again = await asyncio.wait_for(
                client.runs.wait(thread_id, "interleave", input=graph_input), RUN_TIMEOUT_S
            )
            assert "document" in again, (again, dev_server.log_tail())
            documents.append(again["document"])
            assert [run["status"] for run in await client.runs.list(thread_id)] == ["success"] * 2
    assert len({json.dumps(document) for document in documents}) == 3
    assert "BlockingError" not in dev_server.log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.allow_hosts([HOST])
async def test_langgraph_dev_refuses_a_bad_review_answer_and_keeps_waiting(
    dev_server: DevServer,
) -> None:
    from langgraph_sdk import get_client

    client = get_client(url=dev_server.url)
    thread_id = (await client.threads.create())["thread_id"]
    graph_input = {"text": REQUEST, "profile": "test", "options": {**SMALL, "review_plan": True}}
    out = await asyncio.wait_for(client.runs.wait(thread_id, "interleave", input=graph_input),
                                 RUN_TIMEOUT_S)
    (asked,) = out["__interrupt__"]
    assert asked["value"]["kind"] == "review_plan"
    refused = await asyncio.wait_for(
        client.runs.wait(thread_id, "interleave", command={"resume": {"execution_plan": "no"}}),
        RUN_TIMEOUT_S,
    )
    (again,) = refused["__interrupt__"]
    assert again["id"] == asked["id"]
    assert "the edited plan is not valid" in again["value"]["error"]
    thread = await client.threads.get(thread_id)
    assert thread["status"] == "interrupted"
    out = await asyncio.wait_for(
        client.runs.wait(thread_id, "interleave", command={"resume": True}), RUN_TIMEOUT_S
    )
    assert [step["status"] for step in out["document"]["steps"]] == ["accepted"] * 3


AUTH_MODULE = textwrap.dedent(
    """
    from langgraph_sdk import Auth

    auth = Auth()


    @auth.authenticate
    async def authenticate(headers):
        if headers.get(b"x-api-key") != b"let-me-in":
            raise Auth.exceptions.HTTPException(status_code=401, detail="who are you?")
        return "tester"
    """
)


@pytest.mark.slow
@pytest.mark.allow_hosts([HOST])
async def test_custom_routes_take_the_servers_authentication(tmp_path: Path) -> None:
    import httpx

    config = {"auth": {"path": "./auth.py:auth"}}
    with running_dev_server(tmp_path, config=config, files={"auth.py": AUTH_MODULE}) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as http:
            for method, path in (("POST", "/interleave/images"), ("GET", f"/interleave/images/{'0' * 64}"),
                                 ("GET", "/interleave/threads/x/document")):
                response = await http.request(method, path, content=_png("red") if method == "POST" else None)
                assert response.status_code in (401, 403), (path, response.status_code)
            allowed = await http.post("/interleave/images", content=_png("red"),
                                      headers={"x-api-key": "let-me-in"})
            assert allowed.status_code == 201, running.log_tail()


@pytest.mark.slow
@pytest.mark.allow_hosts([HOST])
async def test_batch_through_langgraph_dev_writes_the_local_batch_results(
    dev_server: DevServer, tmp_path: Path
) -> None:
    from langgraph_sdk import get_client

    from interleave_thinker.remote_batch import arun_remote_batch, server_thread_id

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "cat.png").write_bytes(_png("orange"))
    prompts = folder / "prompts.jsonl"
    prompts.write_text(
        '{"id": "kite", "text": "A kite. The wind drops."}\n'
        '{"id": "cat", "text": "A cat. It sleeps.", "images": ["cat.png"]}\n'
        "not json\n"
    )
    local = tmp_path / "client-runs"
    events: list[dict[str, Any]] = []
    report = await arun_remote_batch(prompts, dev_server.url, profile="test",
                                     options=RunOptions(**SMALL), run_dir=local,
                                     on_progress=events.append, poll_s=0.2)
    assert [o.status for o in report.outcomes] == ["done", "done"], report.outcomes
    assert [bad.line for bad in report.bad_lines] == [3]
    assert [o.thread_id for o in report.outcomes] == [server_thread_id("kite"), server_thread_id("cat")]
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["done", "done", "invalid"]
    assert report.index == local / "batches" / "prompts" / "index.html"
    for outcome in report.outcomes:
        # The page rendered here is the page the server wrote.
        served_page = dev_server.run_dir / "documents" / outcome.thread_id / "document.html"
        assert Path(outcome.document or "").read_bytes() == served_page.read_bytes()
    assert [e["event"] for e in events].count("finished") == 2

    # Again, from the command line: nothing is started, the finished threads are skipped.
    client = get_client(url=dev_server.url)
    command = [str(Path(sys.executable).with_name("interleave")), "batch", str(prompts),
               "--server", dev_server.url, "--profile", "test", "--size", "64x64",
               "--run-dir", str(local)]
    cli = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, check=False)
    # Exit code 1: the prompt file has a bad line.
    assert cli.returncode == 1, cli.stdout + cli.stderr
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["done", "done", "invalid"], cli.stdout
    for outcome in report.outcomes:
        assert len(await client.runs.list(outcome.thread_id)) == 1
    # Other options for the same prompts: refused, not mixed into the threads.
    other = await arun_remote_batch(prompts, dev_server.url, profile="test",
                                    options=RunOptions(width=64, height=64, seed=9), run_dir=local)
    assert all(o.status == "done" for o in other.outcomes)  # finished threads are just skipped
