"""One writer per thread: a lease taken for the whole run and refused to a second writer.

Two processes driving one thread would both draw its images and could each end with another
document. Every entry point that drives a thread (run, resume, batch, the Python API, the
LangGraph server graph) holds the thread's lease while it does::

    async with thread_lease(checkpointer_url, run_dir, thread_id):
        ...  # drive the graph

A second writer gets ``ThreadBusyError`` at once, naming the holder (host, pid, since when).

- PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a key derived from the
  schema and the thread id, held on a connection of its own for the run. A killed holder's
  connection closes and the lock goes with it. Its ``application_name`` names the holder.
- SQLite (and any other saver): a lock file ``<database>-leases/<thread>.lock`` beside the
  database (``<run-dir>/.leases/`` when the database is not a file we know), locked with
  ``flock`` and holding the holder's host, pid and start time. The kernel drops the lock when
  its holder dies, so a killed holder's lease is taken over at once.
- ``memory://``: a lease inside this process (nothing else can see such a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from interleave_thinker.checkpoints.faults import storage_error
from interleave_thinker.checkpoints.savers import sqlite_path
from interleave_thinker.errors import ConfigurationError, ThreadBusyError
from interleave_thinker.storage.atomic import host_name

LEASE_SUFFIX = ".lock"
# Folder of lease files beside a SQLite database: SQLite's own companions are named alike.
SQLITE_LEASES_SUFFIX = "-leases"
OTHER_LEASES_DIR = ".leases"
_POSTGRES = ("postgresql", "postgres")
# PostgreSQL keeps at most 63 bytes of an application_name.
_APPLICATION_NAME = re.compile(
    r"^interleave lease pid=(?P<pid>\d+) host=(?P<host>\S*)(?: cmd=(?P<command>.*))?$"
)


@asynccontextmanager
async def thread_lease(
    checkpointer_url: str | None, run_dir: str | os.PathLike[str], thread_id: str
) -> AsyncIterator[None]:
    """Hold ``thread_id``'s lease in the checkpointer ``checkpointer_url`` for the block.

    ``checkpointer_url`` None means a checkpointer we do not open ourselves (the LangGraph
    server's): the lease is then a file under ``run_dir``. Raises ThreadBusyError when another
    writer holds it.
    """
    scheme = urlsplit(checkpointer_url).scheme if checkpointer_url else ""
    if scheme in _POSTGRES:
        assert checkpointer_url is not None
        async with _postgres_lease(checkpointer_url, thread_id):
            yield
    elif scheme == "memory":
        assert checkpointer_url is not None
        with _process_lease(checkpointer_url, thread_id):
            yield
    else:
        async with _file_lease(lease_folder(checkpointer_url, Path(run_dir)), thread_id):
            yield


def lease_folder(checkpointer_url: str | None, run_dir: Path) -> Path:
    """Where the lease files of a checkpointer's threads live."""
    if checkpointer_url and urlsplit(checkpointer_url).scheme == "sqlite":
        database = sqlite_path(checkpointer_url)
        return database.with_name(database.name + SQLITE_LEASES_SUFFIX)
    return run_dir / OTHER_LEASES_DIR


def _since(started: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))


def _command() -> str:
    """What this process is, in a few words: ``interleave run``, ``pytest``, ``app.py``."""
    argv = [a for a in sys.argv[:2] if a]
    if not argv:
        return ""
    words = [Path(argv[0]).name]
    if len(argv) > 1 and re.fullmatch(r"[a-z][a-z-]{0,20}", argv[1]):
        words.append(argv[1])
    return " ".join(words)[:60]


def describe_holder(info: dict[str, Any]) -> str:
    """'process 1234 (interleave run) on host h, since 2026-12-02 10:11:12 UTC' from what is known."""
    pid, host = info.get("pid"), info.get("host")
    words = f"process {pid}" if pid else "another process"
    if info.get("command"):
        words += f" ({info['command']})"
    if host:
        words += f" on host {host}"
    if isinstance(info.get("started"), int | float):
        words += f", since {_since(info['started'])}"
    elif isinstance(info.get("started"), str) and info["started"]:
        words += f", since {info['started']}"
    return words


def _this_process(started: float) -> str:
    return f"another task of this process (pid {os.getpid()} on host {host_name()}), since {_since(started)}"


# --- memory:// ------------------------------------------------------------------------------

_PROCESS_LEASES: dict[tuple[str, str], float] = {}
_PROCESS_LEASES_LOCK = threading.Lock()


@contextlib.contextmanager
def _process_lease(url: str, thread_id: str) -> Iterator[None]:
    key = (url, thread_id)
    with _PROCESS_LEASES_LOCK:
        started = _PROCESS_LEASES.get(key)
        if started is not None:
            raise ThreadBusyError.held_by(thread_id, _this_process(started))
        _PROCESS_LEASES[key] = time.time()
    try:
        yield
    finally:
        with _PROCESS_LEASES_LOCK:
            _PROCESS_LEASES.pop(key, None)


# --- lock files -----------------------------------------------------------------------------

# File systems without flock (rare on Linux: some FUSE mounts) fall back to the recorded pid.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _holder_info() -> dict[str, Any]:
    return {"host": host_name(), "pid": os.getpid(), "started": time.time(), "command": _command()}


def _read_info(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def lease_file_name(thread_id: str) -> str:
    """The lease file of a thread: its id where that is a safe file name, else a hash of it."""
    if _SAFE_NAME.fullmatch(thread_id):
        return thread_id + LEASE_SUFFIX
    return "sha256-" + hashlib.sha256(thread_id.encode()).hexdigest()[:32] + LEASE_SUFFIX


def _take_file_lease(folder: Path, thread_id: str) -> tuple[int, Path]:
    """Open and lock ``folder/thread.lock``; ThreadBusyError if a live writer holds it."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lease_file_name(thread_id)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ThreadBusyError.held_by(thread_id, _file_holder(_read_info(fd))) from None
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                _check_recorded_holder(fd, thread_id)
            # A holder that ended removed the file between our open and our lock: take the new one.
            if not _same_file(fd, path):
                os.close(fd)
                continue
            data = json.dumps(_holder_info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            return fd, path
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


def _file_holder(info: dict[str, Any]) -> str:
    if info.get("pid") == os.getpid() and info.get("host") == host_name():
        started = info.get("started")
        return _this_process(started if isinstance(started, int | float) else time.time())
    return describe_holder(info)


def _check_recorded_holder(fd: int, thread_id: str) -> None:
    """Without flock: busy when the file names a live process of this host or another host's."""
    info = _read_info(fd)
    if not info or (info.get("pid") == os.getpid() and info.get("host") == host_name()):
        return
    if info.get("host") != host_name() or _pid_alive(info.get("pid")):
        raise ThreadBusyError.held_by(thread_id, _file_holder(info))


def _release_file_lease(fd: int, path: Path) -> None:
    try:
        # Removed while still locked, so a waiting writer sees the file is gone and retries.
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
    except OSError:
        pass  # a lease file left behind is unlocked, and taken by the next writer
    finally:
        os.close(fd)


def _release_when_taken(taking: asyncio.Future[tuple[int, Path]]) -> None:
    if not taking.cancelled() and taking.exception() is None:
        _release_file_lease(*taking.result())


@asynccontextmanager
async def _file_lease(folder: Path, thread_id: str) -> AsyncIterator[None]:
    # In worker threads: a LangGraph server fails runs that touch files on its event loop.
    taking = asyncio.ensure_future(asyncio.to_thread(_take_file_lease, folder, thread_id))
    try:
        fd, path = await asyncio.shield(taking)
    except asyncio.CancelledError:
        # Cancelled (Ctrl-C) while the worker thread takes it: let go once it is taken.
        taking.add_done_callback(_release_when_taken)
        raise
    except OSError as exc:
        translated = storage_error(exc, thread_id=thread_id)
        if translated is None:
            raise
        raise translated from exc
    try:
        yield
    finally:
        # Shielded: a cancelled run still lets go of its lease.
        await asyncio.shield(asyncio.to_thread(_release_file_lease, fd, path))


# --- PostgreSQL -----------------------------------------------------------------------------


def lease_key(schema: str, thread_id: str) -> int:
    """The advisory lock key of a thread: 64 bits of a hash of the schema and the thread id."""
    digest = hashlib.sha256(f"interleave-thread-lease\0{schema}\0{thread_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _application_name() -> str:
    """Who holds the session's locks, for a refused writer to read (63 bytes at most)."""
    name = f"interleave lease pid={os.getpid()} host={host_name()}"
    with_command = f"{name} cmd={_command()}"
    return with_command if len(with_command.encode()) <= 63 else name[:63]


_HOLDER_SQL = """
SELECT a.application_name, a.backend_start, a.client_addr::text AS client_addr
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %s AND l.objid::bigint = %s
LIMIT 1
"""


async def _postgres_holder(conn: Any, key: int) -> str:
    """Who holds the advisory lock ``key``, from pg_locks and pg_stat_activity."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    try:
        cursor = await conn.execute(_HOLDER_SQL, (unsigned >> 32, unsigned & 0xFFFF_FFFF))
        row = await cursor.fetchone()
    except Exception:  # the refusal matters, not the detail
        row = None
    if not row:
        return "another process"
    match = _APPLICATION_NAME.match(row.get("application_name") or "")
    info: dict[str, Any] = {}
    if match:
        info = {"pid": int(match["pid"]), "host": match["host"], "command": match["command"]}
    elif row.get("client_addr"):
        info = {"host": row["client_addr"]}
    started = row.get("backend_start")
    if started is not None:
        info["started"] = started.timestamp()
    return describe_holder(info) + " (a PostgreSQL session lock)"


class _LeaseSession:
    """One PostgreSQL session per process, event loop and database that holds the advisory
    locks of every thread this process runs there (a batch of 100 threads needs one
    connection, not 100). Opened by the first lease, closed with the last."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self.schema = ""
        self.held: dict[int, float] = {}  # key -> when this process took it
        self.users = 0
        self.lock = asyncio.Lock()

    async def _connection(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        from interleave_thinker.checkpoints.postgres import _connect_kwargs, parse_url

        if self.conn is not None and not self.conn.closed and not self.conn.broken:
            return self.conn
        conninfo = parse_url(self.url).conninfo
        kwargs = _connect_kwargs(conninfo, dict_row)
        kwargs["application_name"] = _application_name()
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        row = await (await conn.execute("SELECT current_schema() AS schema")).fetchone()
        self.conn, self.schema = conn, (row or {}).get("schema") or ""
        # A session that died took its locks along: the runs still going take theirs again.
        for key in self.held:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        return conn

    async def take(self, thread_id: str) -> int:
        async with self.lock:
            conn = await self._connection()
            key = lease_key(self.schema, thread_id)
            if key in self.held:
                # Advisory locks stack within a session: this process's own runs are told apart here.
                raise ThreadBusyError.held_by(thread_id, _this_process(self.held[key]))
            row = await (
                await conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (key,))
            ).fetchone()
            if not row or not row["locked"]:
                raise ThreadBusyError.held_by(thread_id, await _postgres_holder(conn, key))
            self.held[key] = time.time()
            return key

    async def give_back(self, key: int) -> None:
        import psycopg

        async with self.lock:
            self.held.pop(key, None)
            conn = self.conn
            if conn is not None and not conn.closed and not conn.broken:
                # On a session that died the lock is gone already.
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


_SESSIONS: dict[tuple[int, str], _LeaseSession] = {}


@asynccontextmanager
async def _postgres_lease(url: str, thread_id: str) -> AsyncIterator[None]:
    from interleave_thinker.checkpoints.postgres import INSTALL_HINT, parse_url

    parse_url(url)  # a bad URL is a ConfigurationError before anything else
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(
            f"PostgreSQL checkpoints need psycopg ({exc})", hint=INSTALL_HINT
        ) from exc
    where = (id(asyncio.get_running_loop()), url)
    session = _SESSIONS.get(where)
    if session is None:
        session = _SESSIONS[where] = _LeaseSession(url)
    session.users += 1
    try:
        try:
            key = await session.take(thread_id)
        except psycopg.Error as exc:
            raise storage_error(exc, thread_id=thread_id, checkpointer_url=url) from exc  # type: ignore[misc]
        try:
            yield
        finally:
            await asyncio.shield(session.give_back(key))
    finally:
        session.users -= 1
        if session.users == 0:
            _SESSIONS.pop(where, None)
            if session.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(session.conn.close())
