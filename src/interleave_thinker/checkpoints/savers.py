"""Open a LangGraph checkpointer from a URL: sqlite:///PATH, memory://, more schemes by registration."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.settings import redact_url
from interleave_thinker.state import STATE_RECORD_TYPES

SaverFactory = Callable[[str], AbstractAsyncContextManager[BaseCheckpointSaver]]

_FACTORIES: dict[str, SaverFactory] = {}


def make_serializer() -> JsonPlusSerializer:
    """LangGraph's serializer with our state records allowed, so loading them never warns."""
    allowed = [(cls.__module__, cls.__name__) for cls in STATE_RECORD_TYPES]
    return JsonPlusSerializer(allowed_msgpack_modules=allowed)


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


@asynccontextmanager
async def _open_sqlite(url: str) -> AsyncIterator[BaseCheckpointSaver]:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    path = sqlite_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(str(path)) as conn:
        saver = AsyncSqliteSaver(conn, serde=make_serializer())
        await saver.setup()
        # With WAL (set by setup), NORMAL still survives a killed process; it only risks the
        # last commits on a power cut, and halves the time each checkpoint waits on the disk.
        await conn.execute("PRAGMA synchronous=NORMAL")
        yield saver


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
    kind = type(saver).__name__
    if kind == "AsyncSqliteSaver" and connection is not None:
        async with connection.execute(sql) as cursor:
            return [row[0] for row in await cursor.fetchall()]
    if kind == "AsyncPostgresSaver" and hasattr(connection, "connection"):
        async with connection.connection() as conn:
            rows = await (await conn.execute(sql)).fetchall()
        return [row["thread_id"] if isinstance(row, dict) else row[0] for row in rows]
    threads: dict[str, None] = {}
    async for item in saver.alist(None):
        configurable = item.config["configurable"]
        if subgraphs or not configurable.get("checkpoint_ns"):
            threads.setdefault(configurable["thread_id"])
    return list(threads)
