"""The trajectory graph and image routes for a LangGraph server (``langgraph dev``, LangGraph Platform)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Required, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from interleave_thinker.checkpoints.leases import thread_lease
from interleave_thinker.context import Backends
from interleave_thinker.errors import (
    ConfigurationError,
    ImageError,
    InterleaveError,
    SettingsMismatchError,
    one_line,
)
from interleave_thinker.graph import build_graph, recursion_limit
from interleave_thinker.models.profiles import DEFAULT_PROFILE
from interleave_thinker.nodes.common import thread_of
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
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES
from interleave_thinker.workspace import Workspace

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "SERVER_GRAPH_NAME",
    "ServerContext",
    "ServerInput",
    "ServerState",
    "app",
    "build_server_graph",
    "graph",
    "make_app",
]

SERVER_GRAPH_NAME = "interleave"
ROUTE_PREFIX = "/interleave"

TRAJECTORY_KEYS: tuple[str, ...] = tuple(TrajectoryState.__annotations__)


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


class ServerState(TrajectoryState, ServerInput, total=False):
    """The thread's state on the server: the client's input beside the trajectory's records."""


@dataclass(frozen=True)
class ServerContext:
    """What a run or an assistant may set besides the input: the profile of backends to use.

    The run directory (images, generation ledger, HTML pages) is the server's own setting,
    ``$INTERLEAVE_RUN_DIR``: a path sent over the network must not choose where files are written.
    """

    profile: str | None = None


# One compiled trajectory graph for every run: it borrows the server's checkpointer at run time.
TRAJECTORY = build_graph()

_MODELS: dict[tuple[str, bool], tuple[Backends, PromptPack]] = {}
_MODELS_LOCK = threading.Lock()


def _load_models(profile: str, paper: bool) -> tuple[Backends, PromptPack]:
    # Real models take minutes and gigabytes to load, so each profile is built once per server
    # process (models and prompt pack from $INTERLEAVE_* / $INTERLEAVE_CONFIG) and shared.
    with _MODELS_LOCK:
        if (profile, paper) not in _MODELS:
            _, backends, pack = choose_models(profile, None, load_model_settings(), paper=paper)
            _MODELS[(profile, paper)] = (backends, pack)
        return _MODELS[(profile, paper)]


async def _models(profile: str, paper: bool = False) -> tuple[Backends, PromptPack]:
    # Loading models and reading settings files block; the server's event loop must not.
    return await asyncio.to_thread(_load_models, profile, paper)


async def _workspace() -> Workspace:
    return await asyncio.to_thread(Workspace.open)


_SHOWN_KINDS: dict[type[InterleaveError], type[InterleaveError]] = {}


def _shown_to_client(error: InterleaveError) -> InterleaveError:
    """The same error, also a ValueError: the server tells clients the message of ValueErrors
    only (any other error reads "An internal error occurred"), and ours say what to do."""
    kind = type(error)
    shown = _SHOWN_KINDS.get(kind)
    if shown is None:
        shown = _SHOWN_KINDS[kind] = type(
            kind.__name__,
            (kind, ValueError),
            {
                "__module__": kind.__module__,
                "__str__": lambda self: f"{self.message} (hint: {self.hint})" if self.hint
                else self.message,
            },
        )
    return shown(error.message, hint=error.hint)


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
    backends, pack = await _models(profile, options.paper)
    workspace = await _workspace()
    images = await asyncio.to_thread(_input_images, workspace, state.get("images") or [])
    request = Request(text=text, images=tuple(images))
    settings = make_settings(profile, backends, options, pack)
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


@_errors_shown_to_client
async def run_trajectory(
    state: ServerState, config: RunnableConfig, runtime: Runtime[ServerContext]
) -> dict[str, Any]:
    """Run the trajectory graph as a subgraph, with live models in its context."""
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
    backends, pack = await _models(settings.profile, settings.options.paper)
    # A resume after a server restart may meet other models (changed $INTERLEAVE_* variables).
    now = make_settings(settings.profile, backends, settings.options, pack)
    refuse_other_settings(
        thread_id, (state["request"], settings), (state["request"], now), hint=_SERVER_RESUME_HINT
    )
    workspace = await _workspace()
    # The server's run config carries LangGraph's default recursion limit (25 supersteps),
    # less than a long trajectory needs.
    limit = max(recursion_limit(settings), config.get("recursion_limit") or 0)
    # Called from this node, the subgraph checkpoints under this task's namespace in the
    # server's checkpointer: a resume (input null) re-enters this task and continues it there.
    # One writer per thread, also across server processes sharing the run directory (the
    # server's checkpointer is its own, so the lease is a file under the run directory).
    async with thread_lease(None, workspace.run_dir, thread_id):
        result = await TRAJECTORY.ainvoke(
            {key: state[key] for key in TRAJECTORY_KEYS if key in state},
            {**config, "recursion_limit": limit},
            context=workspace.context(backends, prompts=pack),
        )
    document = result.get("document")
    if isinstance(document, Document):
        await asyncio.to_thread(workspace.write_document_page, thread_id, document)
    return {key: result[key] for key in TRAJECTORY_KEYS if key in result}


def build_server_graph() -> CompiledStateGraph[ServerState, ServerContext, ServerInput, TrajectoryState]:
    """The graph ``langgraph.json`` serves: prepare the request, then run the trajectory.

    No checkpointer: the server brings its own, and the trajectory subgraph borrows it.
    """
    builder = StateGraph(
        ServerState,
        context_schema=ServerContext,
        input_schema=ServerInput,
        output_schema=TrajectoryState,
    )
    builder.add_node("prepare", prepare_request)
    builder.add_node("trajectory", run_trajectory)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "trajectory")
    builder.add_edge("trajectory", END)
    return builder.compile(name=SERVER_GRAPH_NAME)


graph = build_server_graph()


def make_app() -> Starlette:
    """Routes beside the LangGraph API for what the state only references: image bytes and pages.

    - ``GET /interleave/images/{sha256}``: a stored image, verified against its hash.
    - ``POST /interleave/images``: store the image in the body (a still PNG, JPEG or WebP),
      normalised as the CLI's input images are; returns its ImageRef, to pass in a run's
      ``images`` input.
    - ``GET /interleave/threads/{thread_id}/document``: the HTML page of a finished thread.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def _error(status: int, error: InterleaveError) -> JSONResponse:
        return JSONResponse({"detail": error.message, "hint": error.hint}, status_code=status)

    async def get_image(request: HttpRequest) -> Response:
        workspace = await _workspace()
        sha256 = request.path_params["sha256"]

        def read() -> tuple[ImageRef, bytes]:
            ref = workspace.image_store.find(sha256)
            return ref, workspace.image_store.read(ref)

        try:
            ref, data = await asyncio.to_thread(read)
        except ImageError as exc:
            return _error(404, exc)
        # Content-addressed: the bytes behind a hash never change.
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{sha256}"'}
        return Response(data, media_type=ref.media_type, headers=headers)

    async def put_image(request: HttpRequest) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_IMAGE_BYTES:
                return JSONResponse(
                    {"detail": f"the image is over the {MAX_IMAGE_BYTES} byte limit"}, status_code=413
                )
        workspace = await _workspace()
        try:
            ref = await asyncio.to_thread(
                # Stored as the models will see it (upright, 8-bit RGB, opaque); the returned
                # reference names the stored image, which may differ from the bytes sent.
                workspace.image_store.put_input, bytes(body), what="uploaded image"
            )
        except ImageError as exc:
            return _error(400, exc)
        return JSONResponse(ref.model_dump(mode="json"), status_code=201)

    async def get_document(request: HttpRequest) -> Response:
        workspace = await _workspace()
        try:
            path = workspace.document_path(request.path_params["thread_id"])
        except ConfigurationError as exc:
            return _error(400, exc)
        try:
            html = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return JSONResponse(
                {"detail": "no document for this thread: it is unknown or has not finished"},
                status_code=404,
            )
        return HTMLResponse(html)

    return Starlette(
        routes=[
            Route(f"{ROUTE_PREFIX}/images/{{sha256}}", get_image, methods=["GET"]),
            Route(f"{ROUTE_PREFIX}/images", put_image, methods=["POST"]),
            Route(f"{ROUTE_PREFIX}/threads/{{thread_id}}/document", get_document, methods=["GET"]),
        ]
    )


app: Starlette | None
try:
    app = make_app()
except ImportError:  # pragma: no cover - starlette comes with langgraph-api, the only user
    app = None
