"""Start, resume and inspect runs: the public Python API behind the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import Callbacks
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot

from interleave_thinker.checkpoints import image_store
from interleave_thinker.checkpoints.image_store import (
    STAGING_DIR,
    ImageStore,
    sweep_abandoned_writes,
    write_atomically,
)
from interleave_thinker.checkpoints.ledger import GenerationLedger
from interleave_thinker.checkpoints.savers import (
    default_checkpointer_url,
    list_thread_ids,
    open_checkpointer,
)
from interleave_thinker.context import Backends, Context, Timeouts, model_identity
from interleave_thinker.errors import (
    ConfigurationError,
    ImageError,
    ReviewRequired,
    SettingsMismatchError,
    UnknownThreadError,
)
from interleave_thinker.events import ProgressEvent, ThreadStarted, parse_event
from interleave_thinker.graph import build_graph
from interleave_thinker.input_files import read_user_file, shown_path
from interleave_thinker.models.profiles import DEFAULT_PROFILE, load_profile
from interleave_thinker.nodes.review import REVIEW_KINDS, check_review_answer
from interleave_thinker.render.html import render_html
from interleave_thinker.settings import ModelSettings, redact_url
from interleave_thinker.state import (
    Document,
    DocumentStep,
    ImageRef,
    Request,
    RunOptions,
    RunSettings,
    StepProgress,
    TrajectoryState,
    fingerprint_differences,
    request_text_problem,
)

RUN_DIR_ENV = "INTERLEAVE_RUN_DIR"
DEFAULT_RUN_DIR = "interleave-runs"
CUSTOM_PROFILE = "custom"
THREAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

EventHandler = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class RunResult:
    """A finished thread: its id, its document and where the HTML page was written."""

    thread_id: str
    document: Document
    document_path: Path


@dataclass(frozen=True)
class Workspace:
    """A run directory: image store, generation ledger, documents and (by default) checkpoints."""

    run_dir: Path
    checkpointer_url: str

    @classmethod
    def open(
        cls, run_dir: str | os.PathLike[str] | None = None, checkpointer: str | None = None
    ) -> Workspace:
        chosen = Path(run_dir or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)
        if chosen.exists() and not chosen.is_dir():
            raise ConfigurationError(
                f"run directory {chosen} exists and is not a directory",
                hint="pass --run-dir with a directory path",
            )
        return cls(chosen, checkpointer or default_checkpointer_url(chosen))

    @property
    def image_store(self) -> ImageStore:
        return ImageStore(self.run_dir / "images")

    def context(self, backends: Backends, timeouts: Timeouts | None = None) -> Context:
        store = self.image_store
        ledger = GenerationLedger(self.run_dir / "generations", store)
        # Writes a killed run left half-done are cleared before new ones start.
        store.sweep_abandoned_writes()
        ledger.sweep_abandoned_writes()
        return Context(
            backends=backends, image_store=store, ledger=ledger, timeouts=timeouts or Timeouts()
        )

    @property
    def documents_staging(self) -> Path:
        """Where document pages are written before their rename into place."""
        return self.run_dir / "documents" / STAGING_DIR

    def document_path(self, thread_id: str) -> Path:
        return self.run_dir / "documents" / validate_thread_id(thread_id) / "document.html"

    @asynccontextmanager
    async def graph(self) -> AsyncIterator[CompiledStateGraph[TrajectoryState, Context]]:
        async with open_checkpointer(self.checkpointer_url) as saver:
            yield build_graph(checkpointer=saver)


def validate_thread_id(thread_id: str) -> str:
    """Thread ids become folder names: letters, digits, '.', '_' and '-' only, 128 at most."""
    if not isinstance(thread_id, str) or not THREAD_ID_PATTERN.fullmatch(thread_id):
        raise ConfigurationError(
            f"thread id {_shown_id(thread_id)} is not allowed: {_thread_id_problem(thread_id)}",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return thread_id


def _shown_id(thread_id: object) -> str:
    text = repr(thread_id)
    return text if len(text) <= 60 else text[:57] + "..."


def _thread_id_problem(thread_id: object) -> str:
    if not isinstance(thread_id, str):
        return f"it is a {type(thread_id).__name__}, not a string"
    if not thread_id:
        return "it is empty"
    if len(thread_id) > 128:
        return f"it is {len(thread_id)} characters long"
    for char in thread_id:
        if not (char.isascii() and (char.isalnum() or char in "._-")):
            # Non-ASCII letters are refused too: look-alikes (Cyrillic 'а') would name other folders.
            return f"it contains {char!r} (U+{ord(char):04X})"
    return "it must start with a letter or digit"


def new_thread_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def make_settings(profile: str, backends: Backends, options: RunOptions | None) -> RunSettings:
    return RunSettings(
        profile=profile,
        planner=model_identity(backends.planner),
        critic=model_identity(backends.critic),
        generator=backends.generator.identity,
        options=options or RunOptions(),
    )


def store_input_images(store: ImageStore, paths: Sequence[str | os.PathLike[str]]) -> list[ImageRef]:
    """Store the user's input images, refusing anything that is not a readable PNG, JPEG or WebP."""
    refs = []
    for path in paths:
        what = f"input image {shown_path(path)}"
        # Read bounded and without blocking: a FIFO, /dev/zero or a huge sparse file is refused
        # before any of it is read.
        data = read_user_file(
            path,
            what="input image",
            max_bytes=image_store.MAX_IMAGE_BYTES,
            error=ImageError,
            hint="pass a PNG, JPEG or WebP file with --image",
        )
        kind = _not_an_image(data)
        if kind is not None:
            raise ImageError(f"{what} {kind}", hint="convert it to PNG, JPEG or WebP")
        refs.append(store.put(data, what=what))
    return refs


# The signatures every PNG, JPEG and WebP file starts with, and some formats people try instead.
_ACCEPTED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_OTHER_FORMATS = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF-", "a PDF document"),
)


def _not_an_image(data: bytes) -> str | None:
    """What is wrong when the bytes are no PNG, JPEG or WebP file, else None (decode them)."""
    if not data:
        return "is empty (0 bytes)"
    if data.startswith(_ACCEPTED_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    for signature, name in _OTHER_FORMATS:
        if data.startswith(signature):
            return f"is {name}, not PNG, JPEG or WebP"
    head = data[:1024].lstrip().lower()
    if b"<svg" in head:
        return "is an SVG file (vector graphics), not PNG, JPEG or WebP"
    if head.startswith((b"<!doctype html", b"<html")):
        return "is an HTML page, not PNG, JPEG or WebP"
    return "is not a PNG, JPEG or WebP file (its first bytes match none of them)"


def check_request_text(text: object) -> str:
    """``text`` if it can be a request; else a ConfigurationError saying what to change."""
    problem = request_text_problem(text)
    if problem is not None:
        raise ConfigurationError(problem[0], hint=problem[1])
    return text  # type: ignore[return-value]


def _thread_config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}, "metadata": {"thread_id": thread_id}}


def refuse_other_settings(
    thread_id: str,
    stored: tuple[Request, RunSettings],
    new: tuple[Request, RunSettings],
    *,
    hint: str | None = None,
) -> None:
    """Raise SettingsMismatchError naming every setting in which ``new`` differs from ``stored``."""
    (stored_request, stored_settings), (new_request, new_settings) = stored, new
    differences = fingerprint_differences(
        stored_settings.fingerprint(stored_request), new_settings.fingerprint(new_request)
    )
    if differences:
        raise SettingsMismatchError(
            f"thread {thread_id} was started with other settings: " + "; ".join(differences),
            hint=hint
            or f"resume it with its own settings (`interleave resume {thread_id}`) "
            "or start a new thread",
        )


async def _drive(
    graph: CompiledStateGraph[TrajectoryState, Context],
    graph_input: TrajectoryState | Command | None,
    thread_id: str,
    context: Context,
    on_event: EventHandler | None,
    callbacks: Callbacks = None,
) -> Document:
    # Sync durability: every step's checkpoint is on disk before the next step starts, so a
    # hard kill loses at most the node that was running.
    async for event in graph.astream(
        graph_input,
        {**_thread_config(thread_id), "callbacks": callbacks},
        context=context,
        durability="sync",
        stream_mode="custom",
    ):
        typed = parse_event(event)
        if on_event is not None and typed is not None:
            on_event(typed)
    snapshot = await graph.aget_state(_thread_config(thread_id))
    for pending in snapshot.interrupts:
        if isinstance(pending.value, dict) and pending.value.get("kind") in REVIEW_KINDS:
            raise ReviewRequired(thread_id, pending.value["kind"], pending.value)
    document = snapshot.values.get("document")
    if document is None:
        raise RuntimeError(f"thread {thread_id} stopped before its document was composed")
    return document


def write_html(workspace: Workspace, thread_id: str, document: Document) -> Path:
    path = workspace.document_path(thread_id)
    html = render_html(document, workspace.image_store, thread_id=thread_id)
    # A page write a killed run left half-done is cleared first (a finished thread's resume
    # writes only this page, without opening a Context).
    sweep_abandoned_writes(workspace.documents_staging)
    write_atomically(path, html.encode("utf-8"), staging=workspace.documents_staging)
    return path


async def arun(
    text: str,
    *,
    images: Sequence[str | os.PathLike[str]] = (),
    profile: str | None = None,
    backends: Backends | None = None,
    model_settings: ModelSettings | None = None,
    options: RunOptions | None = None,
    thread_id: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    on_event: EventHandler | None = None,
    callbacks: Callbacks = None,
    timeouts: Timeouts | None = None,
) -> RunResult:
    """Run a request to its document with a profile (default: the real in-process models,
    configured by ``model_settings``) or your own ``backends``.

    With an existing ``thread_id`` the thread is continued if its request and settings are the
    same, and refused otherwise. ``timeouts`` bound each generator and chat-model call (default:
    those of ``model_settings``, else ``Timeouts()``); they are not part of the thread's settings.
    """
    check_request_text(text)
    # An empty id is refused rather than replaced by a new one: the caller meant some thread.
    thread_id = new_thread_id() if thread_id is None else validate_thread_id(thread_id)
    workspace = Workspace.open(run_dir, checkpointer)
    profile_name, backends = choose_backends(profile, backends, model_settings)
    settings = make_settings(profile_name, backends, options)
    request = Request(text=text, images=tuple(store_input_images(workspace.image_store, images)))
    context = workspace.context(backends, Timeouts.chosen(timeouts, model_settings))
    if on_event is not None:
        on_event(ThreadStarted(thread_id=thread_id, resumed=False))
    async with workspace.graph() as graph:
        document = await run_thread(
            graph, thread_id, request, settings, context, on_event, callbacks
        )
    return RunResult(thread_id, document, write_html(workspace, thread_id, document))


def trajectory_input(request: Request, settings: RunSettings) -> TrajectoryState:
    """The input that starts a fresh thread of the trajectory graph (e.g. used as a subgraph)."""
    return {
        "request": request,
        "settings": settings,
        "plan": None,
        "progress": (),
        "generator_calls": 0,
        "document": None,
    }


async def run_thread(
    graph: CompiledStateGraph[TrajectoryState, Context],
    thread_id: str,
    request: Request,
    settings: RunSettings,
    context: Context,
    on_event: EventHandler | None = None,
    callbacks: Callbacks = None,
) -> Document:
    """Start ``thread_id``, continue it if it exists with the same request and settings, or
    return its document at once if it has finished (no model or generator call)."""
    snapshot = await graph.aget_state(_thread_config(thread_id))
    graph_input: TrajectoryState | None = None
    if snapshot.values:
        values = snapshot.values
        refuse_other_settings(
            thread_id, (values["request"], values["settings"]), (request, settings)
        )
        document = snapshot.values.get("document")
        if document is not None:
            return document
    else:
        graph_input = trajectory_input(request, settings)
    return await _drive(graph, graph_input, thread_id, context, on_event, callbacks)


async def aresume(
    thread_id: str,
    *,
    profile: str | None = None,
    backends: Backends | None = None,
    model_settings: ModelSettings | None = None,
    options: RunOptions | None = None,
    changes: dict[str, Any] | None = None,
    review: dict[str, Any] | bool | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    on_event: EventHandler | None = None,
    callbacks: Callbacks = None,
    timeouts: Timeouts | None = None,
) -> RunResult:
    """Continue a thread from its last checkpoint; settings left out are the thread's own.

    ``timeouts`` are not the thread's settings: a resume may give other ones (see ``arun``).

    ``review`` answers a paused plan review: True keeps the plan, a dict in the planner's
    ``execution_plan`` format replaces it.

    ``changes`` names single options (e.g. ``{"max_attempts": 5}``) to compare against the
    thread's; any that differ make the resume refuse, as a changed ``options`` or model does.
    """
    workspace = Workspace.open(run_dir, checkpointer)
    async with workspace.graph() as graph:
        stored = await _existing_state(graph, workspace, thread_id)
        stored_settings: RunSettings = stored["settings"]
        if backends is None and profile is None and stored_settings.profile == CUSTOM_PROFILE:
            raise ConfigurationError(
                f"thread {thread_id} ran with custom models, which cannot be rebuilt by name",
                hint="pass the same backends to resume()",
            )
        profile_name, backends = choose_backends(
            profile or stored_settings.profile, backends, model_settings
        )
        chosen = (options or stored_settings.options).with_changes(**(changes or {}))
        settings = make_settings(profile_name, backends, chosen)
        refuse_other_settings(
            thread_id, (stored["request"], stored["settings"]), (stored["request"], settings)
        )
        if on_event is not None:
            on_event(ThreadStarted(thread_id=thread_id, resumed=True))
        document = stored.get("document")
        if document is None:
            if review is not None:
                # Checked before resuming: a refused answer must leave the thread waiting, with
                # no resume value recorded against it.
                check_review_answer(review, stored)
            resume_with = Command(resume=review) if review is not None else None
            document = await _drive(
                graph,
                resume_with,
                thread_id,
                workspace.context(backends, Timeouts.chosen(timeouts, model_settings)),
                on_event,
                callbacks,
            )
    return RunResult(thread_id, document, write_html(workspace, thread_id, document))


async def _existing_state(
    graph: CompiledStateGraph[TrajectoryState, Context], workspace: Workspace, thread_id: str
) -> TrajectoryState:
    snapshot = await graph.aget_state(_thread_config(validate_thread_id(thread_id)))
    if not snapshot.values:
        raise UnknownThreadError(
            f"no thread {thread_id!r} in {redact_url(workspace.checkpointer_url)}",
            hint="`interleave list` shows the threads; check --run-dir and --checkpointer",
        )
    return snapshot.values


def choose_backends(
    profile: str | None, backends: Backends | None, model_settings: ModelSettings | None
) -> tuple[str, Backends]:
    if backends is not None:
        return profile or CUSTOM_PROFILE, backends
    profile = profile or DEFAULT_PROFILE
    return profile, load_profile(profile, model_settings)


async def aload_document(
    thread_id: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
) -> Document:
    """The finished document of a thread; refuses a thread that has not finished."""
    workspace = Workspace.open(run_dir, checkpointer)
    async with workspace.graph() as graph:
        state = await _existing_state(graph, workspace, thread_id)
    document = state.get("document")
    if document is None:
        raise UnknownThreadError(
            f"thread {thread_id} has not finished yet, so it has no document",
            hint=f"finish it with `interleave resume {thread_id}`",
        )
    return document


@dataclass(frozen=True)
class ThreadSummary:
    thread_id: str
    status: str
    request: str
    steps: int
    generator_calls: int
    updated_at: str


def _status(snapshot: StateSnapshot) -> str:
    values = snapshot.values
    if values.get("document") is not None:
        return "done"
    if snapshot.interrupts:
        return "waiting for review"
    if any(task.error for task in snapshot.tasks):
        return "failed"
    return "unfinished"


async def alist_threads(
    *, run_dir: str | os.PathLike[str] | None = None, checkpointer: str | None = None
) -> list[ThreadSummary]:
    """Every thread in the checkpointer, newest first."""
    workspace = Workspace.open(run_dir, checkpointer)
    summaries = []
    async with workspace.graph() as graph:
        assert graph.checkpointer is not None and not isinstance(graph.checkpointer, bool)
        threads = await list_thread_ids(graph.checkpointer)
        for thread in threads:
            snapshot = await graph.aget_state(_thread_config(thread))
            values = snapshot.values
            if not values:
                continue
            plan = values.get("plan")
            summaries.append(
                ThreadSummary(
                    thread_id=thread,
                    status=_status(snapshot),
                    request=values["request"].text,
                    steps=len(plan.steps) if plan else 0,
                    generator_calls=values.get("generator_calls", 0),
                    updated_at=snapshot.created_at or "",
                )
            )
    return sorted(summaries, key=lambda s: s.updated_at, reverse=True)


async def athread_report(
    thread_id: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
) -> dict[str, Any]:
    """Everything about a thread as plain JSON data: settings, plan, every attempt, timings."""
    workspace = Workspace.open(run_dir, checkpointer)
    async with workspace.graph() as graph:
        await _existing_state(graph, workspace, thread_id)
        snapshot = await graph.aget_state(_thread_config(thread_id))
    values = snapshot.values
    plan = values.get("plan")
    progress: dict[int, StepProgress | DocumentStep] = {
        item.number: item for item in values.get("progress", ())
    }
    document: Document | None = values.get("document")
    if document is not None:
        # A finished thread keeps its attempts in the document only.
        progress = {item.number: item for item in document.steps}
    steps = []
    for step in plan.steps if plan else ():
        item = progress.get(step.number)
        steps.append(
            {
                "number": step.number,
                "name": step.name,
                "instruction": step.instruction,
                "prompt": step.prompt,
                "text": step.display_text,
                "action": step.action,
                "sources": list(step.sources),
                "status": item.status if item else "pending",
                "chosen_attempt": None if item is None or item.chosen is None
                else item.attempts[item.chosen].number,
                "image": _final_image(item),
                "attempts": [a.model_dump(mode="json") for a in item.attempts] if item else [],
            }
        )
    errors = [f"{task.name}: {task.error}" for task in snapshot.tasks if task.error]
    path = workspace.document_path(thread_id)
    return {
        "thread_id": thread_id,
        "status": _status(snapshot),
        "request": values["request"].model_dump(mode="json"),
        "settings": values["settings"].model_dump(mode="json"),
        "generator_calls": values.get("generator_calls", 0),
        "updated_at": snapshot.created_at,
        "next": list(snapshot.next),
        "errors": errors,
        "document_path": str(path) if path.exists() else None,
        "steps": steps,
    }


def _final_image(item: StepProgress | DocumentStep | None) -> str | None:
    if item is None:
        return None
    image = item.image if isinstance(item, DocumentStep) else item.final_image
    return image.sha256 if image else None


def run(text: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`arun`."""
    return asyncio.run(arun(text, **kwargs))


def resume(thread_id: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`aresume`."""
    return asyncio.run(aresume(thread_id, **kwargs))


def load_document(thread_id: str, **kwargs: Any) -> Document:
    """Blocking form of :func:`aload_document`."""
    return asyncio.run(aload_document(thread_id, **kwargs))
