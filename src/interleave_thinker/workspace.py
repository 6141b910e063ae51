"""The run directory and its rules: where images, ledger, pages and checkpoints live, and thread ids."""

from __future__ import annotations

import base64
import binascii
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
from interleave_thinker.render.html import render_html_chunks
from interleave_thinker.settings import redact_url
from interleave_thinker.state import Document, ImageRef, TrajectoryState
from interleave_thinker.storage.atomic import STAGING_DIR, sweep_abandoned_writes, write_atomically
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES, ImageStorage
from interleave_thinker.storage.ledger import GenerationRecords
from interleave_thinker.storage.stores import (
    DEFAULT_IMAGE_STORE,
    IMAGE_STORE_ENV,
    Stores,
    check_image_store_url,
    image_folder,
    open_stores,
)

RUN_DIR_ENV = "INTERLEAVE_RUN_DIR"
DEFAULT_RUN_DIR = "interleave-runs"
THREAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What to do when a command that only reads finds no run directory (or no checkpoints in it).
MISSING_RUN_DIR_HINT = (
    "pass the --run-dir (or $INTERLEAVE_RUN_DIR) and --checkpointer the runs used; `interleave "
    "run` creates a run directory, list, show, export and gc never do"
)
# SQLite keeps its write-ahead log and shared memory beside the database.
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Workspace:
    """A run directory: documents and (by default) checkpoints, images, generation ledger and
    verdicts; ``image_store_url`` may put the last three in PostgreSQL (see storage/stores.py)."""

    run_dir: Path
    checkpointer_url: str
    image_store_url: str = DEFAULT_IMAGE_STORE

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike[str] | None = None,
        checkpointer: str | None = None,
        image_store: str | None = None,
    ) -> Workspace:
        """The run directory ``run_dir`` (else $INTERLEAVE_RUN_DIR, else ./interleave-runs), its
        checkpointer and its image store (else $INTERLEAVE_IMAGE_STORE, else ``file://``)."""
        chosen = Path(run_dir or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)
        if chosen.exists() and not chosen.is_dir():
            raise ConfigurationError(
                f"run directory {chosen} exists and is not a directory",
                hint="pass --run-dir with a directory path",
            )
        store = check_image_store_url(image_store or os.environ.get(IMAGE_STORE_ENV) or DEFAULT_IMAGE_STORE)
        return cls(chosen, checkpointer or default_checkpointer_url(chosen), store)

    def stores(self) -> Stores:
        """The image store and the two ledgers (nothing is opened until first used)."""
        return open_stores(self.image_store_url, self.run_dir)

    @property
    def image_store(self) -> ImageStorage:
        return self.stores().images

    @property
    def ledger(self) -> GenerationRecords:
        return self.stores().ledger

    def context(
        self, backends: Backends, timeouts: Timeouts | None = None, *, prompts: PromptPack | None = None
    ) -> Context:
        stores = self.stores()
        store, ledger, verdicts = stores.images, stores.ledger, stores.verdicts
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
            # Rendered in pieces before the write: the images are read (and their hashes
            # checked) first, so a missing or damaged image stops the page before any file is made.
            page = list(render_html_chunks(document, self.image_store, thread_id=thread_id))
            # A page write a killed run left half-done is cleared first (a finished thread's
            # resume writes only this page, without opening a Context).
            sweep_abandoned_writes(self.documents_staging)
            write_atomically(path, page, staging=self.documents_staging)
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
        folder = image_folder(self.image_store_url, self.run_dir)
        if folder is not None and folder not in protected:
            protected.append(folder)
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

    def missing_checkpoints(self) -> str | None:
        """Why a command that only reads (list, show, export, gc) finds no thread here, said
        before anything is opened (opening a SQLite checkpointer creates its folder and file):
        "there is no run directory at X" or "there is no checkpoint database at FILE". None
        when the database exists, or lives elsewhere (memory://, PostgreSQL)."""
        if not self.checkpointer_url.startswith("sqlite:///"):
            return None
        database = sqlite_path(self.checkpointer_url)
        if database.exists():
            return None
        if not self.run_dir.exists():
            return f"there is no run directory at {self.run_dir}"
        return f"there is no checkpoint database at {database}"

    def refuse_missing_thread(self, thread_id: str) -> None:
        """UnknownThreadError naming what is missing (see ``missing_checkpoints``), creating nothing."""
        missing = self.missing_checkpoints()
        if missing is not None:
            raise UnknownThreadError(
                f"no thread {validate_thread_id(thread_id)!r}: {missing}", hint=MISSING_RUN_DIR_HINT
            )


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


def store_input_images(store: ImageStorage, paths: Sequence[str | os.PathLike[str]]) -> list[ImageRef]:
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


# An input image as the Python API and the tools take it: a file path, a ``sha256:HEX`` reference
# of an image in the store (the bare 64 hex digits too, unless a file has that name), a
# ``data:image/...;base64,...`` URL, or an ``ImageRef`` of a stored image.
InputImage = str | os.PathLike[str] | ImageRef

# Lower case only, as the store names images: anything else is not taken for a hash.
_HASH_REFERENCE = re.compile(r"^(sha256:)?([0-9a-f]{64})$")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_DATA_URL_HEAD = re.compile(r"^data:([^,]*),", re.IGNORECASE)
_INPUT_IMAGE_HINT = (
    "pass a PNG, JPEG or WebP file path, a sha256:HEX reference of a stored image or a "
    "data:image/...;base64,... URL"
)


def resolve_input_images(
    store: ImageStorage, images: Sequence[InputImage], *, what: str = "input image"
) -> list[ImageRef]:
    """The references of ``images`` (see :data:`InputImage`), each stored as the models will see
    it (see ``normalise_input``); ImageError names the one that cannot be used and why."""
    return [resolve_input_image(store, image, what=what)[0] for image in images]


def resolve_input_image(
    store: ImageStorage, image: InputImage, *, what: str = "input image", normalise: bool = True
) -> tuple[ImageRef, str]:
    """One input image stored, and how it was given in words safe to show (a path, a short hash,
    "a data URL of N bytes": never the payload).

    ``normalise=False`` keeps an image named by its hash as stored (an edit's source) instead of
    storing its 8-bit RGB form; paths and data URLs are always stored normalised.
    """
    if isinstance(image, ImageRef):
        if not store.contains(image):
            raise ImageError(f"{what} {image.short} is not in {store.location}", hint=_INPUT_IMAGE_HINT)
        return _stored(store, image, what, normalise), f"sha256:{image.short}"
    if isinstance(image, str):
        reference = _HASH_REFERENCE.fullmatch(image)
        # Bare hex names a file of that name first; with the prefix it is always a hash.
        if reference and (reference.group(1) or not os.path.lexists(image)):
            try:
                found = store.find(reference.group(2))
            except ImageError as exc:
                raise ImageError(f"{what}: {exc.message}", hint=exc.hint) from exc
            return _stored(store, found, what, normalise), f"sha256:{found.short}"
        if _DATA_URL_HEAD.match(image):
            data = _data_url_bytes(image, what)
            shown = f"a data URL of {len(data)} bytes"
            return store.put_input(data, what=f"{what} ({shown})"), shown
    elif not isinstance(image, os.PathLike):
        raise ImageError(
            f"{what} is a {type(image).__name__}, not a path, an image reference or a data URL",
            hint=_INPUT_IMAGE_HINT,
        )
    shown = shown_path(image)
    if not os.path.lexists(image):
        raise ImageError(
            f"{what} {shown} does not exist, and is not an image hash or a data URL",
            hint=_INPUT_IMAGE_HINT,
        )
    try:
        # Read bounded and without blocking, as store_input_images does.
        data = read_user_file(
            image, what=what, max_bytes=MAX_IMAGE_BYTES, error=ImageError, hint=_INPUT_IMAGE_HINT
        )
        return store.put_input(data, what=f"{what} {shown}"), shown
    except ImageError as exc:
        # Text that names no image file (a mistyped hash that happens to be a path) says so.
        if isinstance(image, str) and not image.lower().endswith(_IMAGE_SUFFIXES):
            raise ImageError(
                f"{exc.message}; it is not an image hash or a data URL either", hint=exc.hint
            ) from exc
        raise


def _stored(store: ImageStorage, ref: ImageRef, what: str, normalise: bool) -> ImageRef:
    # An image the generator drew may carry transparency: as an input it is made 8-bit RGB like
    # any other (the same bytes, and so the same reference, when it already is).
    if not normalise:
        return ref
    return store.put_input(store.read(ref), what=f"{what} sha256:{ref.short}")


def _data_url_bytes(url: str, what: str) -> bytes:
    """The bytes of a base64 data URL; refused when it is not base64 or is over the size limit."""
    head, _, payload = url.partition(",")
    if not head.lower().endswith(";base64"):
        raise ImageError(f"{what} is a data URL without base64 encoding", hint=_INPUT_IMAGE_HINT)
    payload = "".join(payload.split())
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise ImageError(
            f"{what} is a data URL over the {MAX_IMAGE_BYTES:,} byte limit",
            hint="resize or recompress the image",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(
            f"{what} is a data URL whose payload is not valid base64", hint=_INPUT_IMAGE_HINT
        ) from exc
