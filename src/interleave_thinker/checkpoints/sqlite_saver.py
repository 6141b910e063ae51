"""LangGraph's SQLite saver with each checkpoint save done in one trip to the database thread."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

# The statements and row layout of langgraph-checkpoint-sqlite's own aput and aput_writes: the
# tables are theirs, and everything else (reads, listing, deletes, setup) is still their code.
# tests/test_sqlite_saver.py reads rows written here back through the base class, and LangGraph's
# conformance suite runs on this class (tests/test_conformance.py).
PUT_CHECKPOINT_SQL = (
    "INSERT OR REPLACE INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, "
    "parent_checkpoint_id, type, checkpoint, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_WRITES_COLUMNS = (
    "INTO writes (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, "
    "type, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Special channels (errors, interrupts, ...) have fixed indexes and replace an earlier write;
# ordinary writes keep the first one saved, as in the base class.
REPLACE_WRITES_SQL = "INSERT OR REPLACE " + _WRITES_COLUMNS
KEEP_WRITES_SQL = "INSERT OR IGNORE " + _WRITES_COLUMNS


class OneTripSqliteSaver(AsyncSqliteSaver):
    """An ``AsyncSqliteSaver`` whose ``aput`` and ``aput_writes`` take one trip each.

    aiosqlite runs every call on its own thread and wakes the event loop for each result. The
    base class makes three such trips per checkpoint (execute, commit, close the cursor) and
    four per set of pending writes, and a graph step awaits both: about 1.2 ms per step on a
    2-core machine, against 0.5 ms here (benchmarks/REPORT.md, section a, "SQLite saves of one
    graph step"; a generator call takes two steps). Here the insert and its commit run as one
    function on that thread, in the same transaction, so what a crash can leave behind is the
    same: the rows of one save are committed together or not at all.
    """

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save ``checkpoint`` as the base class does, in one trip to the database thread."""
        await self.setup()
        configurable = config["configurable"]
        thread_id = configurable["thread_id"]
        checkpoint_ns = configurable["checkpoint_ns"]
        type_, serialized_checkpoint = self.serde.dumps_typed(checkpoint)
        serialized_metadata = json.dumps(
            get_checkpoint_metadata(config, metadata), ensure_ascii=False
        ).encode("utf-8", "ignore")
        row = (
            str(thread_id),
            checkpoint_ns,
            checkpoint["id"],
            configurable.get("checkpoint_id"),
            type_,
            serialized_checkpoint,
            serialized_metadata,
        )
        async with self.lock:
            await self._in_database_thread(PUT_CHECKPOINT_SQL, [row])
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Save a task's pending ``writes`` as the base class does, in one trip."""
        sql = REPLACE_WRITES_SQL if all(w[0] in WRITES_IDX_MAP for w in writes) else KEEP_WRITES_SQL
        await self.setup()
        configurable = config["configurable"]
        rows = [
            (
                str(configurable["thread_id"]),
                str(configurable["checkpoint_ns"]),
                str(configurable["checkpoint_id"]),
                task_id,
                task_path,
                WRITES_IDX_MAP.get(channel, idx),
                channel,
                *self.serde.dumps_typed(value),
            )
            for idx, (channel, value) in enumerate(writes)
        ]
        async with self.lock:
            await self._in_database_thread(sql, rows)

    async def _in_database_thread(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        run = getattr(self.conn, "_execute", None)
        if run is None:
            # An aiosqlite without its one-call hook: the same statements, trip by trip.
            async with self.conn.cursor() as cursor:
                await cursor.executemany(sql, rows)
            await self.conn.commit()
            return
        await run(self._insert_and_commit, self.conn._conn, sql, rows)

    def _insert_and_commit(
        self, connection: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]
    ) -> None:
        """On aiosqlite's thread: the rows and their commit, or, on any error, none of them."""
        try:
            connection.executemany(sql, rows)
            self._commit(connection, sql)
        except BaseException:
            # Left open, a failed transaction would be committed by the next save with it.
            with contextlib.suppress(sqlite3.Error):
                connection.rollback()
            raise

    def _commit(self, connection: sqlite3.Connection, sql: str) -> None:
        """Commit what ``sql`` inserted (a method so the fault harness can stop here)."""
        connection.commit()
