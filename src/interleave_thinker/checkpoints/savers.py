"""Open a LangGraph checkpointer from a URL: sqlite:///PATH, memory://, more schemes by registration."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ormsgpack
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import ValidationError

from interleave_thinker.errors import ConfigurationError, DamagedCheckpointError, one_line
from interleave_thinker.settings import redact_url
from interleave_thinker.state import STATE_RECORD_TYPES

SaverFactory = Callable[[str], AbstractAsyncContextManager[BaseCheckpointSaver]]

_FACTORIES: dict[str, SaverFactory] = {}


def make_serializer() -> JsonPlusSerializer:
    """LangGraph's serializer with our state records allowed (so loading them never warns) and
    checked: a record that does not validate raises DamagedCheckpointError (see CheckedSerializer)."""
    return CheckedSerializer()


# How LangGraph's msgpack format marks a pydantic v2 model: (module, name, fields, method).
# A stored format, so it does not change between versions.
_PYDANTIC_V2_EXT = 5
_RECORD_TYPES = {(cls.__module__, cls.__name__): cls for cls in STATE_RECORD_TYPES}
_OUR_MODULES = "interleave_thinker."


class CheckedSerializer(JsonPlusSerializer):
    """LangGraph's serializer, strict about our records when reading them.

    LangGraph rebuilds a stored pydantic model with ``cls(**fields)`` and, when that fails,
    with ``model_construct``, which skips validation: a flipped byte in a checkpoint (a key
    ``"4umber"`` for ``"number"``) then loads as a record missing a field, exports silently
    and crashes later. Here our records are validated like any input; one that fails, a record
    type of ours that does not exist, or data that cannot be decoded at all raise
    DamagedCheckpointError. Other types load as LangGraph loads them.
    """

    def __init__(self) -> None:
        allowed = list(_RECORD_TYPES)
        self._damage = threading.local()
        lenient = getattr(JsonPlusSerializer(allowed_msgpack_modules=allowed), "_unpack_ext_hook", None)
        if lenient is None:  # a LangGraph without the hook: records load as LangGraph loads them
            super().__init__(allowed_msgpack_modules=allowed)
            return
        super().__init__(
            allowed_msgpack_modules=allowed, __unpack_ext_hook__=self._strict_hook(lenient)
        )

    def _strict_hook(self, lenient: Callable[[int, bytes], Any]) -> Callable[[int, bytes], Any]:
        def hook(code: int, data: bytes) -> Any:
            if code != _PYDANTIC_V2_EXT:
                return lenient(code, data)
            try:
                module, name, fields = ormsgpack.unpackb(
                    data, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS
                )[:3]
            except Exception as exc:
                raise self._damaged(f"a record cannot be decoded ({one_line(exc)})") from None
            cls = _RECORD_TYPES.get((module, name))
            if cls is None:
                if isinstance(module, str) and module.startswith(_OUR_MODULES):
                    raise self._damaged(f"it names an unknown record type {module}.{name}")
                return lenient(code, data)
            try:
                return cls.model_validate(fields)
            except ValidationError as exc:
                raise self._damaged(f"a {name} record does not validate: {one_line(exc)}") from None

        return hook

    def _damaged(self, detail: str) -> DamagedCheckpointError:
        # ormsgpack reports an error raised in the hook as a bare "ext_hook failed": the first
        # damage found is kept aside for loads_typed to raise.
        error = DamagedCheckpointError.found(detail)
        if getattr(self._damage, "error", None) is None:
            self._damage.error = error
        return error

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        self._damage.error = None
        try:
            return super().loads_typed(data)
        except Exception as exc:
            damage: DamagedCheckpointError | None = self._damage.error
            if damage is not None:
                raise damage from None
            raise DamagedCheckpointError.found(f"its data cannot be decoded ({one_line(exc)})") from exc
        finally:
            self._damage.error = None


def register_saver(scheme: str, factory: SaverFactory) -> None:
    """Make ``scheme://...`` URLs open with ``factory`` (an async context manager factory)."""
    _FACTORIES[scheme] = factory


def default_checkpointer_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'checkpoints.sqlite').resolve()}"


def open_checkpointer(url: str) -> AbstractAsyncContextManager[BaseCheckpointSaver]:
    """An async context manager yielding the saver that ``url`` names."""
    scheme = urlsplit(url).scheme
    factory = _FACTORIES.get(scheme)
    if factory is None:
        raise ConfigurationError(
            f"checkpointer URL {redact_url(url)!r} has an unknown scheme {scheme!r}",
            hint="use sqlite:///PATH, memory:// or postgresql://USER@HOST/DATABASE; known schemes: "
            + ", ".join(sorted(_FACTORIES)),
        )
    return _finishing_writes(factory(url))


# How long closing a saver waits for checkpoint writes still running (see _finishing_writes).
WRITE_DRAIN_S = 5.0
_IN_FLIGHT = "_interleave_writes_in_flight"


@asynccontextmanager
async def _finishing_writes(
    opened: AbstractAsyncContextManager[BaseCheckpointSaver],
) -> AsyncIterator[BaseCheckpointSaver]:
    """The saver, closed only once the checkpoint writes still running on it have ended.

    LangGraph runs some writes as background tasks; a run cancelled by Ctrl-C or a caller's
    timeout can leave them running, and closing the connection under them makes asyncio print
    their errors at shutdown. Losing them would be harmless (the last checkpoint holds what a
    resume needs), only noisy.
    """
    async with opened as saver:
        in_flight = _track_writes(saver)
        try:
            yield saver
        finally:
            others = in_flight - {asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=WRITE_DRAIN_S)


def _track_writes(saver: BaseCheckpointSaver) -> set[asyncio.Task[Any]]:
    """The tasks inside the saver's ``aput``/``aput_writes`` right now (wrapped once per saver)."""
    in_flight: set[asyncio.Task[Any]] | None = saver.__dict__.get(_IN_FLIGHT)
    if in_flight is not None:
        return in_flight
    in_flight = set()
    for name in ("aput", "aput_writes"):
        setattr(saver, name, _tracked(getattr(saver, name), in_flight))
    saver.__dict__[_IN_FLIGHT] = in_flight
    return in_flight


def _tracked(
    write: Callable[..., Awaitable[Any]], in_flight: set[asyncio.Task[Any]]
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(write)
    async def tracked(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if task is not None:
            in_flight.add(task)
        try:
            return await write(*args, **kwargs)
        finally:
            in_flight.discard(task)  # type: ignore[arg-type]

    return tracked


# One saver per URL for the whole process: memory:// must outlive a single run to be resumable.
_MEMORY_SAVERS: dict[str, InMemorySaver] = {}


@asynccontextmanager
async def _open_memory(url: str) -> AsyncIterator[BaseCheckpointSaver]:
    saver = _MEMORY_SAVERS.get(url)
    if saver is None:
        saver = _MEMORY_SAVERS[url] = InMemorySaver(serde=make_serializer())
    yield saver


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///PATH`` URL (three slashes, then an absolute or relative path)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ConfigurationError(
            f"SQLite checkpointer URL {url!r} has no file path",
            hint="write it as sqlite:///relative/path.sqlite or sqlite:////absolute/path.sqlite",
        )
    return Path(url.removeprefix("sqlite:///"))


# How long a statement waits for another connection's write to end (SQLite's busy timeout).
SQLITE_BUSY_TIMEOUT_S = 30.0
# How long opening retries a table setup that another process's setup keeps locked.
SQLITE_SETUP_RETRY_S = 60.0


def _is_locked(exc: sqlite3.Error) -> bool:
    words = str(exc).lower()
    return "locked" in words or "busy" in words


async def _setup_sqlite(saver: Any, conn: Any) -> None:
    """Create the tables (and switch to WAL), retrying while another process does the same.

    Processes that open a fresh database together (two batches started at once) each switch
    it to WAL and create the tables; SQLite can refuse one of them "database is locked" at
    once, without waiting out the busy timeout. The setup is idempotent, so it is tried again.
    """
    deadline = time.monotonic() + SQLITE_SETUP_RETRY_S
    pause = 0.05
    while True:
        try:
            await saver.setup()
            # With WAL (set by setup), NORMAL still survives a killed process; it only risks
            # the last commits on a power cut, and halves the time each checkpoint waits.
            await conn.execute("PRAGMA synchronous=NORMAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
        with contextlib.suppress(sqlite3.Error):
            await conn.rollback()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


@asynccontextmanager
async def _open_sqlite(url: str) -> AsyncIterator[BaseCheckpointSaver]:
    import aiosqlite

    from interleave_thinker.checkpoints.faults import storage_error
    from interleave_thinker.checkpoints.sqlite_saver import OneTripSqliteSaver

    path = sqlite_path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    except (sqlite3.Error, OSError) as exc:
        translated = storage_error(exc, checkpointer_url=url)
        if translated is None:
            raise
        raise translated from exc
    try:
        saver = OneTripSqliteSaver(conn, serde=make_serializer())
        try:
            await _setup_sqlite(saver, conn)
        except sqlite3.Error as exc:
            raise storage_error(exc, checkpointer_url=url) from exc  # type: ignore[misc]
        yield saver
    finally:
        await conn.close()


def _open_postgres(url: str) -> AbstractAsyncContextManager[BaseCheckpointSaver]:
    # Imported on use: psycopg is an optional extra, and postgres.py imports this module.
    from interleave_thinker.checkpoints.postgres import open_postgres

    return open_postgres(url)


register_saver("memory", _open_memory)
register_saver("sqlite", _open_sqlite)
register_saver("postgresql", _open_postgres)
register_saver("postgres", _open_postgres)


_THREADS_SQL = "SELECT DISTINCT thread_id FROM checkpoints"
_ROOT_ONLY_SQL = " WHERE checkpoint_ns = ''"


async def list_thread_ids(saver: BaseCheckpointSaver, *, subgraphs: bool = False) -> list[str]:
    """Every thread id in ``saver``, asked of the database directly where the saver has one.

    Only threads with a checkpoint of the root graph, unless ``subgraphs``: then also those
    with only a subgraph's. Walking ``alist(None)`` would load and decode every checkpoint of
    every thread.
    """
    sql = _THREADS_SQL if subgraphs else _THREADS_SQL + _ROOT_ONLY_SQL
    connection = getattr(saver, "conn", None)
    # By class name along the MRO, so listing imports no saver package it does not use.
    kinds = {cls.__name__ for cls in type(saver).__mro__}
    if "AsyncSqliteSaver" in kinds and connection is not None:
        async with connection.execute(sql) as cursor:
            return [row[0] for row in await cursor.fetchall()]
    if "AsyncPostgresSaver" in kinds and hasattr(connection, "connection"):
        async with connection.connection() as conn:
            rows = await (await conn.execute(sql)).fetchall()
        return [row["thread_id"] if isinstance(row, dict) else row[0] for row in rows]
    threads: dict[str, None] = {}
    async for item in saver.alist(None):
        configurable = item.config["configurable"]
        if subgraphs or not configurable.get("checkpoint_ns"):
            threads.setdefault(configurable["thread_id"])
    return list(threads)
