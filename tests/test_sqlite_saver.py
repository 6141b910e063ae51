"""The one-trip SQLite saver: the same rows as LangGraph's, one database-thread trip per save."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from interleave_thinker.checkpoints.savers import list_thread_ids, make_serializer, open_checkpointer
from interleave_thinker.checkpoints.sqlite_saver import KEEP_WRITES_SQL, OneTripSqliteSaver

THREAD = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}


def _checkpoint(number: int) -> Any:
    checkpoint = empty_checkpoint()
    checkpoint["id"] = f"1ef0000{number}-0000-6000-8000-000000000000"
    checkpoint["ts"] = f"2026-12-03T00:00:0{number}+00:00"  # not the clock: rows are compared
    checkpoint["channel_values"] = {"topic": f"step {number}", "count": number}
    checkpoint["channel_versions"] = {"topic": str(number), "count": str(number)}
    return checkpoint


async def _save_trajectory(saver: AsyncSqliteSaver) -> None:
    """Two checkpoints, the second a child of the first, with ordinary and special writes."""
    first = await saver.aput(THREAD, _checkpoint(1), {"source": "input", "step": -1}, {})
    await saver.aput_writes(first, [("topic", "drawn"), ("count", 2)], task_id="task-a", task_path="~a")
    await saver.aput_writes(first, [("__error__", "boom")], task_id="task-b")
    second = await saver.aput(first, _checkpoint(2), {"source": "loop", "step": 0, "note": "ü"}, {})
    await saver.aput_writes(second, [("topic", "again")], task_id="task-c")
    # An ordinary write saved twice keeps the first value; a special one is replaced.
    await saver.aput_writes(second, [("topic", "ignored")], task_id="task-c")
    await saver.aput_writes(first, [("__error__", "replaced")], task_id="task-b")


def _rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as connection:
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5").fetchall()
            for table in ("checkpoints", "writes")
        }


async def _open(cls: type[AsyncSqliteSaver], path: Path) -> AsyncIterator[AsyncSqliteSaver]:
    async with aiosqlite.connect(path) as connection:
        saver = cls(connection, serde=make_serializer())
        await saver.setup()
        yield saver


async def test_it_writes_the_same_rows_as_langgraphs_saver(tmp_path: Path) -> None:
    for cls, name in ((AsyncSqliteSaver, "base.sqlite"), (OneTripSqliteSaver, "one-trip.sqlite")):
        async for saver in _open(cls, tmp_path / name):
            await _save_trajectory(saver)
    ours, theirs = _rows(tmp_path / "one-trip.sqlite"), _rows(tmp_path / "base.sqlite")
    assert len(ours["checkpoints"]) == 2 and len(ours["writes"]) == 4
    assert ours == theirs


async def test_langgraphs_saver_reads_back_what_it_saved(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async for saver in _open(OneTripSqliteSaver, path):
        await _save_trajectory(saver)
    async for reader in _open(AsyncSqliteSaver, path):
        latest = await reader.aget_tuple(THREAD)
    assert latest is not None and latest.checkpoint["channel_values"]["topic"] == "step 2"
    assert latest.parent_config is not None
    assert latest.parent_config["configurable"]["checkpoint_id"] == _checkpoint(1)["id"]
    assert latest.metadata["note"] == "ü"
    assert latest.pending_writes == [("task-c", "topic", "again")]


async def test_each_save_is_one_trip_to_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips: list[str] = []
    original = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kwargs)

    async for saver in _open(OneTripSqliteSaver, tmp_path / "c.sqlite"):
        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
        config = await saver.aput(THREAD, _checkpoint(1), {}, {})
        assert trips == ["_insert_and_commit"]
        await saver.aput_writes(config, [("topic", "a"), ("count", 1)], task_id="x")
        assert trips == ["_insert_and_commit"] * 2
        # LangGraph's own class, for scale: several trips for the same two saves.
        trips.clear()
        config = await AsyncSqliteSaver.aput(saver, THREAD, _checkpoint(2), {}, {})
        await AsyncSqliteSaver.aput_writes(saver, config, [("topic", "b")], task_id="y")
        assert len(trips) > 2


async def test_a_failed_save_leaves_nothing_for_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async for saver in _open(OneTripSqliteSaver, path):
        config = await saver.aput(THREAD, _checkpoint(1), {}, {})
        good = ("t", "", config["configurable"]["checkpoint_id"], "task", "", 0, "topic", "str", b"x")
        with pytest.raises(sqlite3.ProgrammingError):
            # The first row is inserted, then the short second row fails the statement.
            await saver._in_database_thread(KEEP_WRITES_SQL, [good, good[:3]])
        assert not saver.conn.in_transaction
        await saver.aput_writes(config, [("count", 1)], task_id="other")
    assert [row[3] for row in _rows(path)["writes"]] == ["other"]


class _ConnectionWithoutHook:
    """An aiosqlite connection as one without ``_execute`` would look."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        if name == "_execute":
            raise AttributeError(name)
        return getattr(self._connection, name)


async def test_without_aiosqlites_hook_it_saves_the_same_rows_trip_by_trip(tmp_path: Path) -> None:
    async for saver in _open(OneTripSqliteSaver, tmp_path / "c.sqlite"):
        saver.conn = _ConnectionWithoutHook(saver.conn)  # type: ignore[assignment]
        await _save_trajectory(saver)
        saver.conn = saver.conn._connection  # type: ignore[attr-defined]
    async for saver in _open(AsyncSqliteSaver, tmp_path / "base.sqlite"):
        await _save_trajectory(saver)
    assert _rows(tmp_path / "c.sqlite") == _rows(tmp_path / "base.sqlite")


async def test_a_sqlite_url_opens_the_one_trip_saver(tmp_path: Path) -> None:
    async with open_checkpointer(f"sqlite:///{tmp_path}/c.sqlite") as saver:
        assert type(saver) is OneTripSqliteSaver


async def test_threads_are_listed_by_sql_not_by_loading_every_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_checkpointer(f"sqlite:///{tmp_path}/c.sqlite") as saver:
        await _save_trajectory(saver)

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("listing walked alist: the one-trip saver was not seen as SQLite")

        monkeypatch.setattr(OneTripSqliteSaver, "alist", refuse)
        assert await list_thread_ids(saver) == ["t"]
