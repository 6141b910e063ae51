"""Open a LangGraph checkpointer from a URL: sqlite:///PATH, memory://, more schemes by registration."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
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
    return factory(url)


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
