"""A record of the critic's verdicts, so a critic node that runs again asks only about new attempts."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from interleave_thinker.state import Critique
from interleave_thinker.storage.atomic import STAGING_DIR, sweep_abandoned_writes, write_atomically
from interleave_thinker.storage.ledger import generation_key, is_generation_key

__all__ = [
    "VerdictLedger",
    "VerdictRecord",
    "VerdictRecords",
    "is_verdict_key",
    "parse_verdict_record",
    "verdict_key",
]


def verdict_key(**fields: object) -> str:
    """A deterministic key for one critic question: sha256 of its canonical JSON fields.

    The critic node passes everything the answer depends on: the thread, step and attempt, the
    critic's identity, the output mode and the messages themselves (prompts and the images by
    hash), so a changed question never finds an old answer.
    """
    return generation_key(kind="verdict", **fields)


is_verdict_key = is_generation_key


class VerdictRecord(BaseModel):
    """One verdict file: the critique, how long the critic took, and which thread asked.

    The thread lets ``interleave gc`` drop the records of deleted threads; step and attempt are
    there for people reading the folder.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    thread_id: str | None = None
    step: int | None = None
    attempt: int | None = None
    critique: Critique
    seconds: float = Field(default=0.0, ge=0.0)


def parse_verdict_record(data: bytes) -> VerdictRecord:
    """Read a verdict file's bytes; raise ValueError if they are not a record."""
    try:
        return VerdictRecord.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc


class VerdictRecords(Protocol):
    """What the critic node needs of a verdict ledger (files: :class:`VerdictLedger`; PostgreSQL:
    ``storage.postgres_images.PostgresVerdictLedger``). Blocking calls."""

    def lookup(self, key: str) -> VerdictRecord | None: ...

    def record(
        self,
        key: str,
        critique: Critique,
        *,
        seconds: float = 0.0,
        thread_id: str | None = None,
        step: int | None = None,
        attempt: int | None = None,
    ) -> None: ...

    def sweep_abandoned_writes(self) -> list[Path]: ...


class VerdictLedger:
    """Maps a verdict key to the critique the critic gave; written as soon as the verdict is parsed.

    The critic node judges a pass's attempts concurrently and its checkpoint is written only after
    all of them: without this a retry after one failed call, or a resume after a crash, would ask
    again about every attempt of the pass. Same layout and write rules as the generation ledger:
    ``<root>/<key[:2]>/<key>.json``, written atomically through ``<root>/.incoming``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.staging = self.root / STAGING_DIR

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written records that killed processes left behind."""
        return sweep_abandoned_writes(self.staging)

    def _path(self, key: str) -> Path:
        if not is_verdict_key(key):
            raise ValueError(f"verdict key {key!r} is not a sha256 hex digest")
        return self.root / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> VerdictRecord | None:
        """The verdict recorded for ``key``, or None if there is none (or its file is damaged)."""
        path = self._path(key)
        try:
            record = parse_verdict_record(path.read_bytes())
        except (OSError, ValueError):
            return None
        # A fresh time tells `interleave gc` that a run is about to use it again.
        with contextlib.suppress(OSError):
            os.utime(path)
        return record

    def record(
        self,
        key: str,
        critique: Critique,
        *,
        seconds: float = 0.0,
        thread_id: str | None = None,
        step: int | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record that the critic question ``key`` was answered with ``critique``."""
        data = VerdictRecord(
            thread_id=thread_id, step=step, attempt=attempt, critique=critique, seconds=max(0.0, seconds)
        ).model_dump_json().encode()
        # Not synced, as the generation ledger's records: losing one to a power cut only means
        # asking the critic again.
        write_atomically(self._path(key), data, staging=self.staging, durable=False)
