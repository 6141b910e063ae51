"""The whole pipeline for other agents and graphs: a LangChain tool, and a subgraph's start state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, ToolException
from langgraph.config import get_stream_writer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interleave_thinker.context import Backends
from interleave_thinker.errors import ImageError
from interleave_thinker.events import ProgressEvent
from interleave_thinker.models.profiles import PROFILE_NOTES
from interleave_thinker.runner import EventHandler, RunResult, arun, chosen_image_store
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import (
    Document,
    ImageRef,
    RunOptions,
)
from interleave_thinker.workspace import Workspace, new_thread_id, resolve_input_image

TOOL_NAME = "interleave_document"

# The id of the tool call being run, set by run()/arun(), which are the only places that see it.
_TOOL_CALL_ID: ContextVar[str | None] = ContextVar("interleave_tool_call_id", default=None)

_UNSAFE_THREAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class InterleaveInput(BaseModel):
    """Arguments an agent passes to get an interleaved text-and-image document."""

    request: str = Field(
        min_length=1,
        description="What to generate: a story, a how-to or an edit sequence, in plain words.",
    )
    images: list[str] | None = Field(
        default=None,
        description="Optional input images to build on (guidance mode): file paths, "
        "'sha256:HEX' references of images from earlier calls, or data:image/...;base64 URLs.",
    )


def thread_id_for_call(tool_call_id: str | None, request: str, images: list[str] | None) -> str:
    """The thread of one tool call: the same call (id and arguments) always maps to the same
    thread, so re-running it resumes; without a call id every call gets a new thread."""
    if not tool_call_id:
        return new_thread_id()
    # The arguments are part of the name: providers' ids (e.g. "call_1" from scripted models)
    # repeat across conversations and must not collide with another request's thread.
    digest = hashlib.sha256(
        json.dumps([tool_call_id, request, images or []]).encode()
    ).hexdigest()[:10]
    safe = _UNSAFE_THREAD_CHARS.sub("-", tool_call_id).strip("-._")[:80]
    return f"tool-{safe}-{digest}" if safe else f"tool-{digest}"


def _forward_to_caller(caller: RunnableConfig | None, tool: str, thread_id: str
                       ) -> EventHandler | None:
    """Sends progress events to the custom stream of the graph running the tool, if any."""
    if caller is None:
        return None
    token = var_child_runnable_config.set(caller)
    try:
        writer = get_stream_writer()
    except (RuntimeError, KeyError):  # not inside a graph: nobody to tell
        return None
    finally:
        var_child_runnable_config.reset(token)

    def forward(event: ProgressEvent) -> None:
        # Wrapped, not merged, so the caller knows which call it is; parse_event() on the
        # inner dict still gives the typed event. The writer reads the caller's config.
        token = var_child_runnable_config.set(caller)
        try:
            writer({"tool": tool, "thread_id": thread_id,
                    "progress": event.model_dump(mode="json")})
        finally:
            var_child_runnable_config.reset(token)

    return forward


def image_reference(ref: ImageRef) -> str:
    """How an image appears to a language model: its full hash (usable by generate_image) and size."""
    return f"[image sha256={ref.sha256} {ref.width}x{ref.height}]"


def document_as_text(document: Document, *, thread_id: str | None = None,
                     document_path: str | os.PathLike[str] | None = None,
                     image_sources: list[str] | None = None) -> str:
    """The document as plain text for a language model: never image bytes, only references.

    ``image_sources`` say how each input image was given (a path, a short hash, "a data URL of
    N bytes"), so that the caller can tell which of its images were used.
    """
    request = document.request
    lines = [f"Interleaved document for the request: {request.text}"]
    facts = [f"{len(document.steps)} steps", f"{document.generator_calls} generator calls"]
    if thread_id:
        facts.insert(0, f"thread {thread_id}")
    lines.append(f"({', '.join(facts)})")
    if document.profile in PROFILE_NOTES:
        # Stand-in output must never be mistaken for the real models' work.
        lines.append(f"Note: {PROFILE_NOTES[document.profile]}")
    for number, ref in enumerate(request.images, start=1):
        lines.append(f"Input image {number}: {image_reference(ref)}")
    if image_sources:
        given = "; ".join(f"{number}. {source}" for number, source in enumerate(image_sources, 1))
        lines.append(f"Input images as given: {given}")
    for step in document.steps:
        heading = f"Step {step.number}: {step.name}" if step.name else f"Step {step.number}"
        if step.status in ("forced", "skipped"):
            heading += f" (status: {step.status})"
        lines.append("")
        lines.append(heading)
        if step.text:
            lines.append(step.text)
        if step.image is not None:
            lines.append(image_reference(step.image))
    if document_path is not None:
        lines.append("")
        lines.append(f"HTML page: {document_path}")
    return "\n".join(lines)


class InterleaveTool(BaseTool):
    """Runs the planner -> generator -> critic pipeline for one request, one thread per call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = TOOL_NAME
    description: str = (
        "Create an interleaved document of text and images (a visual story, a step-by-step "
        "guide, a sequence of edits) from a request, optionally building on input images (file "
        "paths, sha256 references of earlier images, or data URLs). Returns each step's text "
        "and a reference to its image (sha256 and size)."
    )
    args_schema: type[BaseModel] = InterleaveInput
    response_format: str = "content_and_artifact"
    handle_tool_error: bool = True

    backends: Any = Field(default=None, exclude=True)
    profile: str | None = None
    model_settings: ModelSettings | None = Field(default=None, exclude=True)
    options: RunOptions | None = None
    run_dir: str | None = None
    checkpointer: str | None = None
    # A RunnableConfig (tags, metadata, run_name, callbacks, ...) for every pipeline run of this
    # tool, merged with the thread's own and with the calling run's callbacks (see run_config).
    config: dict[str, Any] | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _check_backends(self) -> InterleaveTool:
        # Checked here rather than typed: pydantic would copy the dataclass and its models.
        if self.backends is not None and not isinstance(self.backends, Backends):
            raise TypeError(f"backends must be a Backends, not {type(self.backends).__name__}")
        return self

    def run(self, tool_input: Any, *args: Any, tool_call_id: str | None = None,
            **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(tool_call_id)
        try:
            return super().run(tool_input, *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    async def arun(self, tool_input: Any, *args: Any, tool_call_id: str | None = None,
                   **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(tool_call_id)
        try:
            return await super().arun(tool_input, *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    def _run(self, request: str, images: list[str] | None = None, **_: Any
             ) -> tuple[str, Document]:
        thread_id = thread_id_for_call(_TOOL_CALL_ID.get(), request, images)
        caller = var_child_runnable_config.get()
        # Sync callers get the async path on a private loop, which also works inside a loop.
        with ThreadPoolExecutor(max_workers=1) as pool:
            result, sources = pool.submit(
                asyncio.run, self._generate(request, images, thread_id, caller)
            ).result()
        return self._reply(result, sources)

    async def _arun(self, request: str, images: list[str] | None = None, **_: Any
                    ) -> tuple[str, Document]:
        thread_id = thread_id_for_call(_TOOL_CALL_ID.get(), request, images)
        caller = var_child_runnable_config.get()
        return self._reply(*await self._generate(request, images, thread_id, caller))

    async def _generate(self, request: str, images: list[str] | None, thread_id: str,
                        caller: RunnableConfig | None) -> tuple[RunResult, list[str]]:
        refs, sources = await asyncio.to_thread(self._input_images, images or [])
        on_event = _forward_to_caller(caller, self.name, thread_id)
        # Of the caller's config only the callbacks carry over (the pipeline's runs nest under
        # the tool's run in traces, with the caller's tags and metadata); its recursion limit,
        # thread and checkpoint namespace describe the caller's graph, and a long trajectory
        # would trip the caller's limit. The tool's own ``config`` is merged with the thread's.
        token = var_child_runnable_config.set(None)
        try:
            # Other failures propagate: the caller's run stops and, resumed from its
            # checkpoint, re-runs this same tool call, which continues the same thread.
            result = await arun(
                request,
                images=refs,
                profile=self.profile,
                backends=self.backends,
                model_settings=self.model_settings,
                options=self.options,
                thread_id=thread_id,
                run_dir=self.run_dir,
                checkpointer=self.checkpointer,
                on_event=on_event,
                callbacks=caller.get("callbacks") if caller else None,
                config=self.config,  # type: ignore[arg-type]
            )
        finally:
            var_child_runnable_config.reset(token)
        return result, sources

    def _input_images(self, images: list[str]) -> tuple[list[ImageRef], list[str]]:
        """The images stored in the run's image store, and how each was given."""
        workspace = Workspace.open(
            self.run_dir, self.checkpointer, chosen_image_store(None, self.model_settings)
        )
        store = workspace.image_store
        refs, sources = [], []
        for number, image in enumerate(images, start=1):
            try:
                ref, source = resolve_input_image(store, image, what=f"input image {number}")
            except ImageError as exc:
                # The calling model's mistake: it gets a message it can act on
                # (handle_tool_error) instead of an exception that ends its run.
                raise ToolException(
                    exc.message + (f" ({exc.hint})" if exc.hint else "")
                ) from exc
            refs.append(ref)
            sources.append(source)
        return refs, sources

    @staticmethod
    def _reply(result: RunResult, sources: list[str] | None = None) -> tuple[str, Document]:
        text = document_as_text(
            result.document, thread_id=result.thread_id, document_path=result.document_path,
            image_sources=sources,
        )
        return text, result.document


def create_interleave_tool(
    *,
    backends: Backends | None = None,
    profile: str | None = None,
    model_settings: ModelSettings | None = None,
    options: RunOptions | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    name: str = TOOL_NAME,
    description: str | None = None,
    config: RunnableConfig | None = None,
) -> InterleaveTool:
    """An :class:`InterleaveTool` for an agent; give ``backends`` or a ``profile`` name.

    ``config`` (tags, metadata, run_name, callbacks, max_concurrency, recursion_limit) applies
    to every pipeline run of the tool, merged with the thread's own config (its thread id
    stays) and with the calling run's callbacks; a call's own ``RunnableConfig`` (given to
    ``invoke``) reaches the pipeline's runs through those callbacks.
    """
    extra = {"description": description} if description else {}
    return InterleaveTool(
        name=name,
        backends=backends,
        profile=profile,
        model_settings=model_settings,
        options=options,
        run_dir=None if run_dir is None else os.fspath(run_dir),
        checkpointer=checkpointer,
        config=dict(config) if config else None,
        **extra,
    )
