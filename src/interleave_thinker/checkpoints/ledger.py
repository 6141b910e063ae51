"""A record of finished generator calls, so a node that re-runs after a crash pays for nothing twice."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import ValidationError

from interleave_thinker.checkpoints.image_store import (
    STAGING_DIR,
    ImageStore,
    sweep_abandoned_writes,
    write_atomically,
)
from interleave_thinker.state import ImageRef


def generation_key(**fields: object) -> str:
    """A deterministic key for a generator request: sha256 of its canonical JSON fields."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class GenerationLedger:
    """Maps a generation key to the image it produced; written as soon as the image is stored.

    The checkpoint is written only after a whole node finishes, so without this a crash
    after some images of a batch were drawn would draw them again on resume.
    """

    def __init__(self, root: str | os.PathLike[str], store: ImageStore) -> None:
        self.root = Path(root)
        self.store = store
        self.staging = self.root / STAGING_DIR

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written records that killed processes left behind."""
        return sweep_abandoned_writes(self.staging)

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"generation key {key!r} is not a sha256 hex digest")
        return self.root / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> ImageRef | None:
        """The image recorded for ``key``, or None if it was never recorded or its file is gone."""
        path = self._path(key)
        try:
            ref = ImageRef.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None
        # A record whose image was lost or damaged is as good as none: draw it again.
        return ref if self.store.contains(ref) else None

    def record(self, key: str, ref: ImageRef) -> None:
        write_atomically(self._path(key), ref.model_dump_json().encode(), staging=self.staging)
