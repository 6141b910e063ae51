"""A record of finished generator calls, so a node that re-runs after a crash pays for nothing twice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from interleave_thinker.state import ImageRef
from interleave_thinker.storage.atomic import STAGING_DIR, sweep_abandoned_writes, write_atomically
from interleave_thinker.storage.image_store import ImageStorage


def generation_key(**fields: object) -> str:
    """A deterministic key for a generator request: sha256 of its canonical JSON fields."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class LedgerRecord(BaseModel):
    """One ledger file: the image a generator call produced and the thread that made the call.

    The thread lets ``interleave gc`` drop the records of deleted threads. Files written before
    it was stored hold a bare ``ImageRef``; they read back with ``thread_id`` None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    thread_id: str | None = None
    image: ImageRef


def parse_record(data: bytes) -> LedgerRecord:
    """Read a ledger file's bytes, in either layout; raise ValueError if they are not a record."""
    try:
        return LedgerRecord.model_validate_json(data)
    except ValidationError:
        # The earlier layout: the ImageRef alone.
        return LedgerRecord(image=ImageRef.model_validate_json(data))


def is_generation_key(name: str) -> bool:
    """Whether ``name`` is a generation key: 64 lowercase hex digits."""
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class GenerationRecords(Protocol):
    """What the generator node needs of a generation ledger (files: :class:`GenerationLedger`;
    PostgreSQL: ``storage.postgres_images.PostgresGenerationLedger``). Blocking calls."""

    def lookup(self, key: str) -> ImageRef | None: ...

    def record(self, key: str, ref: ImageRef, *, thread_id: str | None = None) -> None: ...

    def sweep_abandoned_writes(self) -> list[Path]: ...


class GenerationLedger:
    """Maps a generation key to the image it produced; written as soon as the image is stored.

    The checkpoint is written only after a whole node finishes, so without this a crash
    after some images of a batch were drawn would draw them again on resume.
    """

    def __init__(self, root: str | os.PathLike[str], store: ImageStorage) -> None:
        self.root = Path(root)
        self.store = store
        self.staging = self.root / STAGING_DIR

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written records that killed processes left behind."""
        return sweep_abandoned_writes(self.staging)

    def _path(self, key: str) -> Path:
        if not is_generation_key(key):
            raise ValueError(f"generation key {key!r} is not a sha256 hex digest")
        return self.root / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> ImageRef | None:
        """The image recorded for ``key``, or None if it was never recorded or its file is gone."""
        path = self._path(key)
        try:
            ref = parse_record(path.read_bytes()).image
        except (OSError, ValueError):
            return None
        # Fresh times tell `interleave gc` that a run is about to use both again. The image is
        # touched before it is checked: if gc took it away in between, it is drawn again.
        with contextlib.suppress(OSError):
            os.utime(path)
        if not self.store.touch(ref):
            return None
        # A record whose image was lost or damaged is as good as none: draw it again.
        return ref if self.store.contains(ref) else None

    def record(self, key: str, ref: ImageRef, *, thread_id: str | None = None) -> None:
        """Record that the call ``key`` of thread ``thread_id`` produced ``ref``."""
        data = LedgerRecord(thread_id=thread_id, image=ref).model_dump_json().encode()
        # Not synced: the image itself already is, and a record a power cut loses only means
        # drawing that image again (a process crash keeps it). The checkpoints, on SQLite's
        # WAL with synchronous=NORMAL, make the same trade.
        write_atomically(self._path(key), data, staging=self.staging, durable=False)
