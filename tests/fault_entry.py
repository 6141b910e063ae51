"""Run the `interleave` CLI with failpoints that SIGKILL the process at a chosen place.

Run as ``python tests/fault_entry.py <interleave args>``; it installs the failpoints by
monkeypatching library functions in this process only, then calls the real typer app exactly
as the ``interleave`` console script does. Nothing here is imported by production code.

Environment:

- ``INTERLEAVE_FAILPOINT=POINT:N`` kills the process the N-th time POINT is reached
  (``os.kill(os.getpid(), SIGKILL)``: no cleanup, no atexit, no flush of Python buffers).
- ``INTERLEAVE_FAILPOINT_DELAY=S``: for ``commit-race``, the kill comes S seconds after the
  commit started, from a timer thread, so it lands inside or just after SQLite's commit.
- ``INTERLEAVE_FAILPOINT_FIRED=PATH``: a JSON line ``{"point", "hit", "pid"}`` is appended to
  PATH just before the kill, so the test knows the process died where it was told to.
- ``INTERLEAVE_FAILPOINT_COUNTS=PATH``: at a normal exit, ``{point: times reached}`` is written
  to PATH as JSON (a census run, to choose N for later kills).

Points (see POINTS): entering and leaving each graph node (a node's checkpoint is written only
after it returns); ``drawn`` after the test generator returned its images (drawn and logged, not
yet stored); checkpoint writes inside the saver (``put``/``writes``: the SQL ran but was not
committed, ``-committed``: the commit is done and the graph has not gone on); ``put-between-
statements`` (PostgreSQL: the blobs are on the server, the checkpoint row was never sent);
``commit-race`` (SQLite: a timer kills while COMMIT runs); and for the three kinds of atomic
file write (image store, ledger record, HTML document) ``-half`` (half the bytes are in the temp
file), ``-synced`` (all bytes written and fsynced, before the rename) and ``-renamed`` (just
after the rename).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import json
import os
import select
import signal
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

FAILPOINT_ENV = "INTERLEAVE_FAILPOINT"
DELAY_ENV = "INTERLEAVE_FAILPOINT_DELAY"
FIRED_ENV = "INTERLEAVE_FAILPOINT_FIRED"
COUNTS_ENV = "INTERLEAVE_FAILPOINT_COUNTS"

NODES = ("planner", "generator", "critic", "compose")
FILE_KINDS = ("image", "ledger", "html")
POINTS = (
    *(f"{edge}-{node}" for node in NODES for edge in ("enter", "exit")),
    "drawn",
    "put-before-commit",
    "put-committed",
    "put-between-statements",
    "writes-before-commit",
    "writes-committed",
    "commit-race",
    *(f"{kind}-{stage}" for kind in FILE_KINDS for stage in ("half", "synced", "renamed")),
)

_counts: Counter[str] = Counter()
_armed: tuple[str, int] | None = None
# Which saver method is running in this task: the commit it awaits belongs to that write.
_saver_call: contextvars.ContextVar[str | None] = contextvars.ContextVar("saver_call", default=None)


def _die(point: str, hit: int) -> None:
    fired = os.environ.get(FIRED_ENV)
    if fired:
        line = json.dumps({"point": point, "hit": hit, "pid": os.getpid()}) + "\n"
        fd = os.open(fired, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _reached(point: str) -> bool:
    """Count a visit to ``point``; True when this visit is the one the test armed."""
    _counts[point] += 1
    return _armed is not None and _armed == (point, _counts[point])


def _hit(point: str) -> None:
    if _reached(point):
        _die(point, _counts[point])


# -- graph nodes and the test generator -------------------------------------------------------


def _wrap_node(node: str, function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(function)  # LangGraph reads the signature to pass the runtime
    async def wrapped(state: Any, runtime: Any) -> Any:
        _hit(f"enter-{node}")
        result = await function(state, runtime)
        _hit(f"exit-{node}")
        return result

    return wrapped


def _install_node_points() -> None:
    import interleave_thinker.graph as graph
    from interleave_thinker.generators.stand_in import StandInImageGenerator

    # build_graph reads these module names when a run starts, after this has replaced them.
    for node, attribute in zip(
        NODES, ("plan_trajectory", "generate_images", "judge_attempts", "compose_document"),
        strict=True,
    ):
        setattr(graph, attribute, _wrap_node(node, getattr(graph, attribute)))

    original = StandInImageGenerator.agenerate

    async def agenerate(self: Any, jobs: Any) -> Any:
        images = await original(self, jobs)
        _hit("drawn")
        return images

    StandInImageGenerator.agenerate = agenerate  # type: ignore[method-assign]


# -- checkpoint savers -----------------------------------------------------------------------


def _wrap_saver_method(cls: type, name: str, label: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _saver_call.set(label)
        try:
            result = await original(self, *args, **kwargs)
        finally:
            _saver_call.reset(token)
        _hit(f"{label}-committed")
        return result

    setattr(cls, name, wrapped)


def _install_sqlite_points() -> None:
    from interleave_thinker.checkpoints.sqlite_saver import PUT_CHECKPOINT_SQL, OneTripSqliteSaver

    _wrap_saver_method(OneTripSqliteSaver, "aput", "put")
    _wrap_saver_method(OneTripSqliteSaver, "aput_writes", "writes")
    commit = OneTripSqliteSaver._commit

    # Runs on aiosqlite's thread, between the insert and its COMMIT; the statement says which
    # save it is (a context variable does not reach that thread).
    def wrapped_commit(self: Any, connection: Any, sql: str) -> None:
        label = "put" if sql == PUT_CHECKPOINT_SQL else "writes"
        # The INSERT has run inside the open transaction; COMMIT has not.
        _hit(f"{label}-before-commit")
        if label == "put" and _reached("commit-race"):
            delay = float(os.environ.get(DELAY_ENV, "0") or 0)
            hit = _counts["commit-race"]
            threading.Timer(delay, _die, args=("commit-race", hit)).start()
        commit(self, connection, sql)

    OneTripSqliteSaver._commit = wrapped_commit  # type: ignore[method-assign]


def _on_server(cursor: Any) -> None:
    """Push every queued statement to the server and wait until it has run them.

    In pipeline mode a statement may still sit in libpq's buffer; a flush request makes the
    server execute and answer what it got, without the Sync that would end the implicit
    transaction. Once an answer can be read, the statements ran in a transaction not committed.
    """
    pgconn = cursor.connection.pgconn
    if pgconn.pipeline_status == 0:
        return  # outside a pipeline the statement already ran (and, with autocommit, committed)
    pgconn.send_flush_request()
    while pgconn.flush() != 0:
        select.select([], [pgconn.socket], [], 1.0)
    select.select([pgconn.socket], [], [], 5.0)


def _install_postgres_points() -> None:
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    _wrap_saver_method(AsyncPostgresSaver, "aput", "put")
    _wrap_saver_method(AsyncPostgresSaver, "aput_writes", "writes")
    # The last statement of each write (aput_writes sends one); the pool's connection check
    # also runs a statement inside these calls, which is not a checkpoint write.
    last_statements = {
        "put": {AsyncPostgresSaver.UPSERT_CHECKPOINTS_SQL},
        "writes": {
            AsyncPostgresSaver.UPSERT_CHECKPOINT_WRITES_SQL,
            AsyncPostgresSaver.INSERT_CHECKPOINT_WRITES_SQL,
        },
    }

    def point_after(label: str, query: Any) -> str | None:
        if query == AsyncPostgresSaver.UPSERT_CHECKPOINT_BLOBS_SQL:
            return "put-between-statements"
        if query in last_statements[label]:
            return f"{label}-before-commit"
        return None

    for name in ("execute", "executemany"):
        original = getattr(psycopg.AsyncCursor, name)

        def make(original: Any) -> Any:
            @functools.wraps(original)
            async def wrapped(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
                result = await original(self, query, *args, **kwargs)
                label = _saver_call.get()
                point = point_after(label, query) if label else None
                if point is not None and _reached(point):
                    _on_server(self)
                    _die(point, _counts[point])
                return result

            return wrapped

        setattr(psycopg.AsyncCursor, name, make(original))


# -- atomic file writes ----------------------------------------------------------------------


def _file_kind(path: str) -> str | None:
    """Which atomic write a temp file belongs to, by where write_atomically staged it."""
    name = os.path.basename(path)
    if not name.startswith(".tmp-"):
        return None
    parts = Path(path).parts
    if "images" in parts and ".incoming" in parts:
        return "image"
    if "generations" in parts and ".incoming" in parts:
        return "ledger"
    if "documents" in parts and name.endswith(".html"):
        return "html"
    return None


class _TappedFile:
    """A temp file of an atomic write whose single write() may stop half-way."""

    def __init__(self, handle: Any, kind: str) -> None:
        self._handle, self._kind = handle, kind

    def write(self, data: bytes) -> int:
        point = f"{self._kind}-half"
        if _reached(point):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()  # into the kernel: the half survives the kill
            _die(point, _counts[point])
        return self._handle.write(data)

    def __enter__(self) -> _TappedFile:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _install_file_points() -> None:
    fdopen, replace = os.fdopen, os.replace

    def tapped_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = fdopen(fd, *args, **kwargs)
        try:
            kind = _file_kind(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            kind = None
        return handle if kind is None else _TappedFile(handle, kind)

    def tapped_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        kind = _file_kind(os.fspath(src))
        if kind is not None:
            _hit(f"{kind}-synced")  # write_atomically has fsynced the data by now
        replace(src, dst, **kwargs)
        if kind is not None:
            _hit(f"{kind}-renamed")

    os.fdopen = tapped_fdopen  # type: ignore[assignment]
    os.replace = tapped_replace  # type: ignore[assignment]


# -- main ------------------------------------------------------------------------------------


def _parse_armed(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    point, _, count = value.rpartition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"fault_entry: {FAILPOINT_ENV}={value!r} is not POINT:N with POINT in {POINTS}")
    return point, int(count)


def _write_counts(path: str) -> None:
    Path(path).write_text(json.dumps(dict(_counts), sort_keys=True))


def main() -> None:
    global _armed
    _armed = _parse_armed(os.environ.get(FAILPOINT_ENV, ""))
    _install_node_points()
    _install_sqlite_points()
    # Without the postgres extra those points are simply never reached.
    with contextlib.suppress(ImportError):
        _install_postgres_points()
    _install_file_points()
    counts = os.environ.get(COUNTS_ENV)
    if counts:
        atexit.register(_write_counts, counts)

    from interleave_thinker.cli import app

    # What the console script generated by pip does.
    sys.argv[0] = "interleave"
    sys.exit(app())


if __name__ == "__main__":
    main()
