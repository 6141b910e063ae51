"""`interleave resume THREAD` alone resumes a thread whose models are served: the thread records
how each backend was built (kind, name, address; never a key) and a resume builds them again;
a served model is known by its name and kind, not its address, so the same server at
`localhost` is accepted and `--critic-url` moves a thread to another server (for good); threads
from before the specs were recorded still resume. Against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import ormsgpack
import pytest
from typer.testing import CliRunner

from interleave_thinker import runner
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.cli import app
from interleave_thinker.context import model_identity, model_label
from interleave_thinker.errors import ConfigurationError, ReviewRequired
from interleave_thinker.inspect import athread_report
from interleave_thinker.models.profiles import recorded_specs, settings_for_specs, specs_from_settings
from interleave_thinker.models.served import served_chat_model
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import (
    BackendSpec,
    Budget,
    Request,
    RunOptions,
    RunSettings,
    fingerprint_differences,
    identity_without_address,
)
from test_secrets import API_KEY, FakeModels, leaks, leaks_in_tree

HOST = "127.0.0.1"
# "localhost" may resolve to ::1 first; the servers listen on 127.0.0.1 only.
pytestmark = pytest.mark.allow_hosts([HOST, "::1"])
REQUEST = "A kite rises over the dunes. The wind drops. It lands in the grass."


class ModelServer(FakeModels):
    """FakeModels (stand-in planner and critic replies, PIL images) behind a real HTTP server;
    with ``refuse_critic`` the critic's requests get 401 (a refused key: not retried)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_critic = False
        self.port = 0
        self.models: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def localhost_url(self) -> str:
        return f"http://localhost:{self.port}/v1"

    def calls(self, model: str) -> int:
        return self.models.count(model)

    def __call__(self, request: httpx.Request) -> tuple[int, dict[str, Any]]:
        if request.url.path.endswith("/chat/completions"):
            model = json.loads(request.content)["model"]
            self.models.append(model)
            if self.refuse_critic and model == "critic-model":
                self.authorizations.append(request.headers.get("authorization", ""))
                return self._refused(request)
        return super().__call__(request)


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = httpx.Request(
                "POST", f"{server.url}{self.path.removeprefix('/v1')}", headers=dict(self.headers),
                content=body,
            )
            status, payload = server(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], ModelServer]]:
    """Start ModelServers on free ports of 127.0.0.1; the key is in the environment, as a user
    gives it; all servers stop at teardown."""
    for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "INTERLEAVE_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("INTERLEAVE_API_KEY", API_KEY)
    running: list[ThreadingHTTPServer] = []

    def start() -> ModelServer:
        server = ModelServer()
        http = _QuietServer((HOST, 0), _handler(server))
        server.port = http.server_address[1]
        threading.Thread(target=http.serve_forever, args=(0.02,), daemon=True).start()
        running.append(http)
        return server

    yield start
    for http in running:
        http.shutdown()
        http.server_close()


def served_flags(planner: str, critic: str, generator: str) -> list[str]:
    return [
        "--planner", "planner-model", "--planner-url", planner,
        "--critic", "critic-model", "--critic-url", critic,
        "--generator", "image-model", "--generator-url", generator,
        "--size", "64x64", "--max-attempts", "2",
    ]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    text = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.stdout, text


class Thread:
    """One thread in its own run directory, driven through the CLI."""

    def __init__(self, tmp_path: Path, name: str = "served") -> None:
        self.id = name
        self.run_dir = tmp_path / "runs"
        self.where = ["--run-dir", str(self.run_dir)]

    def run(self, *flags: str) -> tuple[int, str, str]:
        return invoke("run", REQUEST, "--thread", self.id, *flags, *self.where)

    def resume(self, *flags: str) -> tuple[int, str, str]:
        return invoke("resume", self.id, *flags, *self.where)

    def settings(self) -> dict[str, Any]:
        code, stdout, stderr = invoke("show", self.id, "--json", *self.where)
        assert code == 0, stderr
        return json.loads(stdout)["settings"]

    def status(self) -> str:
        code, stdout, stderr = invoke("show", self.id, "--json", *self.where)
        assert code == 0, stderr
        return json.loads(stdout)["status"]


def _started_and_stopped_at_the_critic(thread: Thread, server: ModelServer, *flags: str) -> None:
    """Run the thread with the critic refused: it plans and draws, then stops at the critic."""
    server.refuse_critic = True
    code, _, stderr = thread.run(*flags)
    assert code == 1, stderr
    assert "critic" in stderr and "401" in stderr, stderr
    assert server.calls("planner-model") >= 1 and server.calls("critic-model") >= 1
    assert thread.status() != "done"


# -- resuming with no model flags ----------------------------------------------------------------


def test_resume_alone_finishes_a_served_thread_at_its_own_server_and_stores_no_key(
    serve: Callable[[], ModelServer], tmp_path: Path
) -> None:
    server = serve()
    thread = Thread(tmp_path)
    _started_and_stopped_at_the_critic(thread, server, *served_flags(server.url, server.url, server.url))
    stored = thread.settings()
    assert stored["planner"] == "openai-chat:planner-model"  # known by name and kind
    assert stored["backends"]["planner"] == {
        "kind": "served", "model": "planner-model", "base_url": server.url
    }
    assert stored["backends"]["critic"]["base_url"] == server.url
    assert stored["backends"]["generator"] == {
        "kind": "openai-images", "model": "image-model", "base_url": server.url
    }

    server.refuse_critic = False
    critic_calls, planner_calls = server.calls("critic-model"), server.calls("planner-model")
    code, stdout, stderr = thread.resume()
    assert code == 0, stderr
    assert stdout.strip().endswith(".html")
    assert thread.status() == "done"
    # The critic was asked again, at the thread's server; the plan was not made again.
    assert server.calls("critic-model") > critic_calls
    assert server.calls("planner-model") == planner_calls
    # The key went to the server on every request, and nowhere into the run directory (the
    # SQLite checkpoints and their WAL, ledgers, documents).
    assert set(server.authorizations) == {f"Bearer {API_KEY}"}
    assert list(thread.run_dir.glob("checkpoints.sqlite*"))
    assert leaks_in_tree(thread.run_dir) == {}
    assert leaks(json.dumps(thread.settings())) == []


@pytest.mark.parametrize("role", ["critic", "planner", "generator", "all"])
def test_the_same_server_at_localhost_is_the_same_model(
    serve: Callable[[], ModelServer], tmp_path: Path, role: str
) -> None:
    server = serve()
    thread = Thread(tmp_path)
    _started_and_stopped_at_the_critic(thread, server, *served_flags(server.url, server.url, server.url))
    server.refuse_critic = False
    roles = ["planner", "critic", "generator"] if role == "all" else [role]
    moves = [part for name in roles for part in (f"--{name}-url", server.localhost_url)]
    code, _, stderr = thread.resume(*moves)
    assert code == 0, stderr
    assert "other settings" not in stderr
    backends = thread.settings()["backends"]
    for name in ("planner", "critic", "generator"):
        assert backends[name]["base_url"] == (server.localhost_url if name in roles else server.url)


def test_critic_url_moves_the_thread_to_another_server_for_good(
    serve: Callable[[], ModelServer], tmp_path: Path
) -> None:
    first, second = serve(), serve()
    thread = Thread(tmp_path)
    _started_and_stopped_at_the_critic(thread, first, *served_flags(first.url, first.url, first.url))
    first_critic_calls = first.calls("critic-model")

    # Moved to the second server, which refuses the critic too: the resume fails there...
    second.refuse_critic = True
    code, _, stderr = thread.resume("--critic-url", second.url)
    assert code == 1 and "401" in stderr, stderr
    assert second.calls("critic-model") >= 1 and first.calls("critic-model") == first_critic_calls
    # ...and the thread remembers the move: a plain resume goes to the second server again.
    assert thread.settings()["backends"]["critic"]["base_url"] == second.url
    second.refuse_critic = False
    code, _, stderr = thread.resume()
    assert code == 0, stderr
    assert first.calls("critic-model") == first_critic_calls
    assert second.calls("critic-model") > 1
    assert second.calls("planner-model") == 0  # only the critic moved
    assert thread.settings()["backends"]["planner"]["base_url"] == first.url


# -- threads from before the specs were recorded -------------------------------------------------


def _as_stored_before_specs(settings: RunSettings) -> RunSettings:
    """Settings as threads stored them before BackendSpecs: no specs, addresses in identities."""
    specs = settings.backends
    assert specs is not None
    return settings.model_copy(update={
        "backends": None,
        "planner": f"{settings.planner}@{specs.planner.base_url}",
        "critic": f"{settings.critic}@{specs.critic.base_url}",
        "generator": f"openai-images:{specs.generator.base_url}:{specs.generator.model}",
    })


@pytest.mark.parametrize("flags", [(), ("--critic-url", "LOCALHOST")], ids=["plain", "localhost"])
def test_an_old_thread_with_addresses_in_its_identities_resumes(
    serve: Callable[[], ModelServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...]
) -> None:
    server = serve()
    thread = Thread(tmp_path)
    make_settings = runner.make_settings
    with monkeypatch.context() as patch:
        patch.setattr(runner, "make_settings", lambda *args: _as_stored_before_specs(make_settings(*args)))
        _started_and_stopped_at_the_critic(thread, server, *served_flags(server.url, server.url, server.url))
    old = thread.settings()
    assert old["backends"] is None and old["critic"] == f"openai-chat:critic-model@{server.url}"

    server.refuse_critic = False
    code, _, stderr = thread.resume(
        *[server.localhost_url if flag == "LOCALHOST" else flag for flag in flags]
    )
    assert code == 0, stderr
    # The resume recorded what it rebuilt: specs, and identities without addresses.
    now = thread.settings()
    assert now["critic"] == "openai-chat:critic-model"
    assert now["generator"] == "openai-images:image-model"
    assert now["backends"]["planner"] == {"kind": "served", "model": "planner-model", "base_url": server.url}
    assert now["backends"]["critic"]["base_url"] == (server.localhost_url if flags else server.url)


def test_a_checkpoint_written_before_specs_loads_with_none() -> None:
    """RunSettings is strictly validated when read: a record without ``backends`` still loads."""
    fields = {
        "profile": "default", "planner": "openai-chat:p@http://127.0.0.1:8000/v1",
        "critic": "transformers:/models/critic", "generator": "diffusers:/models/flux (X, steps=4, "
        "guidance=1, dtype=float32, device=cpu)", "prompts": "interleave",
        "options": {"width": 64, "height": 64},
    }
    ext = ormsgpack.Ext(5, ormsgpack.packb(
        (RunSettings.__module__, "RunSettings", fields, "model_validate_json")
    ))
    loaded = make_serializer().loads_typed(("msgpack", ormsgpack.packb(ext)))
    assert isinstance(loaded, RunSettings) and loaded.backends is None
    specs = recorded_specs(loaded)
    assert specs.planner == BackendSpec(kind="served", model="p", base_url="http://127.0.0.1:8000/v1")
    assert specs.critic == BackendSpec(kind="transformers", model="/models/critic")
    assert specs.generator == BackendSpec(kind="diffusers", model="/models/flux")


# -- refusals ------------------------------------------------------------------------------------


def test_a_refused_resume_never_suggests_the_command_that_was_refused(
    serve: Callable[[], ModelServer], tmp_path: Path
) -> None:
    server = serve()
    thread = Thread(tmp_path)
    _started_and_stopped_at_the_critic(thread, server, *served_flags(server.url, server.url, server.url))
    server.refuse_critic = False

    code, _, stderr = thread.resume("--critic", "other-critic")
    assert code == 1
    assert "critic: thread has" in stderr and "other-critic" in stderr
    assert "leave out --critic " in stderr
    assert f"interleave resume {thread.id}" not in stderr

    code, _, stderr = thread.resume("--max-attempts", "3")
    assert code == 1 and "options.budget.max_attempts" in stderr
    assert "leave out the run options that differ" in stderr
    assert f"interleave resume {thread.id}" not in stderr
    # Nothing was recorded by the refused resumes; the thread still finishes as it was.
    code, _, stderr = thread.resume()
    assert code == 0, stderr


def test_a_served_model_is_known_by_name_and_kind_and_labelled_with_its_address() -> None:
    one = served_chat_model("m", base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    two = served_chat_model("m", base_url="http://localhost:9000/v1", api_key="EMPTY")
    assert model_identity(one) == model_identity(two) == "openai-chat:m"
    assert model_label(one) == "openai-chat:m@http://127.0.0.1:8000/v1"
    secret = served_chat_model("m", base_url=f"http://u:{API_KEY}@models.test/v1", api_key="EMPTY")
    assert leaks(model_label(secret)) == [] and "models.test/v1" in model_label(secret)


@pytest.mark.parametrize(("old", "new"), [
    ("openai-chat:m@http://127.0.0.1:8000/v1", "openai-chat:m"),
    ("openai-chat:m@https://***@models.test/v1?api-key=***", "openai-chat:m"),
    ("openai-images:http://127.0.0.1:8000/v1:Qwen/Qwen-Image", "openai-images:Qwen/Qwen-Image"),
    ("openai-images:api.openai.com:gpt-image-1", "openai-images:gpt-image-1"),
    ('openai-images:http://h:1/v1:m ({"steps": 8})', 'openai-images:m ({"steps": 8})'),
    ("transformers:/models/critic", "transformers:/models/critic"),
    ("interleave-test-planner", "interleave-test-planner"),
])
def test_old_identities_compare_without_their_addresses(old: str, new: str) -> None:
    assert identity_without_address(old) == new
    request = Request(text="x")
    base = RunSettings(profile="default", planner="p", critic="c", generator="g")
    stored = base.model_copy(update={"planner": old})
    assert fingerprint_differences(
        stored.fingerprint(request), base.model_copy(update={"planner": new}).fingerprint(request)
    ) == []


def test_specs_never_hold_credentials_and_a_resume_asks_for_the_address_again() -> None:
    settings = ModelSettings(
        planner="p", planner_url=f"https://user:{API_KEY}@models.test/v1?api-key={API_KEY}",
        critic="/models/critic", generator="g", generator_url="http://127.0.0.1:8000/v1",
    )
    specs = specs_from_settings(settings)
    assert leaks(specs.model_dump_json()) == []
    assert specs.planner.base_url == "https://***@models.test/v1?api-key=***"
    assert (specs.critic.kind, specs.generator.kind) == ("transformers", "openai-images")
    with pytest.raises(ConfigurationError) as refused:
        settings_for_specs(specs)
    assert "held credentials" in str(refused.value) and "--planner-url" in (refused.value.hint or "")
    # Given again, the address is used; everything else comes from the specs.
    again = settings_for_specs(specs, ModelSettings(planner_url="https://models.test/v1"))
    assert (again.planner, again.planner_url, again.critic, again.critic_url) == (
        "p", "https://models.test/v1", "/models/critic", None
    )
    assert (again.generator, again.generator_url) == ("g", "http://127.0.0.1:8000/v1")


async def test_a_plan_review_answered_in_python_moves_the_critic_as_it_resumes(
    serve: Callable[[], ModelServer], tmp_path: Path
) -> None:
    """The Python API: fields set on ModelSettings replace the recorded ones, also together with
    an answer to a paused review (one Command carries both)."""
    first, second = serve(), serve()
    settings = ModelSettings(
        planner="planner-model", planner_url=first.url, critic="critic-model", critic_url=first.url,
        generator="image-model", generator_url=first.url,
    )
    options = RunOptions(width=64, height=64, review_plan=True, budget=Budget(max_attempts=2))
    run_dir = tmp_path / "runs"
    with pytest.raises(ReviewRequired):
        await runner.arun(REQUEST, model_settings=settings, options=options, thread_id="review",
                          run_dir=run_dir)
    result = await runner.aresume(
        "review", review=True, model_settings=ModelSettings(critic_url=second.url), run_dir=run_dir
    )
    assert result.document.steps
    assert first.calls("critic-model") == 0 and second.calls("critic-model") >= 1
    report = await athread_report("review", run_dir=run_dir)
    assert report["settings"]["backends"]["critic"]["base_url"] == second.url
    assert report["settings"]["backends"]["planner"]["base_url"] == first.url
