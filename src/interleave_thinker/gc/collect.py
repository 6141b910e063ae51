"""Collecting garbage: scanning the run directory's stores, refusing suspicious cases, removing."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.gc.postgres import database_cutoff, remove_rows, scan_rows
from interleave_thinker.gc.references import read_checkpoints
from interleave_thinker.gc.report import GarbageCollectionRefused, GcFile, GcReport
from interleave_thinker.settings import redact_url
from interleave_thinker.state import MEDIA_SUFFIXES
from interleave_thinker.storage.atomic import (
    ABANDONED_AFTER_S,
    STAGING_DIR,
    TEMP_PREFIX,
    sweep_abandoned_writes,
    temp_file_prefix,
)
from interleave_thinker.storage.ledger import is_generation_key, parse_record
from interleave_thinker.storage.stores import image_folder, is_postgres_store
from interleave_thinker.storage.verdicts import is_verdict_key, parse_verdict_record
from interleave_thinker.workspace import Workspace

__all__ = ["DEFAULT_MIN_AGE_S", "acollect_garbage", "collect_garbage"]

# A running process stores images (inputs, drawings) before the checkpoint that names them is
# written; nothing younger than this is removed, so such an image is never taken from under it.
DEFAULT_MIN_AGE_S = 3600.0

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_IMAGE_NAME = re.compile(
    r"^([0-9a-f]{64})(" + "|".join(re.escape(s) for s in MEDIA_SUFFIXES.values()) + r")$"
)


def collect_garbage(**kwargs: Any) -> GcReport:
    """Blocking form of :func:`acollect_garbage`; also works inside a running event loop."""
    from interleave_thinker.runner import run_blocking

    return run_blocking(acollect_garbage(**kwargs))


async def acollect_garbage(
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    image_store: str | None = None,
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

    ``image_store`` (else $INTERLEAVE_IMAGE_STORE, else the run directory) names the store to
    collect: with ``postgresql://`` its three tables (images, generation ledger, verdicts).
    """
    if min_age_s < 0:
        raise ConfigurationError(f"the minimum age must not be negative, not {min_age_s}")
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    if is_postgres_store(workspace.image_store_url):
        return await _collect_postgres(workspace, delete, min_age_s, allow_empty)
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
    threads, referenced = await read_checkpoints(workspace.checkpointer_url, shown, report)
    images = image_folder(workspace.image_store_url, workspace.run_dir)
    await asyncio.to_thread(_scan, workspace.run_dir, threads, referenced, cutoff, report, images)
    _refuse_if_suspicious(report, threads, allow_empty)
    if delete:
        await asyncio.to_thread(_remove, workspace.run_dir, cutoff, report, images)
    return report


async def _collect_postgres(
    workspace: Workspace, delete: bool, min_age_s: float, allow_empty: bool
) -> GcReport:
    """gc of a PostgreSQL image store: its rows, sorted and removed as files are (gc/postgres.py)."""
    from interleave_thinker.storage.postgres_images import postgres_database

    database = postgres_database(workspace.image_store_url)
    shown = redact_url(workspace.checkpointer_url)
    report = GcReport(workspace.run_dir, shown, delete, min_age_s, image_store=database.shown)
    # On the database's clock, taken before the checkpoints are read (see acollect_garbage).
    cutoff = await asyncio.to_thread(database_cutoff, database, min_age_s)
    threads, referenced = await read_checkpoints(workspace.checkpointer_url, shown, report)
    await asyncio.to_thread(scan_rows, database, threads, referenced, cutoff, report)
    _refuse_if_suspicious(report, threads, allow_empty)
    if delete:
        await asyncio.to_thread(remove_rows, database, cutoff, report)
    return report


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
          report: GcReport, images: Path | None = None) -> None:
    """Sort every file of the ledger and the image store (``images``, default the run
    directory's) into kept, orphan, young or unknown."""
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

    for folder in _store_folders(images or run_dir / "images", report):
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
        f"{report.image_store or report.run_dir} would count as unused; nothing was removed",
        hint="--checkpointer may point at the wrong database (or --run-dir or --image-store at the "
        "wrong store); "
        "if every thread really was deleted, run gc again with --allow-empty",
    )


# -- removing --------------------------------------------------------------------------------------


def _remove(run_dir: Path, cutoff: float, report: GcReport, images: Path | None = None) -> None:
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
    temp_folders = [(images or run_dir / "images") / STAGING_DIR, run_dir / "generations" / STAGING_DIR,
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
