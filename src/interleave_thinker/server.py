"""The trajectory graph for an agent server: `langgraph dev` (development) or Aegra (production).

The graph is ``prepare`` (the client's JSON becomes the trajectory's request and settings) then
``trajectory`` (the trajectory graph as a subgraph, with live models in its context, under the
thread's lease). The extra HTTP routes (image bytes, uploads, document pages) are in
``routes.py``; ``aegra.py`` is what Aegra loads.

Everything on the server's event loop stays non-blocking: files, settings, models, leases and
the run directory are touched in worker threads (``langgraph dev`` fails a run that blocks).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphInterrupt
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Interrupt
from typing_extensions import Required, TypedDict  # noqa: UP035 - one implementation for both

from interleave_thinker.checkpoints.leases import thread_lease
from interleave_thinker.context import Backends, Timeouts
from interleave_thinker.errors import (
    ConfigurationError,
    InterleaveError,
    SettingsMismatchError,
    one_line,
)
from interleave_thinker.graph import build_graph, recursion_limit
from interleave_thinker.models.profiles import DEFAULT_PROFILE
from interleave_thinker.nodes.common import thread_of
from interleave_thinker.nodes.review import REVIEW_KINDS, check_review_answer
from interleave_thinker.prompts.packs import PromptPack
from interleave_thinker.runner import (
    check_request_text,
    choose_models,
    make_settings,
    refuse_other_settings,
    trajectory_input,
)
from interleave_thinker.settings import load_model_settings
from interleave_thinker.state import (
    Document,
    ImageRef,
    Request,
    RunOptions,
    RunSettings,
    TrajectoryState,
)
from interleave_thinker.storage.stores import is_postgres_store
from interleave_thinker.workspace import RUN_DIR_ENV, Workspace

__all__ = [
    "ROUTE_PREFIX",
    "SERVER_GRAPH_NAME",
    "ServerContext",
    "ServerInput",
    "ServerOutput",
    "ServerState",
    "app",
    "build_server_graph",
    "graph",
    "hide_paths",
    "make_app",
    "server_workspace",
]

SERVER_GRAPH_NAME = "interleave"
ROUTE_PREFIX = "/interleave"

TRAJECTORY_KEYS: tuple[str, ...] = tuple(TrajectoryState.__annotations__)

# The trajectory's records again, as a typing_extensions TypedDict: pydantic builds JSON schemas
# (Studio's input form, the server's /schemas) only from those on Python < 3.12; from
# typing.TypedDict (state.py's) it gives an empty schema there.
ServerOutput = TypedDict(  # type: ignore[misc]
    "ServerOutput", get_type_hints(TrajectoryState), total=False
)
ServerOutput.__doc__ = "A thread's trajectory records: request, settings, plan, progress, document."
ServerOutput.__module__ = __name__


class ServerInput(TypedDict, total=False):
    """A run's input as an HTTP client sends it: plain JSON, images by reference only."""

    text: Required[str]
    # RunOptions fields; budget fields may be nested under "budget" or named directly
    # ({"max_attempts": 2, "width": 256}), as the CLI's flags name them.
    options: dict[str, Any]
    # Images uploaded first (POST /interleave/images): each the sha256 or the returned ImageRef.
    images: list[str | dict[str, Any]]
    # Which backends to run; may also come from the run's or the assistant's context.
    profile: str


class ServerState(ServerOutput, ServerInput, total=False):  # type: ignore[misc,valid-type]
    """The thread's state on the server: the client's input beside the trajectory's records."""


@dataclass(frozen=True)
class ServerContext:
    """What a run or an assistant may set besides the input: the profile of backends to use.

    The run directory (documents, and images unless ``$INTERLEAVE_IMAGE_STORE`` names another
    store) is the server's own setting, ``$INTERLEAVE_RUN_DIR``: a path sent over the network must
    not choose where files are written.
    """

    profile: str | None = None


# One compiled trajectory graph for every run: it borrows the server's checkpointer at run time.
TRAJECTORY = build_graph()


@dataclass(frozen=True)
class _Loaded:
    backends: Backends
    pack: PromptPack
    timeouts: Timeouts


_MODELS: dict[tuple[str, bool], tuple[Backends, PromptPack]] = {}
_TIMEOUTS: dict[tuple[str, bool], Timeouts] = {}
_MODELS_LOCK = threading.Lock()


def _load_models(profile: str, paper: bool) -> _Loaded:
    # Real models take minutes and gigabytes to load, so each profile is built once per server
    # process (models, prompt pack and timeouts from $INTERLEAVE_* / $INTERLEAVE_CONFIG) and shared.
    key = (profile, paper)
    with _MODELS_LOCK:
        if key not in _MODELS or key not in _TIMEOUTS:
            model_settings = load_model_settings()
            if key not in _MODELS:
                _, backends, pack = choose_models(profile, None, model_settings, paper=paper)
                _MODELS[key] = (backends, pack)
            # The same per-call limits as the CLI's (--generator-timeout, --model-timeout).
            _TIMEOUTS[key] = Timeouts.chosen(None, model_settings)
        backends, pack = _MODELS[key]
        return _Loaded(backends, pack, _TIMEOUTS[key])


async def _models(profile: str, paper: bool = False) -> _Loaded:
    # Loading models and reading settings files block; the server's event loop must not.
    return await asyncio.to_thread(_load_models, profile, paper)


async def server_workspace() -> Workspace:
    """The server's run directory and image store (``$INTERLEAVE_RUN_DIR``,
    ``$INTERLEAVE_IMAGE_STORE``), opened in a worker thread."""
    return await asyncio.to_thread(Workspace.open)


def _lease_url(workspace: Workspace) -> str | None:
    """Where the server path takes a thread's lease: in PostgreSQL when the images are there
    (servers on many machines share nothing else), else a lock file under the run directory."""
    url = workspace.image_store_url
    return url if is_postgres_store(url) else None


# An absolute path as our messages quote one (/srv/runs/images/ab.png, ~/x, ./y); not a URL
# (http://host/x) nor our own routes (/interleave/...), which clients need to see.
_PATH = re.compile(r"(?<![\w.:/~-])(?:~|\.{1,2})?/(?!interleave/)[^\s'\"`,;()\[\]<>]+")


def hide_paths(text: str) -> str:
    """``text`` with the server's file paths replaced by ``<path>``: they say nothing a client
    can act on and show how the server is laid out."""
    run_dir = os.environ.get(RUN_DIR_ENV, "").rstrip("/")
    if run_dir:
        # Also a relative run directory, and whatever path continues it.
        for form in {str(Path(run_dir).absolute()), run_dir}:
            text = text.replace(form, "/run-dir")
    return _PATH.sub("<path>", text)


_SHOWN_KINDS: dict[type[InterleaveError], type[InterleaveError]] = {}


def _shown_str(self: InterleaveError) -> str:
    return f"{self.message} (hint: {self.hint})" if self.hint else self.message


def _shown_to_client(error: InterleaveError) -> InterleaveError:
    """The same error, also a ValueError: the server tells clients the message of ValueErrors
    only (any other error reads "An internal error occurred"), and ours say what to do. File
    paths are left out of the text (see ``hide_paths``)."""
    kind = type(error)
    shown_kind = _SHOWN_KINDS.get(kind)
    if shown_kind is None:
        shown_kind = _SHOWN_KINDS[kind] = type(
            kind.__name__, (kind, ValueError), {"__module__": kind.__module__, "__str__": _shown_str}
        )
    # Built without calling __init__ (some of ours take other arguments): the same fields.
    shown = shown_kind.__new__(shown_kind, *error.args)
    shown.__dict__.update(error.__dict__)
    shown.message, shown.hint = hide_paths(error.message), hide_paths(error.hint)
    shown.args = (shown.message,)
    return shown


def _errors_shown_to_client(
    node: Callable[..., Awaitable[dict[str, Any]]],
) -> Callable[..., Awaitable[dict[str, Any]]]:
    @functools.wraps(node)
    async def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return await node(*args, **kwargs)
        except InterleaveError as exc:
            if isinstance(exc, ValueError):
                raise
            raise _shown_to_client(exc) from exc

    return wrapper


def _chosen_profile(from_input: str | None, context: ServerContext | None) -> str:
    from_context = context.profile if context is not None else None
    if from_input and from_context and from_input != from_context:
        raise ConfigurationError(
            f"the input asks for profile {from_input!r} but the context for {from_context!r}",
            hint="name the profile in one place, the input or the context",
        )
    return from_input or from_context or DEFAULT_PROFILE


def _options(raw: object) -> RunOptions:
    if raw is None:
        return RunOptions()
    if not isinstance(raw, dict):
        raise ConfigurationError(
            f"options must be a JSON object, not {type(raw).__name__}",
            hint='for example {"max_attempts": 2, "width": 512, "height": 512, "seed": 7}',
        )
    try:
        return RunOptions().with_changes(**raw)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigurationError(
            f"options are not valid: {one_line(exc)}",
            hint="use RunOptions field names; budget fields may be named directly",
        ) from exc


def _input_images(workspace: Workspace, items: object) -> list[ImageRef]:
    if not isinstance(items, list):
        raise ConfigurationError(
            "images must be a list of image hashes or references",
            hint=f"upload each image with POST {ROUTE_PREFIX}/images and pass what it returns",
        )
    store = workspace.image_store
    refs = []
    for item in items:
        sha256 = item.get("sha256") if isinstance(item, dict) else item
        if not isinstance(sha256, str):
            raise ConfigurationError(
                f"input image {item!r} names no sha256",
                hint=f"upload it with POST {ROUTE_PREFIX}/images and pass what it returns",
            )
        # find() verifies the bytes, so a reference cannot name an image the store lacks.
        refs.append(store.find(sha256))
    return refs


_SERVER_RESUME_HINT = "resume it with its own settings (input null, the same profile) " \
    "or start a new thread"


@_errors_shown_to_client
async def prepare_request(state: ServerState, runtime: Runtime[ServerContext]) -> dict[str, Any]:
    """Turn the client's JSON into the trajectory's request and settings; on a thread that has
    them, accept the same request again and refuse any other."""
    # The same rules as the CLI and arun: not empty, not over the length limit, no control codes.
    text = check_request_text(state.get("text"))
    profile = _chosen_profile(state.get("profile"), runtime.context)
    options = _options(state.get("options"))
    loaded = await _models(profile, options.paper)
    workspace = await server_workspace()
    images = await asyncio.to_thread(_input_images, workspace, state.get("images") or [])
    request = Request(text=text, images=tuple(images))
    settings = make_settings(profile, loaded.backends, options, loaded.pack)
    stored_request, stored_settings = state.get("request"), state.get("settings")
    if stored_request is not None and stored_settings is not None:
        # The same request again on this thread continues it (or returns its document); another
        # one would mix two runs in one thread, as the CLI also refuses.
        refuse_other_settings(
            thread_of(runtime),
            (stored_request, stored_settings),
            (request, settings),
            hint=_SERVER_RESUME_HINT,
        )
        return {}
    return dict(trajectory_input(request, settings))


# --- Review answers, checked before the trajectory sees them ----------------------------------

try:  # LangGraph's names for what a node's config carries; stable strings, private module.
    from langgraph._internal._constants import (
        CONFIG_KEY_CHECKPOINT_NS,
        CONFIG_KEY_CHECKPOINTER,
        CONFIG_KEY_RESUME_MAP,
        CONFIG_KEY_SCRATCHPAD,
    )
except ImportError:  # pragma: no cover - older or newer LangGraph layouts
    CONFIG_KEY_CHECKPOINT_NS = "checkpoint_ns"
    CONFIG_KEY_CHECKPOINTER = "__pregel_checkpointer"
    CONFIG_KEY_RESUME_MAP = "__pregel_resume_map"
    CONFIG_KEY_SCRATCHPAD = "__pregel_scratchpad"


async def _refuse_bad_answer(config: RunnableConfig, thread_id: str) -> None:
    """Refuse a review answer (``Command(resume=...)``) that does not fit the review the thread
    waits for, before the trajectory's interrupt() takes it.

    The review node would fail on it, and the answer, once taken, would stay recorded against
    the thread: every later run would fail the same way. Refused here, the run ends interrupted
    on the same review (the same interrupt id), its value carrying ``error`` and ``hint``; the
    thread keeps waiting (Aegra accepts resume commands only on interrupted threads) and the
    next answer replaces the refused one. As ``interleave resume --plan`` refuses a broken plan.
    """
    conf = config.get("configurable", {})
    scratchpad = conf.get(CONFIG_KEY_SCRATCHPAD)
    resume_map = conf.get(CONFIG_KEY_RESUME_MAP) or {}
    null_answer = scratchpad.get_null_resume(False) if scratchpad is not None else None
    if null_answer is None and not resume_map:
        return
    inner = {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": conf.get(CONFIG_KEY_CHECKPOINT_NS, ""),
            CONFIG_KEY_CHECKPOINTER: conf.get(CONFIG_KEY_CHECKPOINTER),
        }
    }
    snapshot = await TRAJECTORY.aget_state(inner)
    for pending in snapshot.interrupts:
        kind = pending.value.get("kind") if isinstance(pending.value, dict) else None
        if kind not in REVIEW_KINDS:
            continue
        answer = resume_map.get(pending.id, null_answer)
        if answer is None:
            continue
        try:
            _check_answer(kind, answer, snapshot.values)
        except ConfigurationError as exc:
            refused = _shown_to_client(exc)
            value = {**pending.value, "error": refused.message, "hint": refused.hint}
            raise GraphInterrupt((Interrupt(value=value, id=pending.id),)) from None


def _check_answer(kind: str, answer: Any, values: dict[str, Any]) -> None:
    if kind == "review_plan" and answer is not True and not isinstance(answer, dict):
        raise ConfigurationError(
            f"the answer to a plan review must be true or an edited plan, not {str(answer)[:40]!r}",
            hint='send true to keep the plan, or {"execution_plan": [...]} as the review showed it',
        )
    check_review_answer(answer, values)  # type: ignore[arg-type]


@_errors_shown_to_client
async def run_trajectory(
    state: ServerState, config: RunnableConfig, runtime: Runtime[ServerContext]
) -> dict[str, Any]:
    """Run the trajectory graph as a subgraph, with live models in its context.

    Its custom progress events (``PlanReady``, ``ImageReady``, ...) are passed on to this
    graph's own custom stream, so a client sees them without ``stream_subgraphs``.
    """
    if state.get("document") is not None:
        # Written again unchanged so that the run's output (runs.wait) is the finished thread.
        return {key: state[key] for key in TRAJECTORY_KEYS if key in state}
    thread_id = thread_of(runtime)
    settings: RunSettings = state["settings"]
    asked = runtime.context.profile if runtime.context is not None else None
    if asked and asked != settings.profile:
        raise SettingsMismatchError(
            f"thread {thread_id} runs with profile {settings.profile!r}, not {asked!r}",
            hint="resume it with its own profile or start a new thread",
        )
    loaded = await _models(settings.profile, settings.options.paper)
    # A resume after a server restart may meet other models (changed $INTERLEAVE_* variables).
    now = make_settings(settings.profile, loaded.backends, settings.options, loaded.pack)
    refuse_other_settings(
        thread_id, (state["request"], settings), (state["request"], now), hint=_SERVER_RESUME_HINT
    )
    workspace = await server_workspace()
    # The server's run config carries LangGraph's default recursion limit (25 supersteps),
    # less than a long trajectory needs.
    limit = max(recursion_limit(settings), config.get("recursion_limit") or 0)
    # Called from this node, the subgraph checkpoints under this task's namespace in the
    # server's checkpointer: a resume (input null) re-enters this task and continues it there.
    # One writer per thread, also across server processes: the server's checkpointer is its
    # own, so the lease is an advisory lock in the PostgreSQL image store when there is one,
    # else a lock file under the run directory.
    async with thread_lease(_lease_url(workspace), workspace.run_dir, thread_id):
        await _refuse_bad_answer(config, thread_id)
        # Opening the context clears half-done writes of killed runs: file work, in a thread.
        context = await asyncio.to_thread(
            workspace.context, loaded.backends, loaded.timeouts, prompts=loaded.pack
        )
        result: dict[str, Any] = {}
        # Sync durability as in the CLI: each node's checkpoint is written before the next
        # node starts, so a killed worker loses at most the node that was running.
        async for mode, chunk in TRAJECTORY.astream(
            {key: state[key] for key in TRAJECTORY_KEYS if key in state},
            {**config, "recursion_limit": limit},
            context=context,
            durability="sync",
            stream_mode=["custom", "values"],
        ):
            if mode == "custom":
                runtime.stream_writer(chunk)
            else:
                result = chunk
    document = result.get("document")
    if isinstance(document, Document):
        await asyncio.to_thread(workspace.write_document_page, thread_id, document)
    return {key: result[key] for key in TRAJECTORY_KEYS if key in result}


class ServedGraph(CompiledStateGraph):  # type: ignore[type-arg]
    """The compiled server graph, keeping its msgpack allowlist through ``copy()``.

    With ``LANGGRAPH_STRICT_MSGPACK=true`` LangGraph loads only the record types a graph's
    schemas name (collected by ``compile()``), but ``copy()``, which servers call to attach
    their checkpointer, drops that list: a thread's second run then read our records back as
    plain dicts.
    """

    def copy(self, update: dict[str, Any] | None = None) -> ServedGraph:
        copied = super().copy(update)
        copied._serde_allowlist = self._serde_allowlist
        return copied


def build_server_graph() -> ServedGraph:
    """The graph ``langgraph.json`` and ``aegra.json`` serve: prepare the request, then run the
    trajectory.

    No checkpointer: the server brings its own, and the trajectory subgraph borrows it.
    """
    builder = StateGraph(
        ServerState,
        context_schema=ServerContext,
        input_schema=ServerInput,
        output_schema=ServerOutput,
    )
    builder.add_node("prepare", prepare_request)
    builder.add_node("trajectory", run_trajectory)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "trajectory")
    builder.add_edge("trajectory", END)
    compiled = builder.compile(name=SERVER_GRAPH_NAME)
    compiled.__class__ = ServedGraph  # the same object; only copy() differs
    return compiled  # type: ignore[return-value]


graph = build_server_graph()


def make_app() -> Any:
    """The extra routes as a Starlette app (``langgraph dev``); see ``routes.py``."""
    from interleave_thinker.routes import make_starlette_app

    return make_starlette_app()


app: Any
try:
    app = make_app()
except ImportError:  # pragma: no cover - starlette comes with every server this graph runs in
    app = None
