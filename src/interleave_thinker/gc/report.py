"""What gc found and removed in a run directory, in words or as JSON; durations such as ``1h``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError, InterleaveError

__all__ = ["GarbageCollectionRefused", "GcFile", "GcReport", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class GarbageCollectionRefused(InterleaveError):
    """gc would not remove anything: the checkpointer could not be read or looks like the wrong one."""


@dataclass(frozen=True)
class GcFile:
    """A file gc found: where, how big, and when it was last written. A row of a PostgreSQL
    store is named ``<table>/<key>`` (a str), its time that of its last store or lookup."""

    path: Path | str
    size: int
    mtime: float


@dataclass
class GcReport:
    """What gc found in a run directory and what it removed (or would remove, in a dry run)."""

    run_dir: Path
    checkpointer: str
    delete: bool
    min_age_s: float
    threads: int = 0
    checkpoints: int = 0
    images: int = 0
    image_bytes: int = 0
    referenced_images: int = 0
    records: int = 0
    # Records written before ledger files named their thread: kept, their images counted in use.
    records_without_thread: int = 0
    orphan_images: list[GcFile] = field(default_factory=list)
    orphan_records: list[GcFile] = field(default_factory=list)
    young_images: list[GcFile] = field(default_factory=list)
    young_records: list[GcFile] = field(default_factory=list)
    # Orphans written again by a run while gc was removing them: put back, not removed.
    in_use: list[GcFile] = field(default_factory=list)
    temp_files: list[GcFile] = field(default_factory=list)
    unknown: list[Path] = field(default_factory=list)
    # The critic's recorded verdicts (verdicts/): like ledger records, garbage once their thread
    # is gone; they name no image.
    verdicts: int = 0
    orphan_verdicts: list[GcFile] = field(default_factory=list)
    young_verdicts: list[GcFile] = field(default_factory=list)
    # The image store when it is not the run directory (a PostgreSQL URL, shown without password).
    image_store: str | None = None

    @property
    def orphan_bytes(self) -> int:
        return sum(item.size for item in self.orphan_images + self.orphan_records + self.orphan_verdicts)

    def as_json(self) -> dict[str, Any]:
        """The report as plain JSON data (``interleave gc --json``)."""

        def paths(items: Iterable[GcFile]) -> list[str]:
            return [str(item.path) for item in items]

        return {
            "run_dir": str(self.run_dir),
            "checkpointer": self.checkpointer,
            "image_store": self.image_store,
            "mode": "delete" if self.delete else "dry-run",
            "min_age_seconds": self.min_age_s,
            "threads": self.threads,
            "checkpoints": self.checkpoints,
            "images": {
                "stored": self.images,
                "bytes": self.image_bytes,
                "referenced": self.referenced_images,
                "unreferenced": len(self.orphan_images),
                "unreferenced_bytes": sum(item.size for item in self.orphan_images),
                "kept_young": len(self.young_images),
            },
            "records": {
                "stored": self.records,
                "of_deleted_threads": len(self.orphan_records),
                "kept_young": len(self.young_records),
                "without_thread": self.records_without_thread,
            },
            "verdicts": {
                "stored": self.verdicts,
                "of_deleted_threads": len(self.orphan_verdicts),
                "kept_young": len(self.young_verdicts),
            },
            "removed" if self.delete else "would_remove": {
                "images": paths(self.orphan_images),
                "records": paths(self.orphan_records),
                "verdicts": paths(self.orphan_verdicts),
            },
            "kept_in_use": paths(self.in_use),
            "temp_files": paths(self.temp_files),
            "unknown_files": [str(path) for path in self.unknown],
        }

    def summary(self, *, verbose: bool = False) -> list[str]:
        """The report in a few lines of words; ``verbose`` lists every file as well."""
        would = "removed" if self.delete else "would remove"
        lines = [] if self.delete else [
            "dry run: nothing was removed; run again with --delete to remove what is listed"
        ]
        lines.append(f"checkpointer {self.checkpointer}: {_count(self.threads, 'thread')}, "
                     f"{_count(self.checkpoints, 'checkpoint')} read")
        if self.image_store:
            lines.append(f"image store {self.image_store} (PostgreSQL)")
        lines.append(f"images: {self.images} stored ({_size(self.image_bytes)}), "
                     f"{self.referenced_images} in use")
        lines.append(
            f"{would} {_count(len(self.orphan_images), 'unused image')} "
            f"({_size(sum(item.size for item in self.orphan_images))}) and "
            f"{_count(len(self.orphan_records), 'ledger record')} of deleted threads"
        )
        if verbose:
            lines += [f"  {item.path}" for item in self.orphan_images + self.orphan_records]
        if self.orphan_verdicts:
            lines.append(f"{would} {_count(len(self.orphan_verdicts), 'critic verdict record')} "
                         "of deleted threads")
            lines += [f"  {item.path}" for item in self.orphan_verdicts] if verbose else []
        young = self.young_images + self.young_records + self.young_verdicts
        if young:
            lines.append(
                f"kept {_count(len(young), 'unused file')} younger than "
                f"{_duration(self.min_age_s)} (--min-age): a running process may be about to use them"
            )
            lines += [f"  {item.path}" for item in young] if verbose else []
        if self.in_use:
            lines.append(f"kept {_count(len(self.in_use), 'file')} that a run stored again while gc ran")
            lines += [f"  {item.path}" for item in self.in_use] if verbose else []
        if self.records_without_thread:
            lines.append(f"kept {_count(self.records_without_thread, 'ledger record')} written "
                         "before records named their thread (their images count as in use)")
        if self.temp_files:
            lines.append(
                f"removed {_count(len(self.temp_files), 'temp file')} of killed writes" if self.delete
                else f"found {_count(len(self.temp_files), 'temp file')} of writes: --delete removes "
                "those whose writer is gone (or older than a day)"
            )
            lines += [f"  {item.path}" for item in self.temp_files] if verbose else []
        if self.unknown:
            lines.append(f"left alone {_count(len(self.unknown), 'file')} that the store did not "
                         "write (or links):")
            lines += [f"  {path}" for path in self.unknown]
        return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90``, ``90s``, ``30m``, ``1h`` or ``2d``."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ConfigurationError(
            f"{text!r} is not a duration", hint="write a number with s, m, h or d, e.g. 1h or 30m"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower()]
