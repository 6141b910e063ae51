"""Live tests on Aegra, the production agent server (README "Scale-out with Aegra").

Skipped unless ``INTERLEAVE_AEGRA_PYTHON`` names the python of the venv that
``scripts/setup_aegra.sh`` builds (Python 3.12, the project with its ``server`` extra) and
``INTERLEAVE_TEST_POSTGRES_URL`` names a PostgreSQL server. Each server is what the README runs
under a supervisor, ``python -m uvicorn aegra_api.main:app`` on ``aegra.json``, with Redis
workers (``REDIS_BROKER_ENABLED=true``). The tests use a database of their own,
``interleave_aegra_test`` on that server (made afresh for each test), and Redis database 7
(emptied for each test); the PostgreSQL image store lives in the same database, so the servers
share nothing but PostgreSQL and Redis: each has its own run directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from PIL import Image

from interleave_thinker.runner import arun
from interleave_thinker.state import Document, RunOptions
from interleave_thinker.workspace import RUN_DIR_ENV

AEGRA_PYTHON_ENV = "INTERLEAVE_AEGRA_PYTHON"
REDIS_URL_ENV = "INTERLEAVE_TEST_REDIS_URL"
SKIP_REASON = (
    f"the Aegra tests need its venv: bash scripts/setup_aegra.sh && "
    f"export {AEGRA_PYTHON_ENV}=$PWD/.aegra-venv/bin/python"
)
REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DATABASE = "interleave_aegra_test"
# Our own Redis database number, so other users of the machine's Redis are left alone.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
GRAPH = "interleave"
SMALL = {"width": 64, "height": 64}
REQUEST = "A paper boat sets sail. A storm tosses it. A rainbow follows."
SERVER_START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 120.0
# Short leases so that a killed worker's runs come back in seconds, not Aegra's default ~50 s;
# Aegra requires the lease to outlast two heartbeats.
LEASE_S, HEARTBEAT_S, REAPER_S = 7, 3, 2

pytestmark = [pytest.mark.slow, pytest.mark.aegra, pytest.mark.allow_hosts([HOST])]


def aegra_python() -> Path:
    raw = os.environ.get(AEGRA_PYTHON_ENV, "").strip()
    if not raw:
        pytest.skip(SKIP_REASON)
    python = Path(raw)
    if not os.access(python, os.X_OK):
        pytest.fail(f"{AEGRA_PYTHON_ENV}={raw} is not an executable python; {SKIP_REASON}",
                    pytrace=False)
    return python


@dataclass(frozen=True)
class Backing:
    """Where the servers keep everything: one PostgreSQL database and one Redis database."""

    python: Path
    database_url: str
    redis_url: str


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


@pytest.fixture
def backing(postgres_server: str) -> Backing:
    """A fresh ``interleave_aegra_test`` database and an empty Redis db 7."""
    import psycopg

    python = aegra_python()
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        # Afresh each time: Aegra's tables, its runs and our images from an earlier test (or a
        # killed session) would otherwise be picked up by the servers' reapers.
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    redis_url = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    # The redis client is in Aegra's venv (the test venv has none).
    subprocess.run(
        [str(python), "-c", "import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()",
         redis_url],
        check=True, timeout=30, capture_output=True,
    )
    return Backing(python, _with_database(postgres_server, DATABASE), redis_url)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class AegraServer:
    """One Aegra server process (API and Redis workers), started and stopped by the test."""

    name: str
    backing: Backing
    project: Path
    run_dir: Path
    log: Path
    port: int = field(default_factory=_free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, call_log: Path, delay: float = 0.0) -> None:
        environment = {
            key: value for key, value in os.environ.items()
            # The test session's own settings (a checkpointer, an image store...) and Python paths
            # are not the server's.
            if not key.startswith(("INTERLEAVE_", "PYTHON", "VIRTUAL_ENV"))
        }
        environment.update({
            "AEGRA_CONFIG": str(self.project / "aegra.json"),
            "DATABASE_URL": self.backing.database_url,
            "REDIS_BROKER_ENABLED": "true",
            "REDIS_URL": self.backing.redis_url,
            "WORKER_COUNT": "1",
            "N_JOBS_PER_WORKER": "4",
            "LEASE_DURATION_SECONDS": str(LEASE_S),
            "HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT_S),
            "REAPER_INTERVAL_SECONDS": str(REAPER_S),
            "CRON_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
            "LANGSMITH_TRACING": "false",
            "LANGCHAIN_TRACING_V2": "false",
            "PYTHONUNBUFFERED": "1",
            RUN_DIR_ENV: str(self.run_dir),
            "INTERLEAVE_IMAGE_STORE": self.backing.database_url,
            "INTERLEAVE_TEST_CALL_LOG": str(call_log),
            "INTERLEAVE_TEST_GENERATOR_DELAY": str(delay),
            **self.env,
        })
        command = [str(self.backing.python), "-m", "uvicorn", "aegra_api.main:app",
                   "--host", HOST, "--port", str(self.port), "--no-access-log"]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=self.project, env=environment, stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Aegra {self.name} exited with {self.process.returncode}:\n"
                                     + self.log_tail())
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"Aegra {self.name} did not answer in time:\n" + self.log_tail())

    def kill(self) -> None:
        """SIGKILL, as a machine that dies: no drain, no goodbye to Redis or PostgreSQL."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=40)  # Aegra drains its jobs for up to 30 s
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@pytest.fixture
def make_server(backing: Backing, tmp_path: Path) -> Iterator[Any]:
    """Builds servers on ``backing``, each in a scratch copy of the project folder (only
    aegra.json, and src/ for its graph path) with a run directory of its own; stops them all."""
    servers: list[AegraServer] = []

    def make(
        name: str, config: dict[str, Any] | None = None, files: dict[str, str] | None = None
    ) -> AegraServer:
        # aegra.json as the project has it, updated with ``config``, beside ``files``.
        project = tmp_path / (f"project-{name}" if config or files else "project")
        if not project.exists():
            project.mkdir()
            settings = {**json.loads((REPO / "aegra.json").read_text()), **(config or {})}
            (project / "aegra.json").write_text(json.dumps(settings))
            for file_name, text in (files or {}).items():
                (project / file_name).write_text(text)
            (project / "src").symlink_to(REPO / "src", target_is_directory=True)
        server = AegraServer(name, backing, project, tmp_path / f"runs-{name}",
                             tmp_path / f"server-{name}.log")
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _calls(*logs: Path) -> list[tuple[str, int, int]]:
    """(thread, step, attempt) of every image the test generator drew, from its call logs."""
    found = []
    for log in logs:
        if log.exists():
            for line in log.read_text().splitlines():
                row = json.loads(line)
                found.append((row["thread"], row["step"], row["attempt"]))
    return found


async def _reference(text: str, options: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """The document of the same request run on one machine, by the CLI's code path."""
    result = await arun(text, profile="test", options=RunOptions().with_changes(**options),
                        run_dir=tmp_path / "reference", thread_id=uuid.uuid4().hex)
    return result.document.content_for_comparison()


async def test_aegra_serves_the_graph_state_routes_reviews_and_batches(
    make_server: Any, tmp_path: Path
) -> None:
    """One server, as the README starts it: a run, its state and history, the image routes and
    the document page, Studio's schemas, live events, a refused review answer, a remote batch."""
    import httpx
    from langgraph_sdk import get_client

    from interleave_thinker.remote_batch import arun_remote_batch, server_thread_id

    aegra = make_server("a")
    aegra.start(tmp_path / "calls.jsonl")
    client = get_client(url=aegra.url)

    assistants = await client.assistants.search(graph_id=GRAPH)
    assert assistants, aegra.log_tail()
    schemas = await client.assistants.get_schemas(assistants[0]["assistant_id"])
    assert {"text", "options", "images", "profile"} <= set(schemas["input_schema"]["properties"])
    assert {"plan", "progress", "document"} <= set(schemas["output_schema"]["properties"])

    async with httpx.AsyncClient(base_url=aegra.url, timeout=10.0) as http:
        uploaded = await http.post("/interleave/images", content=_png("teal"))
        assert uploaded.status_code == 201, uploaded.text
        thread_id = (await client.threads.create())["thread_id"]
        graph_input = {"text": REQUEST, "profile": "test", "options": {**SMALL, "max_attempts": 2},
                       "images": [uploaded.json()["sha256"]]}
        events = [
            part.data
            async for part in client.runs.stream(thread_id, GRAPH, input=graph_input,
                                                 stream_mode=["custom", "values"])
            if part.event == "custom"
        ]
        assert events and events[0]["event"] == "plan" and events[-1]["event"] == "document", events
        state = await client.threads.get_state(thread_id)
        values = state["values"]
        assert [step["status"] for step in values["document"]["steps"]] == ["accepted"] * 3
        assert len(values["plan"]["steps"]) == 3 and values["settings"]["profile"] == "test"
        history = await client.threads.get_history(thread_id, limit=50)
        assert len(history) >= 3
        for step in values["document"]["steps"]:
            response = await http.get(f"/interleave/images/{step['image']['sha256']}")
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == step["image"]["sha256"]
        page = await http.get(f"/interleave/threads/{thread_id}/document")
        assert page.status_code == 200 and "A storm tosses it" in page.text
        assert (await http.post("/interleave/images", content=b"no image")).status_code == 400
        missing = await http.get(f"/interleave/images/{'0' * 64}")
        assert missing.status_code == 404 and str(aegra.run_dir) not in missing.text
        # The same input again returns the document without drawing.
        drawn = len(_calls(tmp_path / "calls.jsonl"))
        again = await asyncio.wait_for(client.runs.wait(thread_id, GRAPH, input=graph_input),
                                       RUN_TIMEOUT_S)
        assert again["document"] == values["document"]
        assert len(_calls(tmp_path / "calls.jsonl")) == drawn

    # A bad plan-review answer is refused; the thread keeps waiting for a good one.
    thread_id = (await client.threads.create())["thread_id"]
    graph_input = {"text": REQUEST, "profile": "test", "options": {**SMALL, "review_plan": True}}
    out = await asyncio.wait_for(client.runs.wait(thread_id, GRAPH, input=graph_input), RUN_TIMEOUT_S)
    (asked,) = out["__interrupt__"]
    assert asked["value"]["kind"] == "review_plan"
    refused = await asyncio.wait_for(
        client.runs.wait(thread_id, GRAPH, command={"resume": {"execution_plan": "no"}}), RUN_TIMEOUT_S
    )
    (again_asked,) = refused["__interrupt__"]
    assert again_asked["id"] == asked["id"]
    assert "the edited plan is not valid" in again_asked["value"]["error"]
    assert (await client.threads.get(thread_id))["status"] == "interrupted"
    out = await asyncio.wait_for(client.runs.wait(thread_id, GRAPH, command={"resume": True}),
                                 RUN_TIMEOUT_S)
    assert [step["status"] for step in out["document"]["steps"]] == ["accepted"] * 3

    # `interleave batch --server`: background runs on the queue, the results written here.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"id": f"p{n}", "text": f"Scene {n}. The tide turns."}) + "\n" for n in range(3)
    ))
    local = tmp_path / "client-runs"
    report = await arun_remote_batch(prompts, aegra.url, profile="test", options=RunOptions(**SMALL),
                                     run_dir=local, poll_s=0.2)
    assert [o.status for o in report.outcomes] == ["done"] * 3, report.outcomes
    for outcome in report.outcomes:
        served = aegra.run_dir / "documents" / outcome.thread_id / "document.html"
        assert Path(outcome.document or "").read_bytes() == served.read_bytes()
    again_report = await arun_remote_batch(prompts, aegra.url, profile="test",
                                           options=RunOptions(**SMALL), run_dir=local, poll_s=0.2)
    assert [o.status for o in again_report.outcomes] == ["done"] * 3
    for n in range(3):
        assert len(await client.runs.list(server_thread_id(f"p{n}"))) == 1
    assert "Traceback" not in aegra.log_tail(100_000), aegra.log_tail()


async def test_two_aegra_servers_lose_no_run_and_redraw_nothing_when_one_is_killed(
    make_server: Any, tmp_path: Path
) -> None:
    """Two servers on one PostgreSQL (checkpoints, queue state and the image store) and one
    Redis; 30 background runs; one server is SIGKILLed mid-way and restarted. Every run
    finishes once, no image is drawn twice, and each document is the one-machine document."""
    import httpx
    from langgraph_sdk import get_client

    first, second = make_server("a"), make_server("b")
    logs = {"a": tmp_path / "calls-a.jsonl", "b": tmp_path / "calls-b.jsonl",
            "a2": tmp_path / "calls-a2.jsonl"}
    delay = 0.3
    first.start(logs["a"], delay)  # the first one creates Aegra's tables
    second.start(logs["b"], delay)
    clients = [get_client(url=first.url), get_client(url=second.url)]
    options = {**SMALL, "max_attempts": 2}
    texts = [f"Lantern {n} glows. A moth circles it. Dawn comes." for n in range(30)]
    threads: list[str] = []
    for number, text in enumerate(texts):
        client = clients[number % 2]
        thread_id = (await client.threads.create())["thread_id"]
        await client.runs.create(thread_id, GRAPH, input={"text": text, "profile": "test",
                                                          "options": options}, durability="sync")
        threads.append(thread_id)

    # Kill the first server once it has drawn some images and has runs in flight.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(_calls(logs["a"])) < 6:
        assert time.monotonic() < deadline, first.log_tail()
        await asyncio.sleep(0.1)
    first.kill()
    killed_at = time.monotonic()
    drawn_by_first = {thread for thread, _, _ in _calls(logs["a"])}
    first.start(logs["a2"], delay)  # the same machine comes back

    observer = get_client(url=second.url)
    finished: dict[str, float] = {}
    while len(finished) < len(threads):
        assert time.monotonic() - killed_at < 3 * RUN_TIMEOUT_S, (
            f"{len(finished)} of {len(threads)} runs finished\n" + second.log_tail()
        )
        for thread_id in threads:
            if thread_id not in finished:
                runs = await observer.runs.list(thread_id)
                if runs and runs[0]["status"] not in ("pending", "running"):
                    finished[thread_id] = time.monotonic() - killed_at
        await asyncio.sleep(0.5)

    # No run lost or run twice: each thread has its one run, and it succeeded.
    for thread_id in threads:
        runs = await observer.runs.list(thread_id)
        assert [run["status"] for run in runs] == ["success"], (thread_id, runs, second.log_tail())

    # No image drawn twice, across the three server lives.
    calls = _calls(*logs.values())
    repeated = [call for call, count in Counter(calls).items() if count > 1]
    assert not repeated, repeated
    # Some runs were cut short by the kill and finished elsewhere from their checkpoints.
    moved = {thread for thread, _, _ in _calls(logs["b"], logs["a2"])} & drawn_by_first
    assert moved, "the kill hit no run in flight"

    # Each document is the one-machine document; its images come from either server.
    async with httpx.AsyncClient(base_url=second.url, timeout=10.0) as http:
        for thread_id, text in zip(threads, texts, strict=True):
            values = (await observer.threads.get_state(thread_id))["values"]
            document = Document.model_validate(values["document"])
            expected = await _reference(text, options, tmp_path)
            assert document.content_for_comparison() == expected, thread_id
            for step in document.steps:
                assert step.image is not None
                response = await http.get(f"/interleave/images/{step.image.sha256}")
                assert response.status_code == 200
                assert hashlib.sha256(response.content).hexdigest() == step.image.sha256
    print(f"recovered in {max(finished.values()):.1f} s after the kill; "
          f"{len(moved)} runs moved, {len(calls)} images drawn")


AUTH_MODULE = """
from langgraph_sdk import Auth

auth = Auth()


@auth.authenticate
async def authenticate(headers):
    # Aegra passes str headers (LangGraph's servers bytes) and wants a dict with "identity".
    key = headers.get("x-api-key") or headers.get(b"x-api-key")
    if key not in ("let-me-in", b"let-me-in"):
        raise Auth.exceptions.HTTPException(status_code=401, detail="who are you?")
    return {"identity": "tester"}
"""


async def test_aegra_puts_its_authentication_in_front_of_our_routes(
    make_server: Any, tmp_path: Path
) -> None:
    import httpx

    aegra = make_server("auth", config={"auth": {"path": "./auth.py:auth"}},
                        files={"auth.py": AUTH_MODULE})
    aegra.start(tmp_path / "calls.jsonl")
    async with httpx.AsyncClient(base_url=aegra.url, timeout=10.0) as http:
        for method, path in (("POST", "/interleave/images"), ("GET", f"/interleave/images/{'0' * 64}"),
                             ("GET", "/interleave/threads/x/document")):
            response = await http.request(method, path, content=_png("red") if method == "POST" else None)
            assert response.status_code in (401, 403), (path, response.status_code, response.text)
        key = {"x-api-key": "let-me-in"}
        allowed = await http.post("/interleave/images", content=_png("red"), headers=key)
        assert allowed.status_code == 201, aegra.log_tail()
        served = await http.get(f"/interleave/images/{allowed.json()['sha256']}", headers=key)
        assert served.status_code == 200
