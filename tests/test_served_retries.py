"""Served planner and critic failures through the real ChatOpenAI and openai SDK, raised by a real
local HTTP server that fails: a closed port, 503, 429, a connection cut mid-reply, a reply slower
than the request timeout. Each is retried by the graph and, when the retries run out, stops the
run with a message that says what happened and how to resume; structured replies cut at the
token limit are re-asked like any unreadable reply."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from langchain_openai.chat_models import base as langchain_openai_base
from langgraph.types import RetryPolicy

from conftest import RecordingGenerator, scripted
from interleave_thinker.context import Backends
from interleave_thinker.errors import ModelCallError, ModelOutputError, TransientModelError
from interleave_thinker.inspect import alist_threads
from interleave_thinker.models.served import served_chat_model, structured_binding
from interleave_thinker.nodes import retrying
from interleave_thinker.nodes.asking import ask_until_parsed
from interleave_thinker.prompts.parsing import parse_verdict
from interleave_thinker.prompts.schemas import VerdictAnswer
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions
from test_graph import plan_reply, step, verdict_reply

HOST = "127.0.0.1"
MODEL = "served-test-model"
pytestmark = pytest.mark.allow_hosts([HOST])

# The production policy's shape (tries with doubling sleeps) with tiny sleeps and three tries.
FAST_RETRY = RetryPolicy(
    max_attempts=3, initial_interval=0.01, backoff_factor=2.0, jitter=False, retry_on=retrying.is_transient
)
# Seconds per request: a "slow" reply takes longer than this.
REQUEST_TIMEOUT = 0.3
PLAN = plan_reply([step(1, "a lamp")])
YES = verdict_reply(True)


@pytest.fixture(autouse=True)
def fast_graph_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "MODEL_RETRY", FAST_RETRY)


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("INTERLEAVE_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def fast_sdk_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own backoff (0.5 s doubling) shrunk to milliseconds."""
    import openai._base_client as base_client

    monkeypatch.setattr(base_client, "INITIAL_RETRY_DELAY", 0.001)
    monkeypatch.setattr(base_client, "MAX_RETRY_DELAY", 0.002)


# -- a chat server that fails on cue ---------------------------------------------------------------


def completion(content: str, finish_reason: str = "stop", tokens: int = 5) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens},
    }


# What the server does with one request: a fault's name, or a reply's text.
FAULTS = ("503", "429", "cut", "slow")


@dataclass
class ChatServer:
    """A real HTTP server on 127.0.0.1 answering /v1/chat/completions from a script.

    Each request takes the next item of ``script`` (the last one repeats): a status such as
    ``"503"`` answers that status with an error body, ``"cut"`` sends the start of a reply and
    closes the socket, ``"slow"`` waits past the request timeout, a ``Reply`` answers 200 with
    its text.
    """

    script: list[Any]
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def next_action(self, body: dict[str, Any]) -> Any:
        self.bodies.append(body)
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


@dataclass
class Reply:
    content: str
    finish_reason: str = "stop"


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = server.next_action(body)
            if action == "slow":
                # Woken at teardown; the client gave up long before.
                server.stopping.wait(REQUEST_TIMEOUT * 10)
                self.close_connection = True
                return
            if action == "cut":
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                    b'{"id": "chatcmpl-1", "choi'
                )
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if isinstance(action, str) and action.isdigit():
                self._send(int(action), {"error": {"message": f"server says {action}"}})
                return
            self._send(200, completion(action.content, action.finish_reason))

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a slow reply leaves a broken pipe behind: expected here.
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., ChatServer]]:
    """Start a ChatServer (on ``port``, or a free one); all are stopped at teardown."""
    running: list[tuple[ChatServer, ThreadingHTTPServer]] = []

    def start(*script: Any, port: int = 0) -> ChatServer:
        server = ChatServer(list(script))
        http = _QuietServer((HOST, port), _handler(server))
        server.port = http.server_address[1]
        threading.Thread(target=http.serve_forever, args=(0.02,), daemon=True).start()
        running.append((server, http))
        return server

    yield start
    for server, http in running:
        server.stopping.set()
        http.shutdown()
        http.server_close()


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def served(url: str, *, max_retries: int = 0) -> BaseChatModel:
    return served_chat_model(MODEL, base_url=url, max_retries=max_retries, timeout=REQUEST_TIMEOUT)


def small(**changes: Any) -> RunOptions:
    return RunOptions(width=64, height=64).with_changes(**changes)


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/checkpoints.sqlite"


async def status_of(thread: str, run_dir: Path, ckpt: str) -> str:
    threads = await alist_threads(run_dir=run_dir, checkpointer=ckpt)
    return {t.thread_id: t.status for t in threads}[thread]


# -- which errors are transient --------------------------------------------------------------------


async def raised_by(url: str, **settings: Any) -> Exception:
    try:
        await served(url, **settings).ainvoke("hi")
    except Exception as exc:
        return exc
    raise AssertionError("the call did not fail")


@pytest.mark.parametrize("fault", ["refused", *FAULTS])
async def test_every_server_fault_raises_an_error_the_graph_retries(
    fault: str, serve: Callable[..., ChatServer]
) -> None:
    url = f"http://{HOST}:{closed_port()}/v1" if fault == "refused" else serve(fault).url
    error = await raised_by(url)
    # langchain-openai (from 1.6) re-raises the SDK's errors as its own subclasses of them: the
    # module name is langchain_openai's, the base classes are the SDK's.
    wraps = hasattr(langchain_openai_base, "OpenAIConnectionError")
    assert type(error).__module__ == (langchain_openai_base.__name__ if wraps else "openai")
    assert isinstance(error, openai.APIError)
    assert retrying.is_transient(error)
    expected = {
        "refused": openai.APIConnectionError,
        "cut": openai.APIConnectionError,
        "slow": openai.APITimeoutError,
        "503": openai.InternalServerError,
        "429": openai.RateLimitError,
    }[fault]
    assert isinstance(error, expected)


@pytest.mark.parametrize(
    ("status", "transient"),
    [(400, False), (401, False), (403, False), (404, False), (422, False),
     (408, True), (409, True), (429, True), (500, True), (502, True), (503, True), (504, True)],
)
def test_sdk_status_errors_are_transient_for_the_statuses_the_sdk_retries(
    status: int, transient: bool
) -> None:
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(status, request=request)
    client = openai.OpenAI(api_key="EMPTY", base_url="http://127.0.0.1/v1")
    error = client._make_status_error("boom", body=None, response=response)
    assert isinstance(error, openai.APIStatusError)
    assert retrying.is_transient(error) is transient


def test_langchain_model_errors_say_themselves_whether_to_retry() -> None:
    from langchain_core import exceptions

    if not hasattr(exceptions, "ModelError"):
        pytest.skip("this langchain-core has no provider-neutral model errors")
    assert retrying.is_transient(exceptions.ModelRateLimitError("slow down"))
    assert retrying.is_transient(exceptions.ModelConnectionError("unreachable"))
    assert not retrying.is_transient(exceptions.ModelAuthenticationError("bad key"))
    assert not retrying.is_transient(exceptions.ContextOverflowError("too long"))
    assert not retrying.is_transient(openai.LengthFinishReasonError.__new__(openai.LengthFinishReasonError))


# -- retried by the graph --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_served_planner_that_fails_twice_is_retried_to_a_document(
    fault: str, serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    server = serve(fault, fault, Reply(PLAN))
    result = await arun(
        "lamp",
        backends=Backends(planner=served(server.url), critic=scripted([YES]), generator=RecordingGenerator()),
        options=small(), run_dir=run_dir, checkpointer=ckpt,
    )
    assert [s.status for s in result.document.steps] == ["accepted"]
    # max_retries=0: each of the graph's three tries sent one request.
    assert len(server.bodies) == 3


async def test_a_served_critic_that_is_overloaded_is_retried(
    serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    server = serve("503", "429", Reply(YES))
    result = await arun(
        "lamp",
        backends=Backends(planner=scripted([PLAN]), critic=served(server.url),
                          generator=RecordingGenerator()),
        options=small(), run_dir=run_dir, checkpointer=ckpt,
    )
    assert [s.status for s in result.document.steps] == ["accepted"]
    assert len(server.bodies) == 3


@pytest.mark.usefixtures("fast_sdk_retries")
async def test_the_sdk_retries_inside_each_graph_try(
    serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    server = serve("503")
    with pytest.raises(TransientModelError):
        await arun(
            "lamp",
            backends=Backends(planner=served(server.url, max_retries=2), critic=scripted([YES]),
                              generator=RecordingGenerator()),
            options=small(), run_dir=run_dir, checkpointer=ckpt,
        )
    # Three graph tries, each one request and two SDK retries.
    assert len(server.bodies) == 9


# -- when the retries run out ----------------------------------------------------------------------

CAUSES = {
    "refused": "could not be reached",
    "cut": "could not be reached",
    "slow": "did not answer in time",
    "503": "was overloaded or failing (HTTP 503)",
    "429": "was overloaded (429 Too Many Requests)",
}


@pytest.mark.parametrize("fault", list(CAUSES))
async def test_retries_run_out_into_a_message_that_says_what_happened_and_how_to_resume(
    fault: str, serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    if fault == "refused":
        port = closed_port()
        url = f"http://{HOST}:{port}/v1"
    else:
        server = serve(fault)
        url = server.url
    generator = RecordingGenerator()
    with pytest.raises(TransientModelError) as caught:
        await arun(
            "lamp",
            backends=Backends(planner=served(url), critic=scripted([YES]), generator=generator),
            options=small(), run_dir=run_dir, checkpointer=ckpt, thread_id="served",
        )
    error = caught.value
    assert str(error).startswith(f"thread served, planning: planner openai-chat:{MODEL}@{url} ")
    assert f"{CAUSES[fault]} (try 3 of 3)" in str(error)
    assert CAUSES[fault] in error.hint
    assert "interleave resume THREAD" in error.hint
    # Not the hint for a refused key or a wrong address: the server was simply not there.
    for wrong in ("URL", "API key", "name"):
        assert wrong not in error.hint
    assert await status_of("served", run_dir, ckpt) == "failed"

    # Once the server answers, the thread resumes where it stopped.
    if fault == "refused":
        serve(Reply(PLAN), port=port)
    else:
        server.script = [Reply(PLAN)]
    result = await aresume(
        "served",
        backends=Backends(planner=served(url), critic=scripted([YES]), generator=generator),
        run_dir=run_dir, checkpointer=ckpt,
    )
    assert [s.status for s in result.document.steps] == ["accepted"]


@pytest.mark.parametrize("status", ["401", "404"])
async def test_a_refused_key_or_unknown_model_is_not_retried_and_says_to_check_them(
    status: str, serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    server = serve(status)
    with pytest.raises(ModelCallError) as caught:
        await arun(
            "lamp",
            backends=Backends(planner=served(server.url), critic=scripted([YES]),
                              generator=RecordingGenerator()),
            options=small(), run_dir=run_dir, checkpointer=ckpt,
        )
    assert len(server.bodies) == 1
    assert "(try 1 of 3)" in str(caught.value)
    assert "API key" in caught.value.hint


# -- replies cut at the token limit ----------------------------------------------------------------

VERDICT_JSON = '{"previous_step_success": true, "refine_prompt": null}'


async def test_a_structured_reply_cut_at_the_token_limit_is_reasked(serve: Callable[..., ChatServer]) -> None:
    server = serve(Reply('{"previous_step_success": tr', "length"), Reply(VERDICT_JSON))
    model = structured_binding(served(server.url), VerdictAnswer, "verdict")
    critique, text = await ask_until_parsed(
        model, [HumanMessage("Did it work?")], parse_verdict, what="verdict", max_reasks=2, where="here"
    )
    assert critique.success and text == VERDICT_JSON
    assert len(server.bodies) == 2
    # The re-ask shows the model the part it wrote and says what was wrong with it.
    *_, echo, complaint = server.bodies[1]["messages"]
    assert echo == {"role": "assistant", "content": '{"previous_step_success": tr'}
    assert "token limit (5 tokens)" in complaint["content"]


async def test_replies_always_cut_end_in_an_unreadable_reply_error_that_says_to_raise_the_limit(
    serve: Callable[..., ChatServer],
) -> None:
    server = serve(Reply('{"previous_', "length"))
    model = structured_binding(served(server.url), VerdictAnswer, "verdict")
    with pytest.raises(ModelOutputError) as caught:
        await ask_until_parsed(
            model, [HumanMessage("Did it work?")], parse_verdict, what="verdict", max_reasks=2, where="here"
        )
    assert len(server.bodies) == 3
    assert "could not be read after 3 tries" in str(caught.value)
    assert "token limit" in str(caught.value)
    assert "max_new_tokens" in caught.value.hint
    assert not isinstance(caught.value, (TransientModelError, ModelCallError))


async def test_a_cut_critic_reply_in_a_structured_run_is_reasked_not_a_failure(
    serve: Callable[..., ChatServer], run_dir: Path, ckpt: str
) -> None:
    plan_json = json.dumps({"execution_plan": [step(1, "a red kite")]})
    server = serve(Reply('{"previous_step_success"', "length"), Reply(VERDICT_JSON))
    result = await arun(
        "kite",
        backends=Backends(planner=scripted([plan_json]), critic=served(server.url),
                          generator=RecordingGenerator()),
        options=small(output_mode="structured"), run_dir=run_dir, checkpointer=ckpt,
    )
    assert [s.status for s in result.document.steps] == ["accepted"]
    assert len(server.bodies) == 2
    assert server.bodies[0]["response_format"]["type"] == "json_schema"
