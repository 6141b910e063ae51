"""The run directory and its rules: where images, ledger, pages and checkpoints live, and thread ids."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph.graph.state import CompiledStateGraph

from interleave_thinker.checkpoints.faults import check_state, file_error, storage_faults
from interleave_thinker.checkpoints.savers import default_checkpointer_url, open_checkpointer, sqlite_path
from interleave_thinker.context import Backends, Context, Timeouts
from interleave_thinker.errors import ConfigurationError, ImageError, UnknownThreadError
from interleave_thinker.graph import build_graph
from interleave_thinker.input_files import read_user_file, shown_path
from interleave_thinker.prompts.packs import InterleavePack, PromptPack
from interleave_thinker.render.html import render_html
from interleave_thinker.settings import redact_url
from interleave_thinker.state import Document, ImageRef, TrajectoryState
from interleave_thinker.storage.atomic import STAGING_DIR, sweep_abandoned_writes, write_atomically
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES, ImageStore
from interleave_thinker.storage.ledger import GenerationLedger
from interleave_thinker.storage.verdicts import VerdictLedger

RUN_DIR_ENV = "INTERLEAVE_RUN_DIR"
DEFAULT_RUN_DIR = "interleave-runs"
THREAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# SQLite keeps its write-ahead log and shared memory beside the database.
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


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

    @property
    def ledger(self) -> GenerationLedger:
        return GenerationLedger(self.run_dir / "generations", self.image_store)

    def context(
        self, backends: Backends, timeouts: Timeouts | None = None, *, prompts: PromptPack | None = None
    ) -> Context:
        store = self.image_store
        ledger = GenerationLedger(self.run_dir / "generations", store)
        verdicts = VerdictLedger(self.run_dir / "verdicts")
        # Writes a killed run left half-done are cleared before new ones start.
        store.sweep_abandoned_writes()
        ledger.sweep_abandoned_writes()
        verdicts.sweep_abandoned_writes()
        return Context(
            backends=backends,
            image_store=store,
            ledger=ledger,
            verdicts=verdicts,
            timeouts=timeouts or Timeouts(),
            prompts=prompts or InterleavePack(),
        )

    @property
    def documents_staging(self) -> Path:
        """Where document pages are written before their rename into place."""
        return self.run_dir / "documents" / STAGING_DIR

    def document_path(self, thread_id: str) -> Path:
        return self.run_dir / "documents" / validate_thread_id(thread_id) / "document.html"

    def write_document_page(self, thread_id: str, document: Document) -> Path:
        """Render ``document`` as HTML to its place under ``documents/``, atomically."""
        path = self.document_path(thread_id)
        try:
            html = render_html(document, self.image_store, thread_id=thread_id)
            # A page write a killed run left half-done is cleared first (a finished thread's
            # resume writes only this page, without opening a Context).
            sweep_abandoned_writes(self.documents_staging)
            write_atomically(path, html.encode("utf-8"), staging=self.documents_staging)
        except OSError as exc:
            # The thread is finished and checkpointed: only the page is missing.
            failed = file_error(
                exc,
                thread_id,
                what=f"the document page {path}",
                then=f"`interleave resume {thread_id}` writes the page (nothing is drawn again)",
            )
            if failed is None:
                raise
            raise failed from exc
        return path

    def protected_paths(self) -> list[Path]:
        """What an export must never replace or write into: the checkpoint database and its
        companion files, the image store, the generation ledger and the verdict records."""
        protected = [self.run_dir / "images", self.run_dir / "generations", self.run_dir / "verdicts"]
        if self.checkpointer_url.startswith("sqlite:///"):
            database = sqlite_path(self.checkpointer_url)
            protected += [database, *(database.with_name(database.name + s) for s in _SQLITE_COMPANIONS)]
        return protected

    @asynccontextmanager
    async def graph(self) -> AsyncIterator[CompiledStateGraph[TrajectoryState, Context]]:
        async with open_checkpointer(self.checkpointer_url) as saver:
            yield build_graph(checkpointer=saver)

    async def existing_state(
        self, graph: CompiledStateGraph[TrajectoryState, Context], thread_id: str
    ) -> TrajectoryState:
        """The thread's latest state; UnknownThreadError when the checkpointer has no such
        thread, StorageError when it cannot be read (DamagedCheckpointError: it is damaged)."""
        with storage_faults(thread_id, self.checkpointer_url):
            snapshot = await graph.aget_state(thread_config(validate_thread_id(thread_id)))
        if not snapshot.values:
            raise UnknownThreadError(
                f"no thread {thread_id!r} in {redact_url(self.checkpointer_url)}",
                hint="`interleave list` shows the threads; check --run-dir and --checkpointer",
            )
        check_state(thread_id, snapshot.values)
        return snapshot.values


def thread_config(thread_id: str) -> dict[str, Any]:
    """The RunnableConfig that addresses one thread (its id also goes into trace metadata)."""
    return {"configurable": {"thread_id": thread_id}, "metadata": {"thread_id": thread_id}}


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


def store_input_images(store: ImageStore, paths: Sequence[str | os.PathLike[str]]) -> list[ImageRef]:
    """Store the user's input images as the models will see them (8-bit RGB, upright, opaque:
    see ``normalise_input``), refusing anything that is not a readable still PNG, JPEG or WebP."""
    refs = []
    for path in paths:
        # Read bounded and without blocking: a FIFO, /dev/zero or a huge sparse file is refused
        # before any of it is read.
        data = read_user_file(
            path,
            what="input image",
            max_bytes=MAX_IMAGE_BYTES,
            error=ImageError,
            hint="pass a PNG, JPEG or WebP file with --image",
        )
        refs.append(store.put_input(data, what=f"input image {shown_path(path)}"))
    return refs

