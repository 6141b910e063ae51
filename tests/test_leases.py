"""One writer per thread: a second writer is refused naming the holder, a dead holder's lease is
taken over at once, on SQLite (lock files) and PostgreSQL (advisory locks), through the CLI,
the Python API, batch and the LangGraph server graph."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import RecordingGenerator, checkpointer_params
from interleave_thinker.batch import arun_batch, thread_id_for
from interleave_thinker.checkpoints import savers
from interleave_thinker.checkpoints.leases import lease_file_name, lease_folder, thread_lease
from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.context import Backends
from interleave_thinker.errors import ThreadBusyError
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions
from interleave_thinker.storage.atomic import host_name

SMALL = RunOptions(width=32, height=32)
REQUEST = "A seed falls. Rain comes. A sprout rises. Leaves unfold."
INTERLEAVE = Path(sys.executable).with_name("interleave")
DELAY = 0.4

# A process that holds one thread's lease until it is killed.
HOLDER = """
import asyncio, sys
from interleave_thinker.checkpoints.leases import thread_lease

async def main():
    async with thread_lease(sys.argv[1], sys.argv[2], sys.argv[3]):
        print("held", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.fixture(params=checkpointer_params("sqlite", "postgres"))
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A checkpointer that several processes can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/runs/checkpoints.sqlite"
    return request.getfixturevalue("postgres_url")


def _backends() -> tuple[Backends, RecordingGenerator]:
    generator = RecordingGenerator()
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=generator), generator


def _hold(url: str, run_dir: Path, thread: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(run_dir), thread],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "held", process.stderr.read() if process.poll() is not None else line
    return process


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


# --- the lease itself ---------------------------------------------------------------------------


async def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path, shared_url: str) -> None:
    thread = f"t-{uuid.uuid4().hex[:8]}"
    async with thread_lease(shared_url, tmp_path / "runs", thread):
        with pytest.raises(ThreadBusyError) as refused:
            async with thread_lease(shared_url, tmp_path / "runs", thread):
                pass
        # Other threads are free.
        async with thread_lease(shared_url, tmp_path / "runs", thread + "-other"):
            pass
    message = refused.value.message
    assert message.startswith(f"thread {thread} is already being run by another")
    assert f"pid {os.getpid()}" in message or f"process {os.getpid()}" in message
    assert host_name() in message and "since 20" in message
    assert f"interleave resume {thread}" in refused.value.hint
    # Released: taken again at once, and no lease file is left behind.
    async with thread_lease(shared_url, tmp_path / "runs", thread):
        pass
    if shared_url.startswith("sqlite"):
        assert list(lease_folder(shared_url, tmp_path / "runs").iterdir()) == []


async def test_a_memory_checkpointer_has_a_lease_within_the_process(tmp_path: Path) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    async with thread_lease(url, tmp_path, "t"):
        with pytest.raises(ThreadBusyError, match="another task of this process"):
            async with thread_lease(url, tmp_path, "t"):
                pass
    async with thread_lease(url, tmp_path, "t"):
        pass


async def test_another_process_is_named_and_its_lease_is_taken_over_once_it_is_killed(
    tmp_path: Path, shared_url: str
) -> None:
    thread = f"t-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "runs"
    holder = _hold(shared_url, run_dir, thread)
    try:
        with pytest.raises(ThreadBusyError) as refused:
            async with thread_lease(shared_url, run_dir, thread):
                pass
        assert f"process {holder.pid}" in refused.value.message
        assert f"on host {host_name()}" in refused.value.message
    finally:
        _kill(holder)
    if shared_url.startswith("sqlite"):
        # The dead holder's file is still there, naming it; its lock died with it.
        left = lease_folder(shared_url, run_dir) / lease_file_name(thread)
        assert json.loads(left.read_text())["pid"] == holder.pid
    started = time.monotonic()
    async with thread_lease(shared_url, run_dir, thread):
        pass
    assert time.monotonic() - started < 5


def test_a_thread_id_that_is_no_file_name_still_gets_a_safe_lease_file() -> None:
    assert lease_file_name("run-1") == "run-1.lock"
    for bad in ("../x", "a/b", "", "x" * 300):
        name = lease_file_name(bad)
        assert "/" not in name and name.startswith("sha256-") and len(name) < 64


# --- every entry point holds it -----------------------------------------------------------------


async def test_arun_and_aresume_are_refused_while_another_writer_holds_the_thread(
    tmp_path: Path, shared_url: str
) -> None:
    run_dir = tmp_path / "runs"
    thread = f"t-{uuid.uuid4().hex[:8]}"
    backends, generator = _backends()
    async with thread_lease(shared_url, run_dir, thread):
        with pytest.raises(ThreadBusyError):
            await arun(REQUEST, backends=backends, options=SMALL, thread_id=thread,
                       run_dir=run_dir, checkpointer=shared_url)
    assert generator.jobs == []
    result = await arun(REQUEST, backends=backends, options=SMALL, thread_id=thread,
                        run_dir=run_dir, checkpointer=shared_url)
    async with thread_lease(shared_url, run_dir, thread):
        with pytest.raises(ThreadBusyError):
            await aresume(thread, backends=backends, run_dir=run_dir, checkpointer=shared_url)
    again = await aresume(thread, backends=backends, run_dir=run_dir, checkpointer=shared_url)
    assert again.document == result.document


async def test_two_concurrent_runs_of_one_thread_in_one_process_draw_once(
    tmp_path: Path, shared_url: str
) -> None:
    run_dir = tmp_path / "runs"
    backends, generator = _backends()
    thread = f"t-{uuid.uuid4().hex[:8]}"
    outcomes = await asyncio.gather(
        *(arun(REQUEST, backends=backends, options=SMALL, thread_id=thread, run_dir=run_dir,
               checkpointer=shared_url) for _ in range(2)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, ThreadBusyError) for o in outcomes) == 1
    done = next(o for o in outcomes if not isinstance(o, BaseException))
    jobs = [(job.step, job.attempt) for job in generator.jobs]
    assert len(jobs) == len(set(jobs)) == done.document.generator_calls


async def test_a_batch_prompt_whose_thread_is_busy_fails_and_the_others_finish(
    tmp_path: Path, shared_url: str
) -> None:
    prefix = uuid.uuid4().hex[:8]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"id": f"{prefix}-{n}", "text": f"Scene {n} opens. Scene {n} closes."}) + "\n"
        for n in range(3)
    ))
    run_dir = tmp_path / "runs"
    busy = thread_id_for(f"{prefix}-1")
    backends, _ = _backends()
    async with thread_lease(shared_url, run_dir, busy):
        report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=3,
                                  run_dir=run_dir, checkpointer=shared_url)
    statuses = {o.thread_id: (o.status, o.error) for o in report.outcomes}
    assert statuses[busy][0] == "failed"
    assert statuses[busy][1].startswith(f"thread {busy} is already being run by another task")
    assert [s for t, (s, _) in statuses.items() if t != busy] == ["done", "done"]
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert {row["thread_id"]: row["status"] for row in rows}[busy] == "failed"
    # Rerun once the holder has gone: the busy prompt finishes, the others call nothing.
    backends, generator = _backends()
    report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=3,
                              run_dir=run_dir, checkpointer=shared_url)
    assert report.failed == 0
    assert {job.thread_id for job in generator.jobs} == {busy}


async def test_the_server_graph_refuses_a_thread_another_writer_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    from interleave_thinker import server
    from interleave_thinker.prompts.packs import InterleavePack
    from interleave_thinker.workspace import RUN_DIR_ENV

    run_dir = tmp_path / "runs"
    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    backends, generator = _backends()
    monkeypatch.setattr(server, "_MODELS", {("test", False): (backends, InterleavePack())})
    served = server.graph.copy(update={"checkpointer": InMemorySaver(serde=savers.make_serializer())})
    thread = str(uuid.uuid4())
    config: Any = {"configurable": {"thread_id": thread}}
    payload = {"text": REQUEST, "profile": "test", "options": {"width": 32, "height": 32}}
    async with thread_lease(None, run_dir, thread):
        with pytest.raises(ThreadBusyError, match="already being run"):
            await served.ainvoke(payload, config)
    assert generator.jobs == []
    out = await served.ainvoke(None, config)
    assert out["document"] is not None


# --- SQLite set-up by processes that start together ---------------------------------------------


async def test_opening_a_fresh_database_waits_out_another_connections_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No busy wait at all: SQLite answers "database is locked" at once, and the set-up retries.
    monkeypatch.setattr(savers, "SQLITE_BUSY_TIMEOUT_S", 0.0)
    path = tmp_path / "fresh.sqlite"
    other = sqlite3.connect(path, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.5, other.rollback).start()
    started = time.monotonic()
    async with open_checkpointer(f"sqlite:///{path}") as saver:
        assert saver is not None
    assert time.monotonic() - started >= 0.4
    other.close()


def _batch(prompts: Path, run_dir: Path, log: Path, delay: float = 0.0) -> subprocess.Popen[str]:
    env = {**os.environ, "INTERLEAVE_RUN_DIR": str(run_dir), "INTERLEAVE_TEST_CALL_LOG": str(log),
           "INTERLEAVE_TEST_GENERATOR_DELAY": str(delay)}
    return subprocess.Popen(
        [str(INTERLEAVE), "batch", str(prompts), "--profile", "test", "--size", "32x32",
         "--concurrency", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _calls(log: Path) -> list[tuple[str, int, int]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [(c["thread"], c["step"], c["attempt"]) for c in map(json.loads, lines)]


def _prompt_file(path: Path, prefix: str, count: int) -> Path:
    path.write_text("".join(
        json.dumps({"id": f"{prefix}{n}", "text": f"A {prefix} {n} wakes. It walks. It rests."})
        + "\n" for n in range(count)
    ))
    return path


def test_two_batches_started_together_on_a_fresh_directory_both_finish(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "runs", tmp_path / "calls.log"
    first = _prompt_file(tmp_path / "first.jsonl", "cat", 4)
    second = _prompt_file(tmp_path / "second.jsonl", "dog", 4)
    processes = [_batch(first, run_dir, log), _batch(second, run_dir, log)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr and "locked" not in stderr, stderr


@pytest.mark.slow
def test_the_same_batch_started_twice_draws_each_image_once(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "runs", tmp_path / "calls.log"
    prompts = _prompt_file(tmp_path / "prompts.jsonl", "owl", 4)
    processes = [_batch(prompts, run_dir, log, DELAY / 4) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert "Traceback" not in stderr, stderr
        for line in stderr.splitlines():
            # Each failure is a thread the other batch was running.
            assert not line.startswith("error:") or "is already being run by process" in line, line
    calls = _calls(log)
    assert [call for call, count in Counter(calls).items() if count > 1] == []
    # Every prompt ends done; a rerun finishes what was busy and draws nothing twice.
    rerun = _batch(prompts, run_dir, log)
    _, stderr = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, stderr
    assert [call for call, count in Counter(_calls(log)).items() if count > 1] == []


# --- two `interleave run` processes on one thread (slow: real console scripts, slow draws) ------


def _interleave(
    *args: str, run_dir: Path, log: Path, url: str, delay: float = DELAY
) -> subprocess.Popen[str]:
    env = {**os.environ, "INTERLEAVE_RUN_DIR": str(run_dir), "INTERLEAVE_TEST_CALL_LOG": str(log),
           "INTERLEAVE_TEST_GENERATOR_DELAY": str(delay), "INTERLEAVE_CHECKPOINTER": url}
    return subprocess.Popen([str(INTERLEAVE), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_calls(log: Path, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(_calls(log)) < count:
        assert process.poll() is None, "the run ended before the test could use it"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _clean_calls(tmp_path: Path, thread: str) -> list[tuple[str, int, int]]:
    """The generator calls of one uninterrupted run of the request (its own SQLite directory)."""
    log, run_dir = tmp_path / "clean.log", tmp_path / "clean"
    process = _interleave("run", "--profile", "test", "--size", "32x32", "--thread", thread,
                          REQUEST, run_dir=run_dir, log=log,
                          url=f"sqlite:///{run_dir}/checkpoints.sqlite")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return _calls(log)


def _export(thread: str, run_dir: Path, log: Path, url: str) -> dict[str, Any]:
    out = run_dir.parent / f"{uuid.uuid4().hex}.json"
    process = _interleave("export", thread, "--format", "json", "-o", str(out),
                          run_dir=run_dir, log=log, url=url)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    steps = json.loads(out.read_text())["document"]["steps"]
    for step in steps:
        for attempt in step["attempts"]:
            for timing in ("started_at", "generation_seconds", "critique_seconds", "reused"):
                attempt.pop(timing, None)
    return steps


@pytest.mark.slow
def test_a_second_process_on_a_running_thread_is_refused_and_nothing_is_drawn_twice(
    tmp_path: Path, shared_url: str
) -> None:
    thread = f"story-{uuid.uuid4().hex[:6]}"
    clean = _clean_calls(tmp_path, thread)
    run_dir, log = tmp_path / "runs", tmp_path / "calls.log"
    args = ("run", "--profile", "test", "--size", "32x32", "--thread", thread, REQUEST)
    # Slow draws (about 10 s in all), so the first run outlasts the start-up of the others.
    first = _interleave(*args, run_dir=run_dir, log=log, url=shared_url, delay=1.5)
    _wait_for_calls(log, 1, first)
    others = [_interleave(*second_args, run_dir=run_dir, log=log, url=shared_url)
              for second_args in (args, ("resume", thread))]
    for second in others:
        stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 1 and stdout == ""
        assert first.poll() is None, "the first run ended before the second was refused"
        lines = stderr.strip().splitlines()
        assert lines[-2].startswith(
            f"error: thread {thread} is already being run by process {first.pid} (interleave run) "
            f"on host {host_name()}, since "
        ), stderr
        assert lines[-1].startswith(
            f"hint: wait for that run to end (or stop it), then `interleave resume {thread}`"
        )
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert sorted(_calls(log)) == sorted(clean)


@pytest.mark.slow
def test_a_killed_holders_thread_is_resumed_at_once(tmp_path: Path, shared_url: str) -> None:
    thread = f"story-{uuid.uuid4().hex[:6]}"
    clean = _clean_calls(tmp_path, thread)
    run_dir, log = tmp_path / "runs", tmp_path / "calls.log"
    first = _interleave("run", "--profile", "test", "--size", "32x32", "--thread", thread,
                        REQUEST, run_dir=run_dir, log=log, url=shared_url)
    _wait_for_calls(log, 2, first)
    # Half a generator delay later the process is inside the next call (as in test_crash_resume).
    time.sleep(DELAY / 2)
    _kill(first)
    resumed = _interleave("resume", thread, run_dir=run_dir, log=log, url=shared_url)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    calls = _calls(log)
    assert [call for call, count in Counter(calls).items() if count > 1] == []
    assert sorted(calls) == sorted(clean)
    assert _export(thread, run_dir, log, shared_url) == _export(
        thread, tmp_path / "clean", tmp_path / "clean.log",
        f"sqlite:///{tmp_path}/clean/checkpoints.sqlite",
    )
