"""Load: 100 trajectories at once through `interleave batch`, on SQLite and on PostgreSQL.

Each concurrent thread must end with exactly the document the same prompt gets when the prompts
run one at a time (nothing lost, nothing mixed between threads), and the process's peak memory
must stay under a fixed bound. The figures are printed for RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import checkpointer_params
from interleave_thinker.batch import arun_batch, thread_id_for
from interleave_thinker.inspect import alist_threads, aload_document
from interleave_thinker.state import RunOptions

pytestmark = pytest.mark.slow

TRAJECTORIES = 100
SIZE = 64
# Measured here: about 110 MiB for 100 trajectories at 64x64 (one is about 100 MiB: mostly the
# interpreter, LangGraph and Pillow). The bound leaves room for other machines, not for a leak
# that grows with the number of threads.
MAX_PEAK_RSS_MIB = 400
INTERLEAVE = Path(sys.executable).with_name("interleave")
# Started by a small launcher: Linux carries a parent's peak RSS across fork, so the pytest
# process (torch loaded by other tests) must not be the one that forks the measured child.
LAUNCHER = (
    "import json, resource, subprocess, sys, time\n"
    "started = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': done.returncode, 'stderr': done.stderr[-4000:],"
    " 'seconds': time.perf_counter() - started,"
    " 'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)
ANIMALS = ["fox", "owl", "otter", "heron", "lynx", "badger", "crane", "moth", "toad", "wren"]


def _write_prompts(path: Path, prefix: str) -> dict[str, str]:
    texts = {}
    for n in range(TRAJECTORIES):
        animal = ANIMALS[n % len(ANIMALS)]
        # Distinct words per prompt, a question (a text-only step) and steps the test critic
        # rejects once: each thread has its own images, retries and step kinds.
        texts[f"{prefix}{n:03d}"] = (
            f"A {animal} number {n} wakes. The {animal} {n} crosses a river. "
            f"Is the {animal} {n} tired? The {animal} {n} sleeps under {n % 7 + 1} stars."
        )
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))
    return texts


def _comparable(document: Any) -> list[dict[str, Any]]:
    steps = document.model_dump(mode="json")["steps"]
    for step in steps:
        for attempt in step["attempts"]:
            for timing in ("started_at", "generation_seconds", "critique_seconds", "reused"):
                attempt.pop(timing, None)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each prompt's document when the prompts run one at a time, keyed by the prompt's text."""
    folder = tmp_path_factory.mktemp("reference")
    texts = _write_prompts(folder / "prompts.jsonl", "ref-")
    report = asyncio.run(
        arun_batch(folder / "prompts.jsonl", profile="test", concurrency=1,
                   options=RunOptions(width=SIZE, height=SIZE),
                   run_dir=folder / "runs", checkpointer="memory://load-reference")
    )
    assert report.failed == 0 and not report.bad_lines

    async def documents() -> dict[str, list[dict[str, Any]]]:
        return {
            text: _comparable(await aload_document(thread_id_for(prompt_id), run_dir=folder / "runs",
                                                   checkpointer="memory://load-reference"))
            for prompt_id, text in texts.items()
        }

    return asyncio.run(documents())


def _backend_url(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'runs' / 'checkpoints.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.parametrize("backend", checkpointer_params("sqlite", "postgres"))
def test_100_concurrent_trajectories_lose_and_mix_nothing(
    tmp_path: Path, backend: str, reference: dict[str, list[dict[str, Any]]],
    request: pytest.FixtureRequest,
) -> None:
    checkpointer = _backend_url(backend, tmp_path, request)
    # Unique ids per test run: a PostgreSQL database outlives the test.
    prefix = f"load-{uuid.uuid4().hex[:8]}-"
    prompts = tmp_path / "prompts.jsonl"
    texts = _write_prompts(prompts, prefix)
    run_dir = tmp_path / "runs"
    command = [
        str(INTERLEAVE), "batch", str(prompts), "--profile", "test",
        "--concurrency", str(TRAJECTORIES), "--max-batch", "32", "--size", f"{SIZE}x{SIZE}",
        "--run-dir", str(run_dir), "--checkpointer", checkpointer,
    ]
    launched = subprocess.run([sys.executable, "-c", LAUNCHER, *command],
                              capture_output=True, text=True, timeout=600, check=True)
    figures = json.loads(launched.stdout)
    assert figures["rc"] == 0, figures["stderr"]
    peak_mib = figures["peak_rss_kib"] / 1024
    print(f"\nload[{backend}]: {TRAJECTORIES} concurrent trajectories at {SIZE}x{SIZE}: "
          f"{figures['seconds']:.1f} s wall, peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < MAX_PEAK_RSS_MIB

    manifest = run_dir / "batches" / "prompts" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(row["prompt_id"] for row in rows) == sorted(texts)
    assert {row["status"] for row in rows} == {"done"}

    async def check() -> None:
        listed = await alist_threads(run_dir=run_dir, checkpointer=checkpointer)
        mine = {s.thread_id: s.status for s in listed if s.thread_id.startswith(f"batch-{prefix}")}
        assert mine == {thread_id_for(prompt_id): "done" for prompt_id in texts}
        seen_images: dict[str, str] = {}
        for prompt_id, text in texts.items():
            thread = thread_id_for(prompt_id)
            document = await aload_document(thread, run_dir=run_dir, checkpointer=checkpointer)
            assert document.request.text == text
            # The same steps, prompts, seeds, verdicts and image hashes as when run alone.
            assert _comparable(document) == reference[text], f"{thread} differs from its solo run"
            for step in document.steps:
                for attempt in step.attempts:
                    owner = seen_images.setdefault(attempt.image.sha256, thread)
                    assert owner == thread, f"{thread} shows an image drawn for {owner}"

    started = time.perf_counter()
    asyncio.run(check())
    print(f"load[{backend}]: verified {TRAJECTORIES} documents in {time.perf_counter() - started:.1f} s")
