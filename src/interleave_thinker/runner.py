"""Start and resume runs: the public Python API behind `interleave run` and `resume`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from langchain_core.callbacks import BaseCallbackManager, Callbacks
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import CONFIG_KEYS
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from interleave_thinker.checkpoints.faults import check_state, storage_faults
from interleave_thinker.checkpoints.leases import thread_lease
from interleave_thinker.context import Backends, Context, Timeouts, model_identity
from interleave_thinker.errors import ConfigurationError, ReviewRequired, SettingsMismatchError
from interleave_thinker.events import ProgressEvent, ThreadStarted, parse_event
from interleave_thinker.graph import thread_recursion_limit
from interleave_thinker.models.profiles import (
    DEFAULT_PROFILE,
    describe_backends,
    load_profile,
    recorded_specs,
    settings_for_specs,
    with_prompt_pack,
)
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
    BackendSpecs,
    Document,
    Request,
    RunOptions,
    RunSettings,
    TrajectoryState,
    fingerprint_differences,
    identity_without_address,
    request_text_problem,
)
from interleave_thinker.workspace import (
    InputImage,
    Workspace,
    new_thread_id,
    resolve_input_images,
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
    """The settings a thread records: identities (compared on resume, without addresses) and
    the backends' specs (kinds, names, addresses: how a resume builds them again)."""
    specs = backends.specs or describe_backends(
        backends, fallback="custom" if profile == CUSTOM_PROFILE else "stand-in"
    )
    return RunSettings(
        profile=profile,
        planner=model_identity(backends.planner),
        critic=model_identity(backends.critic),
        # An Images API generator names its server; the thread knows it by its model alone.
        generator=identity_without_address(backends.generator.identity),
        prompts=(prompts or InterleavePack()).identity,
        options=options or RunOptions(),
        # Specs a resume cannot build from (stand-ins, your own objects) would only repeat the
        # identities in every checkpoint: recorded_specs derives them from the identities.
        backends=None if _nothing_to_rebuild(specs) else specs,
    )


# Backend kinds that a resume cannot rebuild from a spec: the caller passes them again.
_UNBUILDABLE = ("custom", "stand-in")


def _nothing_to_rebuild(specs: BackendSpecs) -> bool:
    roles = (specs.planner, specs.critic, specs.generator)
    return specs.build is None and all(spec.kind in _UNBUILDABLE for spec in roles)


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


# Keys of a caller's ``configurable`` that address the caller's own graph (its thread, its
# checkpoint, LangGraph's internals, all starting with "__"): never carried into our thread.
_CALLERS_OWN_KEYS = frozenset({"thread_id", "checkpoint_id", "checkpoint_ns", "checkpoint_map"})


def run_config(
    thread_id: str,
    recursion_limit: int,
    config: RunnableConfig | None = None,
    callbacks: Callbacks = None,
) -> RunnableConfig:
    """The RunnableConfig a run of ``thread_id`` streams with: the caller's ``config`` merged
    with ours.

    Kept from ``config``: ``tags``, ``run_name``, ``run_id``, ``max_concurrency``, its
    ``metadata`` and its own ``configurable`` keys. Ours always win where both speak: the thread
    id (in ``configurable`` and in ``metadata``); the caller's thread, checkpoint and LangGraph's
    internal keys are dropped (they address the caller's graph, not ours). ``callbacks`` and the
    config's callbacks are combined (both see every run). A ``recursion_limit`` smaller than the
    thread needs (``graph.recursion_limit``) is raised to it, since a smaller one would stop the
    trajectory part-way; a larger one is kept.
    """
    given: dict[str, Any] = dict(config or {})
    # LangChain's rule: keys that are not config keys are configurable values.
    extra = {key: value for key, value in given.items() if key not in CONFIG_KEYS}
    configurable = {
        key: value
        for key, value in {**extra, **(given.get("configurable") or {})}.items()
        if key not in _CALLERS_OWN_KEYS and not key.startswith("__")
    }
    ours = thread_config(thread_id)
    merged: dict[str, Any] = {
        key: given[key]
        for key in ("tags", "run_name", "run_id", "max_concurrency")
        if given.get(key) is not None
    }
    merged["configurable"] = {**configurable, **ours["configurable"]}
    merged["metadata"] = {**(given.get("metadata") or {}), **ours["metadata"]}
    merged["callbacks"] = _combined_callbacks(given.get("callbacks"), callbacks)
    merged["recursion_limit"] = max(recursion_limit, given.get("recursion_limit") or 0)
    return merged  # type: ignore[return-value]


def _combined_callbacks(first: Callbacks, second: Callbacks) -> Callbacks:
    """Both sets of callbacks (handler lists or managers), every handler in one of them."""
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, list) and isinstance(second, list):
        return first + second
    manager, other = (first, second) if isinstance(first, BaseCallbackManager) else (second, first)
    assert isinstance(manager, BaseCallbackManager)
    if isinstance(other, BaseCallbackManager):
        return manager.merge(other)
    combined = manager.copy()
    for handler in other:
        combined.add_handler(handler, inherit=True)
    return combined


async def _drive(
    graph: CompiledStateGraph[TrajectoryState, Context],
    graph_input: TrajectoryState | Command | None,
    thread_id: str,
    context: Context,
    on_event: EventHandler | None,
    callbacks: Callbacks = None,
    config: RunnableConfig | None = None,
) -> Document:
    # LangGraph's default (25 supersteps) is less than a long trajectory needs.
    limit = await thread_recursion_limit(graph, graph_input, thread_config(thread_id))
    streamed = run_config(thread_id, limit, config, callbacks)
    # A fresh input starts the thread; anything else continues it, perhaps from a cut-short step.
    replay_from = None if isinstance(graph_input, dict) else await cut_short_step(graph, thread_id)
    if replay_from is not None:
        # See cut_short_step: continue from that checkpoint, not from the thread's newest.
        checkpoint_id = replay_from["configurable"]["checkpoint_id"]
        streamed["configurable"] = {**streamed["configurable"], "checkpoint_id": checkpoint_id}
    # Sync durability: every step's checkpoint is on disk before the next step starts, so a
    # hard kill loses at most the node that was running.
    async for event in graph.astream(
        graph_input,
        streamed,
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
    images: Sequence[InputImage] = (),
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
    image_store: str | None = None,
    config: RunnableConfig | None = None,
) -> RunResult:
    """Run a request to its document with a profile (default: the real in-process models,
    configured by ``model_settings``) or your own ``backends``.

    ``images`` are the input images: file paths, ``sha256:HEX`` references of images already
    in the image store, ``data:image/...;base64,`` URLs or ``ImageRef`` records.

    ``config`` is a LangChain ``RunnableConfig`` (tags, metadata, run_name, callbacks,
    max_concurrency, recursion_limit) merged with the thread's own: see :func:`run_config`.

    ``prompts`` picks the prompt pack (``interleave``, ``official``, ``official:PATH`` or a
    ``PromptPack``; see :func:`choose_models`). ``options`` default to the paper's loop when
    ``model_settings.paper`` is set.

    With an existing ``thread_id`` the thread is continued if its request and settings are the
    same, and refused otherwise. ``timeouts`` bound each generator and chat-model call (default:
    those of ``model_settings``, else ``Timeouts()``); they are not part of the thread's settings.

    ``image_store`` is where images, the generation ledger and the verdicts live: ``file://``
    (the run directory, the default), ``file:///PATH`` or ``postgresql://...`` (else the
    settings' ``image_store``, else ``$INTERLEAVE_IMAGE_STORE``). Not part of the thread's
    settings, but a thread's images must stay where its first run put them.
    """
    check_request_text(text)
    # An empty id is refused rather than replaced by a new one: the caller meant some thread.
    thread_id = new_thread_id() if thread_id is None else validate_thread_id(thread_id)
    workspace = Workspace.open(run_dir, checkpointer, chosen_image_store(image_store, model_settings))
    if options is None:
        options = RunOptions(paper=bool(model_settings and model_settings.paper))
    profile_name, backends, pack = choose_models(
        profile, backends, model_settings, prompts=prompts, paper=options.paper
    )
    settings = make_settings(profile_name, backends, options, pack)
    request = Request(text=text, images=tuple(resolve_input_images(workspace.image_store, images)))
    context = workspace.context(backends, Timeouts.chosen(timeouts, model_settings), prompts=pack)
    if on_event is not None:
        on_event(ThreadStarted(thread_id=thread_id, resumed=False))
    # One writer per thread (ThreadBusyError for a second), let go only once the checkpointer
    # is closed with its writes done; storage faults as StorageError.
    url = workspace.checkpointer_url
    async with thread_lease(url, workspace.run_dir, thread_id), workspace.graph() as graph:
        with storage_faults(thread_id, url, workspace.run_dir):
            document = await run_thread(
                graph, thread_id, request, settings, context, on_event, callbacks, config
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
    config: RunnableConfig | None = None,
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
    return await _drive(graph, graph_input, thread_id, context, on_event, callbacks, config)


async def cut_short_step(
    graph: CompiledStateGraph[TrajectoryState, Context], thread_id: str
) -> RunnableConfig | None:
    """The checkpoint to continue from when a cancelled node left the thread with nothing to
    run and no document, else None.

    A node's state update and the conditional edge after it are two writes. LangGraph (1.2)
    saves a task cancelled between them with its error *and* the update, and on resume takes
    the update as the task's finished output: the state moves on with no route, so the thread
    ends with no document. Replaying from the newest checkpoint with a failed task makes
    LangGraph run that task again (a fork of the thread; images already drawn are reused from
    the ledger). Upstream: langchain-ai/langgraph issue 8834 (open); once LangGraph reruns such
    a task itself, this finds nothing to do.
    """
    now = await graph.aget_state(thread_config(thread_id))
    if not now.values or now.next or now.values.get("document") is not None:
        return None
    async for past in graph.aget_state_history(thread_config(thread_id)):
        if any(task.error is not None for task in past.tasks):
            return past.config
    return None


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
    image_store: str | None = None,
    config: RunnableConfig | None = None,
) -> RunResult:
    """Continue a thread from its last checkpoint; settings left out are the thread's own.

    ``config`` is a LangChain ``RunnableConfig`` merged with the thread's own (see ``arun``).

    ``timeouts`` are not the thread's settings: a resume may give other ones (see ``arun``);
    ``image_store`` must name the store the thread's images are in (see ``arun``).

    ``review`` answers a paused plan review: True keeps the plan, a dict in the planner's
    ``execution_plan`` format replaces it.

    ``changes`` names single options (e.g. ``{"max_attempts": 5}``) to compare against the
    thread's; any that differ make the resume refuse, as a changed ``options`` or model does.
    """
    workspace = Workspace.open(run_dir, checkpointer, chosen_image_store(image_store, model_settings))
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
        given = _given_model_settings(profile, model_settings)
        same_profile = (profile or stored_settings.profile) == stored_settings.profile
        if backends is None and same_profile and stored_settings.profile == DEFAULT_PROFILE:
            # The thread's own models, at its own addresses, unless model settings given say
            # otherwise (critic_url alone moves the critic).
            model_settings = settings_for_specs(recorded_specs(stored_settings), model_settings)
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
            thread_id,
            (stored["request"], stored["settings"]),
            (stored["request"], settings),
            hint=_resume_refusal_hint(
                stored["request"], stored_settings, settings, given, bool(options or changes)
            ),
        )
        # A thread moved to other addresses keeps them: the next resume finds it there.
        moved = _moved(stored_settings, settings)
        if on_event is not None:
            on_event(ThreadStarted(thread_id=thread_id, resumed=True))
        document = stored.get("document")
        if document is None:
            if review is not None:
                # Checked before resuming: a refused answer must leave the thread waiting, with
                # no resume value recorded against it.
                check_review_answer(review, stored)
            resume_with = (
                Command(resume=review, update={"settings": moved} if moved is not None else None)
                if review is not None or moved is not None
                else None
            )
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
                    config,
                )
    return RunResult(thread_id, document, workspace.write_document_page(thread_id, document))


def _given_model_settings(profile: str | None, settings: ModelSettings | None) -> set[str]:
    """What the caller of a resume chose about the models: the profile, and the fields of
    ``settings`` that were set (the flags given), named as flags."""
    given = {"profile"} if profile is not None else set()
    return given | (set(settings.model_fields_set) if settings is not None else set())


def _moved(stored: RunSettings, now: RunSettings) -> RunSettings | None:
    """The thread's settings with the backends' specs (addresses) and identities of ``now``, when
    they differ from ``stored`` but compare equal (checked before): what a resume records."""
    fields = ("planner", "critic", "generator", "backends")
    changed = {name: getattr(now, name) for name in fields if getattr(now, name) != getattr(stored, name)}
    return stored.model_copy(update=changed) if changed else None


# The settings compared on resume that name models, and the model settings that can change them.
_MODEL_SETTINGS = {"profile", "planner", "critic", "generator"}
_IDENTITY_FIELDS = _MODEL_SETTINGS | {
    "planner_url", "critic_url", "generator_url", "engine", "device", "dtype", "generator_pipeline",
    "steps", "guidance",
}


def _resume_refusal_hint(
    request: Request, stored: RunSettings, now: RunSettings, given: set[str], options_given: bool
) -> str:
    """What to do when a resume meets other settings; never the resume that was just refused."""
    before, after = stored.fingerprint(request), now.fingerprint(request)
    differing = {
        name.partition(".")[0] for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    }
    steps = []
    if differing & _MODEL_SETTINGS:
        flags = sorted(f"--{name.replace('_', '-')}" for name in given & _IDENTITY_FIELDS)
        if flags:
            steps.append(f"leave out {', '.join(flags)} (a resume builds the thread's own models)")
        else:
            steps.append(
                "name the thread's models (shown above) with --planner, --critic and --generator, "
                "and --planner-url etc. for served ones"
            )
    if "options" in differing:
        steps.append(
            "leave out the run options that differ" if options_given else "pass the thread's run options"
        )
    if "prompts" in differing:
        steps.append(f"use the thread's prompt pack ({stored.prompts}) with --prompts")
    return "; ".join(steps or ["give the thread's own settings"]) + (
        ", or start a new thread with these settings (`interleave run` without --thread)"
    )


def chosen_image_store(image_store: str | None, model_settings: ModelSettings | None) -> str | None:
    """The image store URL given, else the settings' (file or $INTERLEAVE_IMAGE_STORE), else None
    (``Workspace.open`` then reads the environment, then takes ``file://``)."""
    return image_store or (model_settings.image_store if model_settings is not None else None)


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


T = TypeVar("T")


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and return its result (the blocking forms' engine).

    Without a running event loop (a script) this is ``asyncio.run``. Inside one (a Jupyter
    notebook, an async web app) this thread cannot run a second loop, so the coroutine runs on
    a loop of its own in a worker thread, with a copy of this thread's context variables (a
    LangChain tracing context, the config of a LangGraph node), while this thread waits; the
    caller's loop does nothing meanwhile, so ``await arun(...)`` is the better form there.
    Ctrl-C (a notebook's interrupt) cancels the run, which keeps its finished steps.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    return _run_in_worker(coroutine)


# How often a blocking call made inside a running loop looks for a cancellation of its caller.
_CANCEL_POLL_S = 0.1


def _run_in_worker(coroutine: Coroutine[Any, Any, T]) -> T:
    outcome: dict[str, Any] = {}
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []
    interrupted = threading.Event()
    # Waited on instead of Thread.join: a join interrupted by Ctrl-C can mark a live thread
    # as stopped (Python 3.11), and a second join then returns at once.
    done = threading.Event()
    lock = threading.Lock()

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        with lock:
            if interrupted.is_set():
                coroutine.close()
                raise asyncio.CancelledError
            running.append((asyncio.get_running_loop(), task))
        return await coroutine

    def work() -> None:
        try:
            outcome["result"] = asyncio.run(main())
        except BaseException as exc:  # handed to the waiting thread, raised there
            outcome["error"] = exc
        finally:
            done.set()

    def stop() -> None:
        with lock:
            interrupted.set()
            for loop, task in running:
                # RuntimeError: the loop has just closed, the run is over anyway.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(task.cancel)
        done.wait()

    # asyncio.run() answers the first Ctrl-C by cancelling its main task (blocked here, in
    # the caller's task) instead of raising KeyboardInterrupt: a cancellation of the calling
    # task is watched for and stops the run as an interrupt does.
    caller = asyncio.current_task()
    cancellations = caller.cancelling() if caller is not None else 0
    threading.Thread(
        target=contextvars.copy_context().run, args=(work,), name="interleave-run", daemon=True
    ).start()
    try:
        while not done.wait(_CANCEL_POLL_S):
            if caller is not None and caller.cancelling() > cancellations:
                stop()
                raise asyncio.CancelledError
    except KeyboardInterrupt:
        stop()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run(text: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`arun`; also works inside a running event loop (a notebook)."""
    return run_blocking(arun(text, **kwargs))


def resume(thread_id: str, **kwargs: Any) -> RunResult:
    """Blocking form of :func:`aresume`; also works inside a running event loop (a notebook)."""
    return run_blocking(aresume(thread_id, **kwargs))
