"""The whole pipeline for other agents and graphs: a LangChain tool, and a subgraph's start state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, ToolException
from langgraph.config import get_stream_writer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interleave_thinker.context import Backends
from interleave_thinker.events import ProgressEvent
from interleave_thinker.models.profiles import PROFILE_NOTES
from interleave_thinker.runner import EventHandler, RunResult, arun
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import (
    Document,
    ImageRef,
    RunOptions,
)
from interleave_thinker.workspace import new_thread_id

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
        description="Optional paths of input images to build on (guidance mode).",
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
                     document_path: str | os.PathLike[str] | None = None) -> str:
    """The document as plain text for a language model: never image bytes, only references."""
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
        "guide, a sequence of edits) from a request, optionally building on input image paths. "
        "Returns each step's text and a reference to its image (sha256 and size)."
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
            result = pool.submit(
                asyncio.run, self._generate(request, images, thread_id, caller)
            ).result()
        return self._reply(result)

    async def _arun(self, request: str, images: list[str] | None = None, **_: Any
                    ) -> tuple[str, Document]:
        thread_id = thread_id_for_call(_TOOL_CALL_ID.get(), request, images)
        caller = var_child_runnable_config.get()
        return self._reply(await self._generate(request, images, thread_id, caller))

    async def _generate(self, request: str, images: list[str] | None, thread_id: str,
                        caller: RunnableConfig | None) -> RunResult:
        for path in images or ():
            # A wrong path is the calling model's mistake: it gets a message it can act on
            # (handle_tool_error) instead of an exception that ends its run.
            if not Path(path).is_file():
                raise ToolException(f"input image {path} does not exist or is not a file")
        on_event = _forward_to_caller(caller, self.name, thread_id)
        # Of the caller's config only the callbacks carry over (the pipeline's runs nest under
        # the tool's run in traces); its recursion limit, thread and checkpoint namespace
        # describe the caller's graph, and a long trajectory would trip the caller's limit.
        token = var_child_runnable_config.set(
            {"callbacks": caller.get("callbacks")} if caller else None
        )
        try:
            # Other failures propagate: the caller's run stops and, resumed from its
            # checkpoint, re-runs this same tool call, which continues the same thread.
            return await arun(
                request,
                images=images or (),
                profile=self.profile,
                backends=self.backends,
                model_settings=self.model_settings,
                options=self.options,
                thread_id=thread_id,
                run_dir=self.run_dir,
                checkpointer=self.checkpointer,
                on_event=on_event,
            )
        finally:
            var_child_runnable_config.reset(token)

    @staticmethod
    def _reply(result: RunResult) -> tuple[str, Document]:
        text = document_as_text(
            result.document, thread_id=result.thread_id, document_path=result.document_path
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
) -> InterleaveTool:
    """An :class:`InterleaveTool` for an agent; give ``backends`` or a ``profile`` name."""
    extra = {"description": description} if description else {}
    return InterleaveTool(
        name=name,
        backends=backends,
        profile=profile,
        model_settings=model_settings,
        options=options,
        run_dir=None if run_dir is None else os.fspath(run_dir),
        checkpointer=checkpointer,
        **extra,
    )
