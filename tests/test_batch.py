"""Batch runs: shards, resumable reruns that call nothing, bad lines, and request coalescing."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import RecordingGenerator
from interleave_thinker.batch import arun_batch, in_shard, read_prompt_file, thread_id_for
from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.generators.coalescing import CoalescingGenerator
from interleave_thinker.inspect import alist_threads
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.state import RunOptions
from interleave_thinker.workspace import THREAD_ID_PATTERN

SMALL = RunOptions(width=32, height=32)


def _prompt_file(folder: Path, count: int = 6, extra: str = "", prefix: str = "p") -> Path:
    lines = [json.dumps({"id": f"{prefix}{n}", "text": f"Scene {n} opens. Scene {n} closes."})
             for n in range(count)]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _backends() -> tuple[Backends, RecordingGenerator]:
    generator = RecordingGenerator()
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=generator), generator


async def test_two_shards_cover_the_file_and_a_rerun_calls_nothing(
    tmp_path: Path, checkpointer_url: str
) -> None:
    # Prompt ids are unique per test run: a PostgreSQL database outlives the test.
    prefix = f"{uuid.uuid4().hex[:8]}-p"
    prompts = _prompt_file(tmp_path, prefix=prefix)
    run_dir = tmp_path / "runs"
    ids: list[set[str]] = []
    for shard in [(0, 2), (1, 2)]:
        backends, _ = _backends()
        report = await arun_batch(prompts, backends=backends, options=SMALL, shard=shard,
                                  concurrency=3, run_dir=run_dir, checkpointer=checkpointer_url)
        assert report.failed == 0 and report.manifest.is_file() and report.index.is_file()
        ids.append({outcome.prompt_id for outcome in report.outcomes})
    assert ids[0] | ids[1] == {f"{prefix}{n}" for n in range(6)} and not ids[0] & ids[1]

    listed = await alist_threads(run_dir=run_dir, checkpointer=checkpointer_url)
    threads = {s.thread_id: s.status for s in listed if s.thread_id.startswith(f"batch-{prefix}")}
    assert threads == {thread_id_for(f"{prefix}{n}"): "done" for n in range(6)}

    for shard in [(0, 2), (1, 2)]:
        backends, generator = _backends()
        again = await arun_batch(prompts, backends=backends, options=SMALL, shard=shard,
                                 run_dir=run_dir, checkpointer=checkpointer_url)
        assert generator.jobs == [] and again.backend_calls == 0
        assert all(outcome.status == "done" for outcome in again.outcomes)
    async with open_checkpointer(checkpointer_url) as saver:
        for thread in threads:
            await saver.adelete_thread(thread)


async def test_bad_lines_are_named_and_the_other_prompts_run(tmp_path: Path) -> None:
    extra = '{"id": "broken", "text": }\n{"id": "p1", "text": "duplicate id"}\n{"text": "no id"}\n'
    prompts = _prompt_file(tmp_path, count=2, extra=extra)
    backends, _ = _backends()
    report = await arun_batch(prompts, backends=backends, options=SMALL, run_dir=tmp_path / "r")
    assert [outcome.status for outcome in report.outcomes] == ["done", "done"]
    assert [bad.line for bad in report.bad_lines] == [3, 4, 5]
    assert "already used on line 2" in report.bad_lines[1].error
    assert report.bad_lines[2].error.startswith("id:")
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["done", "done", "invalid", "invalid", "invalid"]


async def test_concurrent_trajectories_share_generator_calls(tmp_path: Path) -> None:
    backends, generator = _backends()
    report = await arun_batch(_prompt_file(tmp_path, count=8), backends=backends, options=SMALL,
                              concurrency=8, max_wait=0.2, run_dir=tmp_path / "r")
    requests = sum(outcome.generator_calls for outcome in report.outcomes)
    assert requests == len(generator.jobs) >= 16
    assert report.backend_calls == len(generator.batch_sizes) < requests / 2


async def test_coalescing_batches_orders_and_propagates_errors() -> None:
    inner = RecordingGenerator()
    merged = CoalescingGenerator(inner, max_batch=3, max_wait=0.5)
    jobs = [GenerationJob(prompt=f"p{n}", seed=n, width=16, height=16) for n in range(7)]
    results = await asyncio.gather(*(merged.agenerate([job]) for job in jobs))
    # Full batches go one call at a time; the remainder goes as soon as the backend is free.
    assert inner.batch_sizes == [3, 3, 1] and merged.backend_calls == 3
    alone = await RecordingGenerator().agenerate(jobs)
    assert [r[0].tobytes() for r in results] == [image.tobytes() for image in alone]

    class Broken(RecordingGenerator):
        async def agenerate(self, jobs):  # type: ignore[no-untyped-def]
            raise RuntimeError("GPU fell over")

    failing = CoalescingGenerator(Broken(), max_batch=8, max_wait=0.01)
    outcomes = await asyncio.gather(*(failing.agenerate([job]) for job in jobs[:3]),
                                    return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


class SlowBackend(RecordingGenerator):
    """One call takes ``seconds``; records how many calls ever ran at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.running = 0
        self.most_at_once = 0

    async def agenerate(self, jobs):  # type: ignore[no-untyped-def]
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.seconds)
            return await super().agenerate(jobs)
        finally:
            self.running -= 1


async def _staggered(merged: CoalescingGenerator, count: int, every: float) -> None:
    """``count`` single-job requests, one every ``every`` seconds, as trajectories send them."""
    async def one(n: int) -> None:
        await asyncio.sleep(n * every)
        await merged.agenerate([GenerationJob(prompt=f"p{n}", seed=n, width=8, height=8)])

    await asyncio.gather(*(one(n) for n in range(count)))


async def test_jobs_gather_while_the_backend_is_busy() -> None:
    # Eleven jobs arrive over 0.4 s; the first call starts after max_wait (0.1 s) and takes
    # 0.6 s, so every later job arrives while it runs.
    backend = SlowBackend(seconds=0.6)
    merged = CoalescingGenerator(backend, max_batch=16, max_wait=0.1, max_in_flight=1)
    await _staggered(merged, count=11, every=0.04)
    # What gathered during the first call goes in one second call, not in one call per wait.
    assert len(backend.batch_sizes) == 2 and sum(backend.batch_sizes) == 11
    assert backend.most_at_once == 1
    assert sorted(job.seed for job in backend.jobs) == list(range(11))

    # Without a limit every max_wait sends what has gathered: small calls pile up at once.
    unbounded = SlowBackend(seconds=0.6)
    merged = CoalescingGenerator(unbounded, max_batch=16, max_wait=0.1, max_in_flight=None)
    await _staggered(merged, count=11, every=0.04)
    assert len(unbounded.batch_sizes) >= 3 and unbounded.most_at_once >= 3


async def test_two_calls_in_flight_and_max_batch_still_bound_each_call() -> None:
    backend = SlowBackend(seconds=0.3)
    merged = CoalescingGenerator(backend, max_batch=4, max_wait=0.05, max_in_flight=2)
    jobs = [GenerationJob(prompt=f"p{n}", seed=n, width=8, height=8) for n in range(10)]
    await asyncio.gather(*(merged.agenerate([job]) for job in jobs))
    # Two full calls at once; the two left over go when the first call ends.
    assert backend.batch_sizes == [4, 4, 2] and backend.most_at_once == 2
    with pytest.raises(ValueError, match="max_in_flight"):
        CoalescingGenerator(backend, max_in_flight=0)


def test_thread_ids_and_shards_are_stable_and_valid() -> None:
    for prompt_id in ["a", "../../etc", "spaces and ünïcode", "x" * 500, "c/../x"]:
        thread = thread_id_for(prompt_id)
        assert THREAD_ID_PATTERN.fullmatch(thread) and thread == thread_id_for(prompt_id)
    assert thread_id_for("a/b") != thread_id_for("a_b")
    ids = [f"id{n}" for n in range(200)]
    counts = [sum(in_shard(i, (k, 3)) for i in ids) for k in range(3)]
    assert sum(counts) == 200 and min(counts) > 40


def test_read_prompt_file_refuses_a_missing_file_and_a_non_utf8_line(tmp_path: Path) -> None:
    from interleave_thinker.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.jsonl")
    # A line that is not UTF-8 is one bad line; the file's other lines are still read.
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n{"id": "b", "text": "tea"}\n')
    prompts, bad = read_prompt_file(latin)
    assert [item.prompt.id for item in prompts] == ["b"]
    assert [line.line for line in bad] == [1] and "not UTF-8" in bad[0].error


def test_batch_cli_reports_bad_lines_and_writes_index(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    prompts = _prompt_file(tmp_path, count=3, extra="oops\n")
    result = CliRunner().invoke(app, ["batch", str(prompts), "--profile", "test",
                                      "--size", "32x32", "--concurrency", "2"])
    assert result.exit_code == 1
    assert f"error: {prompts}:4:" in result.stderr
    assert "3 finished, 0 failed, 1 invalid lines" in result.stderr
    index = Path(result.stdout.strip().splitlines()[-1])
    assert index.is_file() and index.read_text().count("<a href=") == 3


def test_batch_cli_traces_every_thread_to_the_trace_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    prompts = _prompt_file(tmp_path, count=3)
    trace = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(app, ["batch", str(prompts), "--profile", "test", "--size", "32x32",
                                      "--trace-file", str(trace)])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    traced = {r["metadata"].get("thread_id") for r in records}
    assert {thread_id_for(f"p{n}") for n in range(3)} <= traced
    # Images appear as references: no pixels in the trace.
    assert "iVBOR" not in trace.read_text() and "base64," not in trace.read_text()
