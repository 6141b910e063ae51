"""Fault injection: SIGKILL `interleave` at random and chosen points, resume, check nothing is lost.

What is killed where:

- ``test_random_kills_*``: at least 50 SIGKILLs per checkpointer (SQLite in the run directory,
  PostgreSQL), at seeded random points: by time (the real console script, killed during
  start-up or anywhere in the remaining work) and by event (a failpoint drawn among all of
  ``fault_entry.POINTS`` that a clean run reaches, with a random hit count). Each thread is
  killed again and again (run, resume, resume, ...: up to a random three to ten kills, fewer
  when a process finishes before its kill or the document is already composed), then resumed.
- ``test_failpoint_*``: one kill at each chosen point, then ``interleave resume``: inside a
  SQLite checkpoint write before COMMIT (``aput`` and ``aput_writes``), during COMMIT (timer),
  after it; inside a PostgreSQL checkpoint write between its statements and before the
  pipeline's Sync (the statements have run on the server, uncommitted); half-way through an
  image file, after its fsync and after its rename (stored, not yet in the ledger); half-way
  through a ledger record and after its rename (recorded, not yet in the checkpoint); half-way
  through the HTML document and after its fsync; and after compose, before its checkpoint.
- ``test_random_kills_on_the_tiny_real_backends``: the ``demo`` profile (tiny FLUX.2-klein and
  Qwen3-VL models): a run killed at a seeded random time after its plan, its resume killed at
  a random time after start-up, and a second resume that must finish with the clean document.

After each kill and each final resume the checks of ``fault_harness`` run (same document as an
uninterrupted run, no accepted step lost, no finished generator call repeated, no partial or
temp file, the thread can be shown and exported). The seed is ``INTERLEAVE_FAULT_SEED`` or a
fixed default; every assertion message names it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fault_harness import (
    Kill,
    Reference,
    Thread,
    census,
    check_finished,
    check_progress,
    check_store,
    clean_reference,
    comparable,
    export_json,
    fault_seed,
    kill_randomly,
    phase_at_kill,
    seeded,
)
from interleave_thinker.demo.models import DEMO_DIR_ENV, DEMO_REQUEST

pytestmark = pytest.mark.slow

KILLS_PER_BACKEND = 50


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run every killed thread must reproduce (the same on any checkpointer)."""
    root = tmp_path_factory.mktemp("fault-reference")
    return clean_reference(Thread(root, "reference", None))


@pytest.fixture
def pg_threads(postgres_url: str) -> Callable[[], str]:
    """Unique thread ids; postgres_url's schema is this test's own and dropped afterwards."""
    return lambda: f"fault-{uuid.uuid4().hex[:16]}"


def _random_kills(tmp_path: Path, reference: Reference, checkpointer: str | None,
                  new_id: Callable[[], str], backend: str) -> None:
    seed = fault_seed()
    rng = random.Random(f"{seed}:{backend}")
    with seeded(seed):
        # Which failpoints this checkpointer reaches, and how often; its document is checked too.
        counted = Thread(tmp_path / "census", new_id(), checkpointer)
        points = census(counted)
        assert comparable(export_json(counted)) == reference.document
        made = iter(range(1, 10_000))

        def make_thread() -> Thread:
            return Thread(tmp_path / f"t{next(made):03d}", new_id(), checkpointer)

        stats = kill_randomly(make_thread, reference, points, rng, target=KILLS_PER_BACKEND,
                              seed=seed)
        print(f"\n{backend}: {stats.summary()}")
        assert stats.kills >= KILLS_PER_BACKEND
        failpoints = {phase for phase in stats.by_phase if phase.startswith("failpoint ")}
        by_time = set(stats.by_phase) - failpoints
        # The kills must be spread out, not all in one place: several failpoints, and time
        # kills in several phases of the run.
        assert len(failpoints) >= 5, stats.summary()
        assert len(by_time) >= 3, stats.summary()


def test_random_kills_on_sqlite(tmp_path: Path, reference: Reference) -> None:
    ids = iter(range(1, 10_000))
    _random_kills(tmp_path, reference, None, lambda: f"fault-{next(ids)}", "sqlite")


def test_random_kills_on_postgres(tmp_path: Path, reference: Reference, postgres_url: str,
                                  pg_threads: Callable[[], str]) -> None:
    _random_kills(tmp_path, reference, postgres_url, pg_threads, "postgres")


def _kill_at_then_resume(thread: Thread, reference: Reference, point: str) -> None:
    seed = fault_seed()
    rng = random.Random(f"{seed}:{point}")
    with seeded(seed):
        delay = f"{rng.uniform(0, 0.002):.6f}"  # only read by commit-race
        process = thread.start(thread.command(started=False), failpoint=point,
                               INTERLEAVE_FAILPOINT_DELAY=delay)
        assert process.wait() == -signal.SIGKILL, (
            f"the run did not die at {point}: exit {process.popen.returncode}\n{process.stderr()}"
        )
        fired = thread.fired()
        assert [(f["point"], f["pid"]) for f in fired] == [
            (point.rpartition(":")[0], process.popen.pid)
        ]
        killed = thread.snapshot()
        # No partial file where the store keeps its images, even before anything is swept.
        check_store(thread.run_dir, f"right after the kill at {point}")
        thread.kills.append(Kill(f"failpoint {point}", phase_at_kill(process.stderr()), 0, killed))
        resumed = thread.start(thread.command(started=killed.exists))
        assert resumed.wait() == 0, resumed.stderr()
        check_progress(killed, thread.snapshot(), reference, f"after {point}")
        check_finished(thread, reference, f"killed at {point}")


SQLITE_FAILPOINTS = [
    "put-before-commit:5",  # the checkpoint INSERT ran, COMMIT did not
    "writes-before-commit:7",  # mid aput_writes: pending writes inserted, not committed
    "commit-race:9",  # a timer fires while COMMIT runs (or just after)
    "put-committed:11",  # committed, the graph has not gone on
    "image-half:4",  # half of an image's bytes in its temp file
    "image-synced:6",  # all bytes fsynced, not renamed
    "image-renamed:3",  # stored, not recorded in the ledger: may be drawn again
    "ledger-half:2",
    "ledger-renamed:8",  # recorded, not checkpointed: must be reused, not drawn again
    "exit-compose:1",  # the document is composed, its checkpoint not written
    "html-half:1",
    "html-synced:1",
]

POSTGRES_FAILPOINTS = [
    "put-between-statements:6",  # blobs sent and run, the checkpoint row never sent
    "put-before-commit:8",  # both statements ran on the server, no Sync: rolled back
    "writes-before-commit:5",
    "put-committed:12",
]


@pytest.mark.parametrize("point", SQLITE_FAILPOINTS)
def test_failpoint_on_sqlite(tmp_path: Path, reference: Reference, point: str) -> None:
    _kill_at_then_resume(Thread(tmp_path, "fault", None), reference, point)


@pytest.mark.parametrize("point", POSTGRES_FAILPOINTS)
def test_failpoint_on_postgres(tmp_path: Path, reference: Reference, postgres_url: str,
                               pg_threads: Callable[[], str], point: str) -> None:
    _kill_at_then_resume(Thread(tmp_path, pg_threads(), postgres_url), reference, point)


# -- the tiny real backends ------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny demo models built once, in a subprocess so this process never imports torch."""
    env = {DEMO_DIR_ENV: str(tmp_path_factory.mktemp("fault-demo-models"))}
    built = subprocess.run(
        [sys.executable, "-c",
         "from interleave_thinker.demo.models import ensure_demo_models; ensure_demo_models()"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return env


DEMO_KILLS = 2


def test_random_kills_on_the_tiny_real_backends(tmp_path: Path, demo_env: dict[str, str]) -> None:
    seed = fault_seed()
    rng = random.Random(f"{seed}:demo")
    with seeded(seed):
        clean = Thread(tmp_path / "clean", "demo-clean", None, profile="demo",
                       request=DEMO_REQUEST, extra_env=demo_env)
        reference = clean_reference(clean)
        # The models load lazily, on first use: the planner's before "planned", the generator's
        # and the critic's after it. Kills come at random times after the plan.
        drawing = reference.done_seconds - reference.planned_seconds
        kills = threads = 0
        while kills < DEMO_KILLS:
            threads += 1
            assert threads <= 4, f"only {kills} demo runs could be killed in {threads - 1} threads"
            thread = Thread(tmp_path / f"t{threads}", f"demo-{threads}", None, profile="demo",
                            request=DEMO_REQUEST, extra_env=demo_env)
            previous = thread.snapshot()
            # Kill the run, then kill its resume, then let a resume finish: two kills, each
            # followed by a resume, the last of which must end with the clean run's document.
            while True:
                process = thread.start(thread.command(started=previous.exists))
                if kills == DEMO_KILLS or previous.status == "done":
                    assert process.wait() == 0, process.stderr()
                    break
                # The first run is killed after its plan, a resume after its start-up.
                ready = process.wait_for("resuming " if previous.exists else "planned ")
                assert ready is not None, process.stderr()
                # The clean run loaded the models from a cold disk cache; later runs draw sooner.
                offset = rng.uniform(0.05, 0.7) * drawing
                if not process.kill_at(ready + offset):
                    assert process.wait() == 0, process.stderr()
                    break
                snapshot = thread.snapshot()
                # A kill after the document was composed only hit the exit: it does not count.
                kills += snapshot.status != "done"
                where = f"demo process {thread.processes} killed {offset:.2f}s after " + (
                    "start-up" if previous.exists else "planning")
                check_progress(previous, snapshot, reference, where)
                check_store(thread.run_dir, where)
                thread.kills.append(Kill(where, phase_at_kill(process.stderr()), 0, snapshot))
                print(f"\n{where} ({thread.kills[-1].phase})")
                previous = snapshot
            if thread.kills:
                kills_made = "; ".join(kill.how for kill in thread.kills)
                check_finished(thread, reference, f"demo thread {thread.thread} after {kills_made}")
