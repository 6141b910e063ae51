"""Atomic file writes: a crash leaves the whole file or none, and killed writers' leftovers are swept."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path


def _file_mode() -> int:
    # mkstemp creates 0600 files; give finished files the mode open() would, under the umask.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


# Temporary files name their writer (host and process), so that a later run can tell a write
# that was killed half-way from one that another live process is still making.
STAGING_DIR = ".incoming"
TEMP_PREFIX = ".tmp-"
# A temp file of another host, or of a process that cannot be checked, is left this long.
ABANDONED_AFTER_S = 24 * 3600


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def temp_file_prefix() -> str:
    return f"{TEMP_PREFIX}{host_name()}-{os.getpid()}-"


def write_atomically(
    path: Path, data: bytes | Iterable[bytes], *, staging: Path | None = None, durable: bool = True
) -> None:
    """Write ``data`` (bytes, or pieces of bytes written one after the other) to ``path`` so
    that a crash leaves either no file or the whole file.

    The data goes to a temp file first (in ``staging`` if given, on the same file system,
    else beside ``path``), is synced, then renamed into place. ``durable=False`` skips both
    syncs, for records that only save work (the ledgers): a killed process still leaves the
    whole file or none, and a power cut may lose the newest ones, which their readers treat as
    never written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = staging or path.parent
    temp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=temp_dir, prefix=temp_file_prefix(), suffix=path.suffix)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            for piece in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                handle.write(piece)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if not durable:
        return
    # The rename itself must reach the disk, or a power cut can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _writer_is_gone(name: str, host: str) -> bool:
    """True when a temp file's name says it was written on this host by a process now dead."""
    match = re.fullmatch(re.escape(TEMP_PREFIX) + r"(.+)-(\d+)-[^-]+", name)
    if match is None or match.group(1) != host:
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def sweep_abandoned_writes(folder: Path, *, older_than_s: float = ABANDONED_AFTER_S) -> list[Path]:
    """Remove temp files in ``folder`` left by killed writers; return what was removed.

    A file goes when its writer was a process of this host that no longer exists, or when it
    is older than ``older_than_s`` (writers on other hosts sharing the folder, old names).
    """
    removed: list[Path] = []
    host, now = host_name(), time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            stale = now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
            if stale or _writer_is_gone(entry.name, host):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return removed
