"""Garbage collection of a run directory: images and ledger records that no thread references."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from interleave_thinker.checkpoints.savers import list_thread_ids, open_checkpointer, sqlite_path
from interleave_thinker.errors import ConfigurationError, InterleaveError, one_line
from interleave_thinker.settings import redact_url
from interleave_thinker.state import MEDIA_SUFFIXES, SHA256_PATTERN, ImageRef
from interleave_thinker.storage.atomic import (
    ABANDONED_AFTER_S,
    STAGING_DIR,
    TEMP_PREFIX,
    sweep_abandoned_writes,
    temp_file_prefix,
)
from interleave_thinker.storage.ledger import is_generation_key, parse_record
from interleave_thinker.storage.verdicts import is_verdict_key, parse_verdict_record
from interleave_thinker.workspace import Workspace

__all__ = [
    "DEFAULT_MIN_AGE_S",
    "GarbageCollectionRefused",
    "GcFile",
    "GcReport",
    "acollect_garbage",
    "collect_garbage",
    "parse_duration",
]

# A running process stores images (inputs, drawings) before the checkpoint that names them is
# written; nothing younger than this is removed, so such an image is never taken from under it.
DEFAULT_MIN_AGE_S = 3600.0

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_IMAGE_NAME = re.compile(
    r"^([0-9a-f]{64})(" + "|".join(re.escape(s) for s in MEDIA_SUFFIXES.values()) + r")$"
)
# How message content blocks name a stored image (models/messages.py).
_REF_PREFIX = "sha256:"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class GarbageCollectionRefused(InterleaveError):
    """gc would not remove anything: the checkpointer could not be read or looks like the wrong one."""


@dataclass(frozen=True)
class GcFile:
    """A file gc found: where, how big, and when it was last written."""

    path: Path
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


def collect_garbage(**kwargs: Any) -> GcReport:
    """Blocking form of :func:`acollect_garbage`."""
    return asyncio.run(acollect_garbage(**kwargs))


async def acollect_garbage(
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    delete: bool = False,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    allow_empty: bool = False,
) -> GcReport:
    """Find (and with ``delete``, remove) the images and ledger records no thread needs.

    An image is in use when any checkpoint of any thread names it (every version, pending
    writes included, since a thread can be forked from an old checkpoint), or a ledger record
    of a thread that still exists (or of no known thread) does. A ledger record is garbage when
    its thread is gone. Nothing younger than ``min_age_s`` is removed. Abandoned temp files
    of killed writes are removed too. Refuses (removing nothing) when the checkpointer cannot
    be read, or references none of the images, unless ``allow_empty``.
    """
    if min_age_s < 0:
        raise ConfigurationError(f"the minimum age must not be negative, not {min_age_s}")
    workspace = Workspace.open(run_dir, checkpointer)
    if not workspace.run_dir.is_dir():
        raise ConfigurationError(
            f"run directory {workspace.run_dir} does not exist",
            hint="pass --run-dir (or set INTERLEAVE_RUN_DIR) to the directory the runs used",
        )
    shown = redact_url(workspace.checkpointer_url)
    report = GcReport(workspace.run_dir, shown, delete, min_age_s)
    # Taken before the checkpoints are read: a file written after this is young and kept, and
    # one written before it is named by a checkpoint already written, or by a ledger record.
    cutoff = time.time() - min_age_s
    threads, referenced = await _read_checkpoints(workspace.checkpointer_url, shown, report)
    await asyncio.to_thread(_scan, workspace.run_dir, threads, referenced, cutoff, report)
    _refuse_if_suspicious(report, threads, allow_empty)
    if delete:
        await asyncio.to_thread(_remove, workspace.run_dir, cutoff, report)
    return report


# -- reading the checkpoints -----------------------------------------------------------------------


async def _read_checkpoints(url: str, shown: str, report: GcReport) -> tuple[set[str], set[str]]:
    """Every thread id and every image hash named anywhere in the checkpointer at ``url``."""
    if urlsplit(url).scheme == "sqlite" and not sqlite_path(url).is_file():
        # Opening it would create an empty database, which references nothing.
        raise GarbageCollectionRefused(
            f"no checkpoint database at {sqlite_path(url)}; nothing was removed",
            hint="gc needs the checkpointer the runs used: pass the --run-dir that holds "
            "checkpoints.sqlite, or --checkpointer with its URL",
        )
    threads: set[str] = set()
    referenced: set[str] = set()
    try:
        async with open_checkpointer(url) as saver:
            # Every namespace: a subgraph's checkpoints name images too.
            threads.update(await list_thread_ids(saver, subgraphs=True))
            for thread in sorted(threads):
                async for item in saver.alist({"configurable": {"thread_id": thread}}):
                    report.checkpoints += 1
                    _collect_hashes(
                        (item.checkpoint, item.metadata, item.pending_writes), referenced
                    )
    except InterleaveError:
        raise
    except Exception as exc:
        raise GarbageCollectionRefused(
            f"cannot read the checkpoints in {shown}: {one_line(exc)}; nothing was removed",
            hint="check --checkpointer (and --run-dir): gc must read every thread before it "
            "can tell which images are unused",
        ) from exc
    report.threads = len(threads)
    return threads, referenced




def _collect_hashes(root: object, found: set[str]) -> None:
    """Add to ``found`` every image hash in ``root``, walking the deserialized values by type.

    ImageRefs are the typed case; a bare hash string or a ``sha256:`` content-block id also
    counts (the LangGraph server's input lists images by hash), and so does any mapping with
    a ``sha256`` key (a record the serializer returned as a plain dict). Erring towards "in
    use" only keeps an image that could have gone.
    """
    # Ids are only unique among live objects: ``seen`` lives as long as ``root`` holds them.
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            digest = item.removeprefix(_REF_PREFIX)
            if SHA256_PATTERN.fullmatch(digest):
                found.add(digest)
            continue
        if item is None or isinstance(item, bytes | bytearray | int | float | complex):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ImageRef):
            found.add(item.sha256)
        elif isinstance(item, BaseModel):
            stack.extend(getattr(item, name, None) for name in type(item).model_fields)
            stack.extend((item.__pydantic_extra__ or {}).values())
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        else:
            stack.extend(_attributes(item))


def _attributes(item: object) -> list[object]:
    """The stored attributes of any other object (dataclasses, Send, exceptions, ...)."""
    values: list[object] = []
    if dataclasses.is_dataclass(item):
        values.extend(getattr(item, f.name, None) for f in dataclasses.fields(item))
    if isinstance(item, BaseException):
        values.extend(item.args)
    values.extend(getattr(item, "__dict__", {}).values())
    for cls in type(item).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            values.append(getattr(item, name, None))
    return values


# -- scanning the run directory --------------------------------------------------------------------


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(folder), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []


def _file(entry: os.DirEntry[str]) -> GcFile:
    info = entry.stat(follow_symlinks=False)
    return GcFile(Path(entry.path), info.st_size, info.st_mtime)


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _is_real_file(entry: os.DirEntry[str]) -> bool:
    return entry.is_file(follow_symlinks=False)


def _store_folders(root: Path, report: GcReport) -> list[os.DirEntry[str]]:
    """The two-hex-digit folders of a store; anything else there is reported and left alone."""
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(info.st_mode):
        # A link (or file) in place of the folder: gc never follows links out of the run dir.
        report.unknown.append(root)
        return []
    folders = []
    for entry in _entries(root):
        if _HEX2.fullmatch(entry.name) and _is_real_dir(entry):
            folders.append(entry)
        elif entry.name == STAGING_DIR and _is_real_dir(entry):
            report.temp_files.extend(
                _file(item) for item in _entries(Path(entry.path))
                if item.name.startswith(TEMP_PREFIX) and _is_real_file(item)
            )
        else:
            report.unknown.append(Path(entry.path))
    return folders


def _scan(run_dir: Path, threads: set[str], referenced: set[str], cutoff: float,
          report: GcReport) -> None:
    """Sort every file of the ledger and the image store into kept, orphan, young or unknown."""
    needed = set(referenced)
    for folder in _store_folders(run_dir / "generations", report):
        for entry in _entries(Path(folder.path)):
            key, suffix = entry.name[:64], entry.name[64:]
            if entry.name.startswith(TEMP_PREFIX) and _is_real_file(entry):
                report.temp_files.append(_file(entry))
                continue
            if not (is_generation_key(key) and suffix == ".json" and key[:2] == folder.name
                    and _is_real_file(entry)):
                report.unknown.append(Path(entry.path))
                continue
            found = _file(entry)
            try:
                record = parse_record(found.path.read_bytes())
            except (OSError, ValueError):
                # Unreadable: a lookup treats it as no record. Not store-shaped, so left alone.
                report.unknown.append(found.path)
                continue
            report.records += 1
            if record.thread_id is None:
                report.records_without_thread += 1
                needed.add(record.image.sha256)
            elif record.thread_id in threads:
                needed.add(record.image.sha256)
            elif found.mtime >= cutoff:
                # A run may be writing this thread's first checkpoint right now.
                report.young_records.append(found)
                needed.add(record.image.sha256)
            else:
                report.orphan_records.append(found)

    for folder in _store_folders(run_dir / "images", report):
        for entry in _entries(Path(folder.path)):
            if entry.name.startswith(TEMP_PREFIX) and _is_real_file(entry):
                report.temp_files.append(_file(entry))
                continue
            match = _IMAGE_NAME.fullmatch(entry.name)
            if match is None or match.group(1)[:2] != folder.name or not _is_real_file(entry):
                report.unknown.append(Path(entry.path))
                continue
            found = _file(entry)
            report.images += 1
            report.image_bytes += found.size
            if match.group(1) in needed:
                report.referenced_images += 1
            elif found.mtime >= cutoff:
                report.young_images.append(found)
            else:
                report.orphan_images.append(found)
    _scan_verdicts(run_dir, threads, cutoff, report)


def _scan_verdicts(run_dir: Path, threads: set[str], cutoff: float, report: GcReport) -> None:
    """Sort the critic's verdict records (storage/verdicts.py) as ``_scan`` sorts ledger records."""
    for folder in _store_folders(run_dir / "verdicts", report):
        for entry in _entries(Path(folder.path)):
            key, suffix = entry.name[:64], entry.name[64:]
            if entry.name.startswith(TEMP_PREFIX) and _is_real_file(entry):
                report.temp_files.append(_file(entry))
                continue
            if not (is_verdict_key(key) and suffix == ".json" and key[:2] == folder.name
                    and _is_real_file(entry)):
                report.unknown.append(Path(entry.path))
                continue
            found = _file(entry)
            try:
                record = parse_verdict_record(found.path.read_bytes())
            except (OSError, ValueError):
                report.unknown.append(found.path)
                continue
            report.verdicts += 1
            if record.thread_id is None or record.thread_id in threads:
                continue
            if found.mtime >= cutoff:
                report.young_verdicts.append(found)
            else:
                report.orphan_verdicts.append(found)


def _refuse_if_suspicious(report: GcReport, threads: set[str], allow_empty: bool) -> None:
    """A wrong --checkpointer looks like one whose threads were all deleted: refuse unless told."""
    if allow_empty or not (report.orphan_images or report.orphan_records or report.orphan_verdicts):
        return
    if not threads:
        found = f"{report.threads} threads"
    elif report.images and not report.referenced_images:
        found = f"{report.threads} threads, none of which uses any of the {report.images} images"
    else:
        return
    raise GarbageCollectionRefused(
        f"the checkpointer {report.checkpointer} has {found}, so every image of "
        f"{report.run_dir} would count as unused; nothing was removed",
        hint="--checkpointer may point at the wrong database (or --run-dir at the wrong folder); "
        "if every thread really was deleted, run gc again with --allow-empty",
    )


# -- removing --------------------------------------------------------------------------------------


def _remove(run_dir: Path, cutoff: float, report: GcReport) -> None:
    removed_images, removed_records = [], []
    for found in report.orphan_records:
        (removed_records if _remove_if_still_old(found.path, cutoff) else report.in_use).append(found)
    for found in report.orphan_images:
        (removed_images if _remove_if_still_old(found.path, cutoff) else report.in_use).append(found)
    report.orphan_images, report.orphan_records = removed_images, removed_records
    removed_verdicts = []
    for found in report.orphan_verdicts:
        (removed_verdicts if _remove_if_still_old(found.path, cutoff) else report.in_use).append(found)
    report.orphan_verdicts = removed_verdicts
    # Half-written files of killed writers: the staging folders, and the store folders where
    # earlier versions wrote them (and where a killed gc leaves its own).
    temp_folders = [run_dir / "images" / STAGING_DIR, run_dir / "generations" / STAGING_DIR,
                    run_dir / "verdicts" / STAGING_DIR]
    temp_folders += sorted({item.path.parent for item in report.temp_files} - set(temp_folders))
    report.temp_files = [
        GcFile(path, 0, 0.0)
        for folder in temp_folders
        if folder.is_dir() and not folder.is_symlink()
        for path in sweep_abandoned_writes(folder, older_than_s=ABANDONED_AFTER_S)
    ]


def _remove_if_still_old(path: Path, cutoff: float) -> bool:
    """Remove ``path`` unless a run wrote or touched it since the scan; True if removed.

    The file is first renamed aside, then its time checked: a run that stores the same image
    again either touched it before the rename (seen here: it is put back) or finds it gone
    and writes it anew. Checking first and unlinking after would leave a gap between the two.
    """
    # The name of a temp file of this process: if gc is killed here, the next sweep removes it.
    aside = path.with_name(f"{temp_file_prefix()}gc{secrets.token_hex(4)}{path.suffix}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if os.lstat(aside).st_mtime < cutoff:
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # written again meanwhile: the same content, or a newer record
        except OSError:
            if not path.exists():
                os.rename(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)
