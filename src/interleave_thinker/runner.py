"""Start and resume runs: the public Python API behind `interleave run` and `resume`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import Callbacks
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from interleave_thinker.checkpoints.faults import check_state, storage_faults
from interleave_thinker.checkpoints.leases import thread_lease
from interleave_thinker.context import Backends, Context, Timeouts, model_identity
from interleave_thinker.errors import ConfigurationError, ReviewRequired, SettingsMismatchError
from interleave_thinker.events import ProgressEvent, ThreadStarted, parse_event
from interleave_thinker.graph import thread_recursion_limit
from interleave_thinker.models.profiles import DEFAULT_PROFILE, load_profile, with_prompt_pack
from interleave_thinker.nodes.review import REVIEW_KINDS, check_review_answer
from interleave_thinker.prompts.official import FETCH_COMMAND, recorded_clone
from interleave_thinker.prompts.packs import (
    OFFICIAL,
    PROMPTS_ENV,
    InterleavePack,
    OfficialPack,
    PromptPack,
    resolve_prompt_pack,
)
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import (
    Document,
    Request,
    RunOptions,
    RunSettings,
    TrajectoryState,
    fingerprint_differences,
    request_text_problem,
)
from interleave_thinker.workspace import (
    Workspace,
    new_thread_id,
    store_input_images,
    thread_config,
    validate_thread_id,
)

CUSTOM_PROFILE = "custom"

EventHandler = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class RunResult:
    """A finished thread: its id, its document and where the HTML page was written."""

    thread_id: str
    document: Document
    document_path: Path


def make_settings(
    profile: str, backends: Backends, options: RunOptions | None, prompts: PromptPack | None = None
) -> RunSettings:
    return RunSettings(
        profile=profile,
        planner=model_identity(backends.planner),
        critic=model_identity(backends.critic),
        generator=backends.generator.identity,
        prompts=(prompts or InterleavePack()).identity,
        options=options or RunOptions(),
    )


def check_request_text(text: object) -> str:
    """``text`` if it can be a request; else a ConfigurationError saying what to change."""
    problem = request_text_problem(text)
    if problem is not None:
        raise ConfigurationError(problem[0], hint=problem[1])
    return text  # type: ignore[return-value]


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
        {
            **thread_config(thread_id),
            "callbacks": callbacks,
            # LangGraph's default (25 supersteps) is less than a long trajectory needs.
            "recursion_limit": await thread_recursion_limit(graph, graph_input, thread_config(thread_id)),
        },
        context=context,
        durability="sync",
        stream_mode="custom",
    ):
        typed = parse_event(event)
        if on_event is not None and typed is not None:
            on_event(typed)
    snapshot = await graph.aget_state(thread_config(thread_id))
    for pending in snapshot.interrupts:
        if isinstance(pending.value, dict) and pending.value.get("kind") in REVIEW_KINDS:
            raise ReviewRequired(thread_id, pending.value["kind"], pending.value)
    document = snapshot.values.get("document")
    if document is None:
        raise RuntimeError(f"thread {thread_id} stopped before its document was composed")
    return document


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
    prompts: str | PromptPack | None = None,
) -> RunResult:
    """Run a request to its document with a profile (default: the real in-process models,
    configured by ``model_settings``) or your own ``backends``.

    ``prompts`` picks the prompt pack (``interleave``, ``official``, ``official:PATH`` or a
    ``PromptPack``; see :func:`choose_models`). ``options`` default to the paper's loop when
    ``model_settings.paper`` is set.

    With an existing ``thread_id`` the thread is continued if its request and settings are the
    same, and refused otherwise. ``timeouts`` bound each generator and chat-model call (default:
    those of ``model_settings``, else ``Timeouts()``); they are not part of the thread's settings.
    """
    check_request_text(text)
    # An empty id is refused rather than replaced by a new one: the caller meant some thread.
    thread_id = new_thread_id() if thread_id is None else validate_thread_id(thread_id)
    workspace = Workspace.open(run_dir, checkpointer)
    if options is None:
        options = RunOptions(paper=bool(model_settings and model_settings.paper))
    profile_name, backends, pack = choose_models(
        profile, backends, model_settings, prompts=prompts, paper=options.paper
    )
    settings = make_settings(profile_name, backends, options, pack)
    request = Request(text=text, images=tuple(store_input_images(workspace.image_store, images)))
    context = workspace.context(backends, Timeouts.chosen(timeouts, model_settings), prompts=pack)
    if on_event is not None:
        on_event(ThreadStarted(thread_id=thread_id, resumed=False))
    # One writer per thread (ThreadBusyError for a second), let go only once the checkpointer
    # is closed with its writes done; storage faults as StorageError.
    url = workspace.checkpointer_url
    async with thread_lease(url, workspace.run_dir, thread_id), workspace.graph() as graph:
        with storage_faults(thread_id, url, workspace.run_dir):
            document = await run_thread(
                graph, thread_id, request, settings, context, on_event, callbacks
            )
    return RunResult(thread_id, document, workspace.write_document_page(thread_id, document))


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
    snapshot = await graph.aget_state(thread_config(thread_id))
    graph_input: TrajectoryState | None = None
    if snapshot.values:
        values = check_state(thread_id, snapshot.values)
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
    prompts: str | PromptPack | None = None,
) -> RunResult:
    """Continue a thread from its last checkpoint; settings left out are the thread's own.

    ``timeouts`` are not the thread's settings: a resume may give other ones (see ``arun``).

    ``review`` answers a paused plan review: True keeps the plan, a dict in the planner's
    ``execution_plan`` format replaces it.

    ``changes`` names single options (e.g. ``{"max_attempts": 5}``) to compare against the
    thread's; any that differ make the resume refuse, as a changed ``options`` or model does.
    """
    workspace = Workspace.open(run_dir, checkpointer)
    url = workspace.checkpointer_url
    # The lease comes first, so the state is read by the one writer of the thread.
    lease = thread_lease(url, workspace.run_dir, validate_thread_id(thread_id))
    async with lease, workspace.graph() as graph:
        stored = await workspace.existing_state(graph, thread_id)
        stored_settings: RunSettings = stored["settings"]
        if backends is None and profile is None and stored_settings.profile == CUSTOM_PROFILE:
            raise ConfigurationError(
                f"thread {thread_id} ran with custom models, which cannot be rebuilt by name",
                hint="pass the same backends to resume()",
            )
        chosen = (options or stored_settings.options).with_changes(**(changes or {}))
        profile_name, backends, pack = choose_models(
            profile or stored_settings.profile,
            backends,
            model_settings,
            prompts=prompts,
            paper=chosen.paper,
            thread_prompts=stored_settings.prompts,
        )
        settings = make_settings(profile_name, backends, chosen, pack)
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
            with storage_faults(thread_id, url, workspace.run_dir):
                document = await _drive(
                    graph,
                    resume_with,
                    thread_id,
                    workspace.context(
                        backends, Timeouts.chosen(timeouts, model_settings), prompts=pack
                    ),
                    on_event,
                    callbacks,
                )
    return RunResult(thread_id, document, workspace.write_document_page(thread_id, document))


def choose_backends(
    profile: str | None, backends: Backends | None, model_settings: ModelSettings | None
) -> tuple[str, Backends]:
    if backends is not None:
        return profile or CUSTOM_PROFILE, backends
    profile = profile or DEFAULT_PROFILE
    return profile, load_profile(profile, model_settings)


def _paper_needs_official() -> ConfigurationError:
    return ConfigurationError(
        "paper mode needs the official prompts, which the released checkpoints were trained on",
        hint=f"run `{FETCH_COMMAND}` once (or pass --prompts official:PATH to your clone)",
    )


def choose_models(
    profile: str | None,
    backends: Backends | None,
    model_settings: ModelSettings | None,
    *,
    prompts: str | PromptPack | None = None,
    paper: bool = False,
    thread_prompts: str | None = None,
) -> tuple[str, Backends, PromptPack]:
    """The profile name, the backends and the prompt pack of a run.

    ``prompts`` (else the settings' ``prompts``, else ``$INTERLEAVE_PROMPTS``) names the pack;
    left unset it is the official one in paper mode or when resuming a thread that used it
    (``thread_prompts``), else chosen by the models (see ``resolve_prompt_pack``).
    """
    profile_name, built = choose_backends(profile, backends, model_settings)
    spec = prompts
    if spec is None:
        spec = model_settings.prompts if model_settings is not None else os.environ.get(PROMPTS_ENV) or None
    if isinstance(spec, PromptPack):
        pack = spec
    else:
        if spec in (None, "auto") and (paper or (thread_prompts or "").startswith(OFFICIAL)):
            if paper and recorded_clone() is None:
                raise _paper_needs_official()
            spec = OFFICIAL
        pack = resolve_prompt_pack(
            spec, planner=model_identity(built.planner), critic=model_identity(built.critic)
        )
    if paper and not isinstance(pack, OfficialPack):
        raise _paper_needs_official()
    unset_length = backends is None and (model_settings is None or model_settings.max_new_tokens is None)
    return profile_name, with_prompt_pack(built, pack, fit_length=unset_length), pack


def run(text: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`arun`."""
    return asyncio.run(arun(text, **kwargs))


def resume(thread_id: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`aresume`."""
    return asyncio.run(aresume(thread_id, **kwargs))
