"""The graph langgraph.json serves: in-process behaviour, then a real `langgraph dev` driven by the SDK."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import json
import os
import shutil
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
from PIL import Image

from conftest import RecordingGenerator
from interleave_thinker import server
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, GeneratorError, ImageError, SettingsMismatchError
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.prompts.packs import InterleavePack
from interleave_thinker.server import ServerContext
from interleave_thinker.state import Document, ImageRef
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.workspace import RUN_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
LANGGRAPH = Path(sys.executable).with_name("langgraph")
HOST = "127.0.0.1"
REQUEST = "A paper boat sets sail. A storm tosses it. A rainbow follows."
SMALL = {"width": 64, "height": 64}
SERVER_START_TIMEOUT_S = 60.0
# The test profile's run takes about a second; a hung server must not hang the test suite.
RUN_TIMEOUT_S = 60.0

# The trajectory's nodes still write images and ledger entries with blocking file calls on the
# event loop (write_atomically from nodes/generator.py and nodes/critic.py), which `langgraph dev`
# refuses by default. Drop this flag once test_no_blocking_call_on_the_event_loop passes.
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


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[DevServer]:
    """``langgraph dev`` on the project's langgraph.json, in a scratch copy of the project folder
    (the server writes .langgraph_api/ where it runs), with runs under ``tmp_path``."""
    if not LANGGRAPH.exists() or importlib.util.find_spec("langgraph_sdk") is None:
        pytest.skip("the LangGraph CLI is not installed (pip install 'langgraph-cli[inmem]')")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "langgraph.json", project / "langgraph.json")
    # Graph paths may name files under src/; the package itself is installed in the venv.
    (project / "src").symlink_to(REPO / "src", target_is_directory=True)
    run_dir = tmp_path / "runs"
    log = tmp_path / "server.log"
    port = _free_port()
    env = {
        **os.environ,
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGGRAPH_NO_VERSION_CHECK": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
        RUN_DIR_ENV: str(run_dir),
        "PYTHONUNBUFFERED": "1",
    }
    command = [str(LANGGRAPH), "dev", "--no-browser", "--no-reload", "--host", HOST,
               "--port", str(port), *DEV_FLAGS]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://{HOST}:{port}"
        _wait_ready(process, url, log)
        yield DevServer(url, run_dir, project, log)
    finally:
        _stop(process)


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


# LangGraph dev's own blocking-call rules (blockbuster), applied to a run of the served graph.
BLOCKING_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from blockbuster.blockbuster import BlockingError
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph_runtime_inmem.queue import _enable_blockbuster

    from interleave_thinker.checkpoints.savers import make_serializer
    from interleave_thinker.server import graph


    async def main():
        served = graph.copy(update={"checkpointer": InMemorySaver(serde=make_serializer())})
        blockbuster = _enable_blockbuster()
        try:
            await served.ainvoke(
                {"text": "A boat. A storm. A rainbow.", "profile": "test",
                 "options": {"width": 48, "height": 48}},
                {"configurable": {"thread_id": "blocking"}},
            )
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
    env = {**os.environ, RUN_DIR_ENV: str(tmp_path / "runs")}
    result = subprocess.run([sys.executable, "-c", BLOCKING_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no blocking call" in result.stdout
