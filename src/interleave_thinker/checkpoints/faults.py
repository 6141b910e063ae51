"""Storage faults as one-line errors that say what to do.

The checkpoint database (SQLite or PostgreSQL) and the run directory's files fail in a few
ways a user can act on: a full disk, a disk I/O error, a lock held too long, a damaged file, a
lost server connection. ``storage_error`` turns the library's exception into a
``StorageError`` naming the database or file and the thread to resume; ``storage_faults``
does so for a block of code (the part of a run that drives the graph, a batch prompt, a read).
Anything else passes through unchanged.
"""

from __future__ import annotations

import errno
import sqlite3
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from interleave_thinker.errors import DamagedCheckpointError, StorageError, one_line
from interleave_thinker.state import Document, Plan, Request, RunSettings, StepProgress

# OS errors that say the disk or the file system failed, not the program.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_DISK_ERRNOS = _NO_SPACE | {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def resume_words(thread_id: str | None) -> str:
    """How to continue once the fault is fixed."""
    if thread_id:
        return f"`interleave resume {thread_id}` continues the thread; every step saved before is kept"
    return "run the command again; nothing saved before is lost"


def _database_name(checkpointer_url: str | None) -> str:
    """The database as a message shows it: the SQLite file, or the URL without its password."""
    if not checkpointer_url:
        return "the checkpoint database"
    if checkpointer_url.startswith("sqlite:///"):
        return f"the checkpoint database {checkpointer_url.removeprefix('sqlite:///')}"
    from interleave_thinker.checkpoints.postgres import mask_password

    return f"the checkpointer {mask_password(checkpointer_url)}"


def _sqlite_error(exc: sqlite3.Error, database: str, thread_id: str | None) -> StorageError:
    text = one_line(exc)
    words = text.lower()
    then = resume_words(thread_id)
    if "full" in words:
        return StorageError(
            f"{database} is full: the disk has no space left ({text})",
            hint=f"free disk space, then {then}",
        )
    if "disk i/o error" in words:
        return StorageError(
            f"the disk failed while reading or writing {database} ({text})",
            hint=f"check the disk (`df -h`, `dmesg`) and the file's folder, then {then}",
        )
    if "locked" in words or "busy" in words:
        return StorageError(
            f"{database} stayed locked by another connection for too long ({text})",
            hint="another program holds a long write on the file (an sqlite3 shell, a backup, a "
            f"copy over a network file system): end it, then {then}",
        )
    if "malformed" in words or "not a database" in words or "corrupt" in words:
        return StorageError(
            f"{database} is damaged ({text})",
            hint="restore it from a backup; `sqlite3 FILE .recover | sqlite3 NEW_FILE` may rescue "
            "most threads; images already drawn are kept in the run directory",
        )
    if "readonly" in words or "read-only" in words:
        return StorageError(
            f"{database} cannot be written: it is read-only ({text})",
            hint=f"make the file and its folder writable, then {then}",
        )
    if "unable to open" in words:
        return StorageError(
            f"{database} cannot be opened ({text})",
            hint="check that its folder exists and is writable, and that the disk has space",
        )
    return StorageError(f"{database} failed: {text}", hint=f"once the cause is fixed, {then}")


def _postgres_error(exc: Exception, checkpointer_url: str | None, thread_id: str | None) -> StorageError:
    from interleave_thinker.checkpoints.postgres import _scrub

    database = _database_name(checkpointer_url)
    text = _scrub(one_line(exc), checkpointer_url or "")
    then = resume_words(thread_id)
    pool = sys.modules.get("psycopg_pool")
    if pool is not None and isinstance(exc, pool.PoolTimeout):
        return StorageError(
            f"no connection to {database} came free in time ({text})",
            hint="the server may be down, restarting or out of connections (max_connections; the "
            f"URL's pool_max sets this process's share): check it, then {then}",
        )
    if getattr(exc, "sqlstate", None) == "53100":  # disk_full
        return StorageError(
            f"the PostgreSQL server of {database} is out of disk space ({text})",
            hint=f"free space on the database server, then {then}",
        )
    psycopg = sys.modules["psycopg"]
    if isinstance(exc, psycopg.OperationalError):
        return StorageError(
            f"lost the connection to {database}: {text}",
            hint="check that the server runs (it may have restarted, or an administrator ended "
            f"the session), then {then}",
        )
    return StorageError(f"{database} failed: {text}", hint=f"once the cause is fixed, {then}")


def _is_postgres_error(exc: BaseException) -> bool:
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def file_error(
    exc: OSError,
    thread_id: str | None,
    *,
    what: str | None = None,
    then: str | None = None,
    run_dir: object = None,
) -> StorageError | None:
    """A StorageError for an OS error that says the disk failed (full, I/O error, read-only,
    no permission) while ``what`` (default: the file the error names) was written or read;
    None for any other OS error. ``then`` says how to continue (default: resume the thread)."""
    if exc.errno not in _DISK_ERRNOS:
        return None
    where = what or exc.filename or (f"a file under {run_dir}" if run_dir else "a file in the run directory")
    then = then or resume_words(thread_id)
    reason = exc.strerror or one_line(exc)
    if exc.errno in _NO_SPACE:
        return StorageError(
            f"no space left on the disk while writing {where} ({reason})",
            hint=f"free disk space, then {then}",
        )
    if exc.errno == errno.EIO:
        return StorageError(
            f"the disk failed while writing or reading {where} ({reason})",
            hint=f"check the disk (`df -h`, `dmesg`), then {then}",
        )
    return StorageError(
        f"cannot write {where}: {reason}",
        hint=f"make the run directory writable (or choose another with --run-dir), then {then}",
    )


def storage_error(
    exc: BaseException,
    *,
    thread_id: str | None = None,
    checkpointer_url: str | None = None,
    run_dir: object = None,
) -> StorageError | None:
    """``exc`` as a StorageError that says what to do, or None if it is no storage fault.

    ``run_dir`` names where a file was written when the OS error does not name the file."""
    if isinstance(exc, DamagedCheckpointError):
        return exc.of_thread(thread_id) if thread_id else exc
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.Error):
        url = checkpointer_url if _scheme(checkpointer_url) == "sqlite" else None
        return _sqlite_error(exc, _database_name(url), thread_id)
    if _is_postgres_error(exc):
        return _postgres_error(exc, checkpointer_url, thread_id)  # type: ignore[arg-type]
    if isinstance(exc, OSError):
        return file_error(exc, thread_id, run_dir=run_dir)
    return None


def _scheme(url: str | None) -> str:
    return urlsplit(url).scheme if url else ""


@contextmanager
def storage_faults(
    thread_id: str | None, checkpointer_url: str | None, run_dir: object = None
) -> Iterator[None]:
    """Re-raise storage faults inside the block as StorageError (others pass unchanged)."""
    try:
        yield
    except Exception as exc:
        translated = storage_error(
            exc, thread_id=thread_id, checkpointer_url=checkpointer_url, run_dir=run_dir
        )
        if translated is None or translated is exc:
            raise
        raise translated from exc


# What each key of a thread's state holds (None allowed where the state starts without it).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "request": (Request,),
    "settings": (RunSettings,),
    "plan": (Plan, type(None)),
    "generator_calls": (int,),
    "document": (Document, type(None)),
}


def check_state(thread_id: str, values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` (a thread's state) if each record is of its type; else DamagedCheckpointError.

    The serializer validates every record it rebuilds; this catches what it cannot see: a
    record stored under a damaged type name loads as a plain dict.
    """
    for key, types in _STATE_TYPES.items():
        if key in values and not isinstance(values[key], types):
            raise DamagedCheckpointError.found(
                f"its {key!r} is a {type(values[key]).__name__}, not a {types[0].__name__}",
                thread_id=thread_id,
            )
    progress = values.get("progress", ())
    if not isinstance(progress, tuple | list) or not all(isinstance(p, StepProgress) for p in progress):
        raise DamagedCheckpointError.found(
            "its 'progress' does not hold step records", thread_id=thread_id
        )
    return values
