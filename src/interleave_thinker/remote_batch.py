"""Batch runs through an agent server (`interleave batch FILE --server URL`): one background run per
prompt on the server's queue, so the workers of every machine behind it share the work.

Each prompt's thread id is a UUID derived from its id (:func:`server_thread_id`), so running the
same file again never starts a second thread: a finished thread is skipped, an unfinished one
resumed where it stopped (input null), a thread with a run still going is waited for, and only
a new one is started. Input images are uploaded first (``POST /interleave/images``). When the
runs finish, each document page is rendered here, from the thread's state and its images
fetched from the server, into ``<run-dir>/documents/<thread>/document.html``, and the manifest
and index are written as a local batch writes them (see ``batch.py``).

The client only talks HTTP (``langgraph_sdk``): a server that restarts or a connection that
drops is retried for ``patience`` seconds from the last answer before the prompt counts as
failed; running the batch again picks up from the threads' state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from interleave_thinker.batch import (
    BadLine,
    BatchReport,
    ProgressHandler,
    PromptLine,
    PromptOutcome,
    _write_results,
    batch_image_paths,
    read_prompt_file,
)
from interleave_thinker.errors import ConfigurationError, ImageError, InterleaveError, one_line
from interleave_thinker.input_files import read_user_file
from interleave_thinker.state import Document, ImageRef, RunOptions
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES
from interleave_thinker.workspace import Workspace

logger = logging.getLogger(__name__)

ASSISTANT_ID = "interleave"
# Thread ids on the server: uuid5 of the prompt id in this namespace (servers want UUIDs).
THREAD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/interleave-thinker/batch")
RUNNING = ("pending", "running")
# Seconds between two looks at a run, and how long the server may stay silent (restarting,
# unreachable) before a prompt counts as failed.
POLL_S = 1.0
PATIENCE_S = 300.0

T = TypeVar("T")


def server_thread_id(prompt_id: str) -> str:
    """The server thread of a prompt: the same id for the same prompt id, on every machine."""
    return str(uuid.uuid5(THREAD_NAMESPACE, prompt_id))


class _PromptFailed(Exception):
    """This prompt cannot finish: the message goes into the manifest."""


class _Transient(Exception):
    """The server did not answer (down, restarting, overloaded): try again."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 425, 429, 500, 502, 503, 504)
    return False


def _status_of(exc: BaseException) -> int | None:
    return exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None


def _server_error(exc: httpx.HTTPStatusError) -> str:
    try:
        body = exc.response.json()
    except ValueError:
        body = exc.response.text[:300]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("message") or body
        hint = body.get("hint")
        return f"{detail} (hint: {hint})" if hint else str(detail)
    return f"HTTP {exc.response.status_code}: {body}"


class RemoteBatch:
    """One batch through one server: the HTTP calls for each prompt, retried while it restarts."""

    def __init__(
        self,
        client: Any,
        prompt_file: Path,
        workspace: Workspace,
        graph_input: dict[str, Any],
        options: RunOptions,
        *,
        assistant_id: str = ASSISTANT_ID,
        allow_outside_images: bool = False,
        poll_s: float = POLL_S,
        patience_s: float = PATIENCE_S,
    ) -> None:
        self.client = client
        self.http: httpx.AsyncClient = client.http.client
        self.prompt_file = prompt_file
        self.workspace = workspace
        self.graph_input = graph_input
        self.options = options
        self.assistant_id = assistant_id
        self.allow_outside_images = allow_outside_images
        self.poll_s = poll_s
        self.patience_s = patience_s

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; a server that does not answer is asked again until ``patience_s`` pass."""
        started = time.monotonic()
        delay = 0.5
        while True:
            try:
                return await call()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if time.monotonic() - started > self.patience_s:
                    raise _PromptFailed(
                        f"the server did not answer for {self.patience_s:.0f} s ({one_line(exc)}); "
                        "run the batch again once it is up: it continues where it stopped"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run_prompt(self, item: PromptLine) -> PromptOutcome:
        """Start, resume or wait for the prompt's thread until its run ends; its page written."""
        thread_id = server_thread_id(item.prompt.id)
        try:
            document = await self._drive(item, thread_id)
            page = await self._write_page(thread_id, document)
        except _PromptFailed as exc:
            return PromptOutcome(item.prompt.id, item.line, thread_id, "failed", error=str(exc))
        except (InterleaveError, ValidationError, OSError) as exc:
            message = exc.message if isinstance(exc, InterleaveError) else one_line(exc)
            return PromptOutcome(
                item.prompt.id, item.line, thread_id, "failed", error=" ".join(message.split())
            )
        except httpx.HTTPStatusError as exc:
            return PromptOutcome(
                item.prompt.id, item.line, thread_id, "failed", error=_server_error(exc)
            )
        return PromptOutcome(
            item.prompt.id, item.line, thread_id, "done", str(page),
            generator_calls=document.generator_calls,
        )

    async def _drive(self, item: PromptLine, thread_id: str) -> Document:
        await self._call(
            lambda: self.client.threads.create(
                thread_id=thread_id,
                if_exists="do_nothing",
                metadata={"interleave_prompt_id": item.prompt.id, "interleave_line": item.line},
            )
        )
        while True:
            state = await self._call(lambda: self.client.threads.get_state(thread_id))
            values = _values(state)
            if values.get("document") is not None:
                return Document.model_validate(values["document"])
            run_id = await self._active_run(thread_id)
            if run_id is None:
                run_id = await self._submit(item, thread_id, values)
                if run_id is None:
                    continue  # another client started one meanwhile: look again
            status = await self._wait(thread_id, run_id)
            if status == "success":
                state = await self._call(lambda: self.client.threads.get_state(thread_id))
                values = _values(state)
                if values.get("document") is not None:
                    return Document.model_validate(values["document"])
                if state.get("interrupts") or any(t.get("interrupts") for t in state.get("tasks", [])):
                    raise _PromptFailed(
                        "the thread waits for a review; answer it through the server "
                        "(batch runs should not ask for --review-plan or --review-forced)"
                    )
                raise _PromptFailed("the run ended without a document")
            if status in RUNNING:
                continue
            raise _PromptFailed(await self._run_error(thread_id, run_id, status))

    async def _active_run(self, thread_id: str) -> str | None:
        runs = await self._call(lambda: self.client.runs.list(thread_id, limit=20))
        for run in runs:
            if run.get("status") in RUNNING:
                return str(run["run_id"])
        return None

    def _check_same(self, item: PromptLine, thread_id: str, values: dict[str, Any]) -> None:
        """Refuse to continue a thread started for another text or with other settings."""
        differences = []
        request = values.get("request") or {}
        if request.get("text") != item.prompt.text:
            differences.append("request: the text differs")
        elif len(request.get("images") or ()) != len(item.prompt.images):
            differences.append("request: the number of input images differs")
        settings = values.get("settings") or {}
        profile = self.graph_input.get("profile")
        if profile and settings.get("profile") != profile:
            differences.append(f"profile: thread has {settings.get('profile')!r}, this run has {profile!r}")
        stored = settings.get("options")
        if isinstance(stored, dict):
            wanted = self.options.model_dump(mode="json")
            for key in sorted(set(stored) | set(wanted)):
                if stored.get(key) != wanted.get(key):
                    differences.append(f"options.{key}: thread has {stored.get(key)!r}, "
                                       f"this run has {wanted.get(key)!r}")
        if differences:
            raise _PromptFailed(
                f"thread {thread_id} was started with other settings: " + "; ".join(differences)
                + "; give the prompt a new id, or run the batch with the thread's own options"
            )

    async def _submit(self, item: PromptLine, thread_id: str, values: dict[str, Any]) -> str | None:
        """Resume the thread (input null) if it got past preparing, else start it; the run id,
        or None when the server refuses because a run is already going on the thread."""
        if values.get("request") is not None and values.get("settings") is not None:
            self._check_same(item, thread_id, values)
            graph_input: dict[str, Any] | None = None
        else:
            images = [ref.sha256 for ref in await self._upload_images(item)]
            graph_input = {**self.graph_input, "text": item.prompt.text, "images": images}
        try:
            run = await self._call(
                lambda: self.client.runs.create(
                    thread_id,
                    self.assistant_id,
                    input=graph_input,
                    metadata={"interleave_prompt_id": item.prompt.id},
                    multitask_strategy="reject",
                    durability="sync",
                )
            )
        except httpx.HTTPStatusError as exc:
            if _status_of(exc) == 409:  # a run is in flight on this thread
                return None
            raise
        return str(run["run_id"])

    async def _upload_images(self, item: PromptLine) -> list[ImageRef]:
        paths = batch_image_paths(
            self.prompt_file, item.prompt.images, allow_outside=self.allow_outside_images
        )
        refs = []
        for path in paths:
            data = await asyncio.to_thread(
                read_user_file, path, what="input image", max_bytes=MAX_IMAGE_BYTES,
                error=ImageError, hint="pass a PNG, JPEG or WebP file",
            )

            async def upload(data: bytes = data) -> httpx.Response:
                response = await self.http.post("/interleave/images", content=data)
                response.raise_for_status()
                return response

            try:
                response = await self._call(upload)
            except httpx.HTTPStatusError as exc:
                raise _PromptFailed(f"input image {path.name}: {_server_error(exc)}") from exc
            refs.append(ImageRef.model_validate(response.json()))
        return refs

    async def _wait(self, thread_id: str, run_id: str) -> str:
        """The run's status once it is no longer pending or running."""
        while True:
            run = await self._call(lambda: self.client.runs.get(thread_id, run_id))
            status = str(run.get("status"))
            if status not in RUNNING:
                return status
            await asyncio.sleep(self.poll_s)

    async def _run_error(self, thread_id: str, run_id: str, status: str) -> str:
        """What the server says went wrong with a run that ended without success."""
        try:
            result = await self._call(lambda: self.client.runs.join(thread_id, run_id))
        except Exception:  # only a nicer message is lost
            result = None
        error = result.get("__error__") if isinstance(result, dict) else None
        if isinstance(error, dict) and error.get("message"):
            kind = error.get("error")
            return f"{kind}: {error['message']}" if kind else str(error["message"])
        return f"the run ended with status {status!r}; run the batch again to resume it"

    async def _write_page(self, thread_id: str, document: Document) -> Path:
        """The document's HTML page, rendered here from images fetched from the server."""
        store = self.workspace.image_store
        for ref in _image_refs(document):
            if await asyncio.to_thread(store.contains, ref):
                continue

            async def fetch(ref: ImageRef = ref) -> bytes:
                response = await self.http.get(f"/interleave/images/{ref.sha256}")
                response.raise_for_status()
                return response.content

            data = await self._call(fetch)
            stored = await asyncio.to_thread(store.put, data, what=f"image {ref.sha256[:12]}")
            if stored.sha256 != ref.sha256:
                raise _PromptFailed(f"the server sent other bytes for image {ref.sha256[:12]}")
        return await asyncio.to_thread(self.workspace.write_document_page, thread_id, document)


def _values(state: Any) -> dict[str, Any]:
    """A thread state's values; a thread with no checkpoint yet has none (servers send [] or {})."""
    values = state.get("values") if isinstance(state, dict) else None
    return values if isinstance(values, dict) else {}


def _image_refs(record: object) -> list[ImageRef]:
    """Every image a record names (steps' images and their attempts'), each once."""
    found: dict[str, ImageRef] = {}

    def walk(value: object) -> None:
        if isinstance(value, ImageRef):
            found.setdefault(value.sha256, value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(record)
    return list(found.values())


def server_input(profile: str | None, options: RunOptions) -> dict[str, Any]:
    """What every prompt's run input carries besides its text and images."""
    graph_input: dict[str, Any] = {"options": options.model_dump(mode="json", exclude_defaults=True)}
    if profile:
        graph_input["profile"] = profile
    return graph_input


async def arun_remote_batch(
    prompt_file: str | os.PathLike[str],
    server: str,
    *,
    profile: str | None = None,
    options: RunOptions | None = None,
    concurrency: int = 4,
    run_dir: str | os.PathLike[str] | None = None,
    image_store: str | None = None,
    on_progress: ProgressHandler | None = None,
    allow_outside_images: bool = False,
    assistant_id: str = ASSISTANT_ID,
    api_key: str | None = None,
    poll_s: float = POLL_S,
    patience_s: float = PATIENCE_S,
) -> BatchReport:
    """Run every prompt of ``prompt_file`` as a background run on the agent server ``server``.

    ``concurrency`` is how many of the batch's runs are on the server's queue at once: set it to
    at least the job slots of all its workers. ``profile`` and ``options`` go into each run's
    input (the models themselves are the server's settings). Documents, manifest and index are
    written under ``run_dir`` here; pages take their images from ``image_store`` when it has
    them (a shared PostgreSQL store), else from the server. ``api_key`` (else
    ``$LANGGRAPH_API_KEY``) is sent as the SDK sends it.
    """
    from langgraph_sdk import get_client

    if concurrency < 1:
        raise ConfigurationError("--concurrency must be at least 1")
    if not server.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"--server {server[:60]!r} is not an http(s) URL", hint="for example http://127.0.0.1:2026"
        )
    path = Path(prompt_file)
    lines, bad_lines = read_prompt_file(path)
    workspace = Workspace.open(run_dir, None, image_store)
    options = options or RunOptions()
    kwargs: dict[str, Any] = {"url": server.rstrip("/")}
    if api_key is not None:
        kwargs["api_key"] = api_key
    client = get_client(**kwargs)
    batch = RemoteBatch(
        client, path, workspace, server_input(profile, options), options,
        assistant_id=assistant_id, allow_outside_images=allow_outside_images,
        poll_s=poll_s, patience_s=patience_s,
    )
    notify = on_progress or (lambda _: None)
    notify({"event": "batch", "total": len(lines), "bad_lines": len(bad_lines)})
    limit = asyncio.Semaphore(concurrency)
    finished: dict[int, PromptOutcome] = {}

    async def one(item: PromptLine) -> None:
        async with limit:
            notify({"event": "started", "prompt_id": item.prompt.id})
            try:
                outcome = await batch.run_prompt(item)
            except Exception as exc:  # a bug or an answer we do not understand: this prompt only
                logger.error("prompt %r failed", item.prompt.id, exc_info=True)
                outcome = PromptOutcome(
                    item.prompt.id, item.line, server_thread_id(item.prompt.id), "failed",
                    error=f"{type(exc).__name__}: {one_line(exc)}",
                )
            finished[item.line] = outcome
            notify({"event": "finished", "prompt_id": item.prompt.id, "status": outcome.status})

    stopped = "the batch stopped before this prompt finished; run the batch again to continue it"
    try:
        await asyncio.gather(*(one(item) for item in lines))
    finally:
        outcomes = [
            finished.get(item.line)
            or PromptOutcome(item.prompt.id, item.line, server_thread_id(item.prompt.id), "failed",
                             error=stopped)
            for item in lines
        ]
        manifest, index = await asyncio.to_thread(
            _write_results, workspace.run_dir, path, (0, 1), outcomes, bad_lines
        )
        await client.aclose()
    # The server's workers make the generator calls; this process makes none.
    return BatchReport(outcomes, bad_lines, manifest, index, backend_calls=0)


__all__ = [
    "ASSISTANT_ID",
    "THREAD_NAMESPACE",
    "BadLine",
    "RemoteBatch",
    "arun_remote_batch",
    "server_input",
    "server_thread_id",
]
