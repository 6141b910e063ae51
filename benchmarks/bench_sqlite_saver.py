"""Benchmark a, saver row: one graph step's SQLite saves, our one-trip saver against LangGraph's."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import aiosqlite
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from benchmarks.bench_orchestration import SECTION
from benchmarks.common import Figure
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.checkpoints.sqlite_saver import OneTripSqliteSaver

# Sizes of a real step (benchmark b): a checkpoint of about 12 KB, one task writing two channels.
CHECKPOINT_TEXT = 12_000
WRITE_TEXT = 500


async def _steps_ms(cls: type[AsyncSqliteSaver], database: Path, steps: int) -> float:
    """ms per step: the task's writes (a task of their own, as LangGraph schedules them), then
    the checkpoint, on a fresh database set up as `open_checkpointer` sets it up."""
    async with aiosqlite.connect(database) as connection:
        saver = cls(connection, serde=make_serializer())
        await saver.setup()
        await connection.execute("PRAGMA synchronous=NORMAL")
        config = {"configurable": {"thread_id": "bench", "checkpoint_ns": ""}}
        started = time.perf_counter()
        for step in range(steps):
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"document": "d" * CHECKPOINT_TEXT, "step": step}
            at = {"configurable": {**config["configurable"], "checkpoint_id": checkpoint["id"]}}
            writes = [("document", "w" * WRITE_TEXT), ("step", step)]
            await asyncio.create_task(saver.aput_writes(at, writes, task_id=f"task-{step}"))
            config = await saver.aput(config, checkpoint, {"step": step}, {})
        return 1000 * (time.perf_counter() - started) / steps


def run(repeats: int, quick: bool) -> list[Figure]:
    """Each repeat saves the same steps with LangGraph's saver and with ours, alternating."""
    steps = 20 if quick else 200
    ours: list[float] = []
    theirs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-saver-") as tmp:
        for index in range(repeats):
            order = (AsyncSqliteSaver, OneTripSqliteSaver)
            for cls in order if index % 2 == 0 else order[::-1]:
                database = Path(tmp) / f"{uuid.uuid4().hex}.sqlite"
                ms = asyncio.run(_steps_ms(cls, database, steps))
                (ours if cls is OneTripSqliteSaver else theirs).append(ms)
    return [
        Figure(
            SECTION, "SQLite saves of one graph step (a task's writes + the checkpoint)", "ms",
            ours, theirs,
            notes=f"{steps} steps per sample, each a {CHECKPOINT_TEXT // 1000} KB checkpoint and "
            "one task's two writes, on a fresh WAL database with `synchronous=NORMAL`. Ours: "
            "`OneTripSqliteSaver`, each save one insert-and-commit on aiosqlite's thread. "
            "Baseline: LangGraph's `AsyncSqliteSaver` (three trips to that thread per "
            "checkpoint, four per set of writes), same process, alternating. A generator call "
            "takes two such steps (generator, critic).",
        )
    ]
