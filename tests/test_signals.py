"""Ctrl-C and SIGTERM on a real `interleave` process: the thread to resume (or the batch to rerun)
is named, the exit code is 128 + the signal, and the work survives; and a 25+ call test-profile
trajectory is run, killed and resumed from the command line.

The children start in a session of their own with SIGINT and SIGTERM at their default handling
and unblocked, so these tests do not depend on how the parent was started: a shell that starts
pytest in the background (``pytest &``) makes it ignore SIGINT, and an ignored signal stays
ignored in every child unless reset.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Long enough that the signal always arrives while a generator call is running.
SLOW = "30"


def _default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM as a terminal would deliver them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start(
    *args: str, run_dir: Path, delay: str = SLOW, call_log: Path | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "INTERLEAVE_RUN_DIR": str(run_dir), "INTERLEAVE_TEST_GENERATOR_DELAY": delay}
    if call_log is not None:
        env["INTERLEAVE_TEST_CALL_LOG"] = str(call_log)
    return subprocess.Popen(
        [sys.executable, "-m", "interleave_thinker", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_default_signals,
    )


class _Lines:
    """The child's stderr, line by line, read on a thread so that waiting can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stderr is not None
        stream = process.stderr

        def pump() -> None:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} on stderr: {self.seen}"
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"the process ended before {text!r}: {self.seen}"
            self.seen.append(line)

    def rest(self) -> list[str]:
        self._thread.join(timeout=60)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.seen.append(line)
        return self.seen


def _finish(process: subprocess.Popen[str]) -> str:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return stdout


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
)
def test_a_signal_names_the_thread_to_resume(tmp_path: Path, signum: int, code: int, said: str) -> None:
    run_dir = tmp_path / "runs"
    process = _start("run", "--profile", "test", "--size", "32x32", "A kite rises. A cat sleeps.",
                     run_dir=run_dir)
    lines = _Lines(process)
    lines.wait_for(": drawing")
    thread = next(line.split()[1] for line in lines.seen if line.startswith("thread "))
    assert thread.startswith("run-")
    process.send_signal(signum)
    process.wait(timeout=60)
    stderr = lines.rest()
    assert process.returncode == code, stderr
    assert not any("Traceback" in line for line in stderr), stderr
    assert stderr[-2:] == [
        f"error: {said}; finished work is saved",
        # The run directory ($INTERLEAVE_RUN_DIR here) is named: a later shell may not have it.
        f"hint: continue with `interleave resume {thread} --run-dir {run_dir}`",
    ]
    # The command it names continues the thread.
    assert Path(_finish(_start("resume", thread, run_dir=run_dir, delay="0")).splitlines()[-1]).is_file()


def test_a_signal_names_the_run_directory_it_was_given(tmp_path: Path) -> None:
    elsewhere = tmp_path / "my runs"
    process = _start("run", "--profile", "test", "--size", "32x32", "--run-dir", str(elsewhere),
                     "--thread", "kite", "A kite rises.", run_dir=tmp_path / "default")
    lines = _Lines(process)
    lines.wait_for(": drawing")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode == 130
    assert lines.rest()[-1] == f"hint: continue with `interleave resume kite --run-dir '{elsewhere}'`"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_batch_says_to_rerun_it(tmp_path: Path, signum: int) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "text": "A kite rises."}\n{"id": "b", "text": "A cat sleeps."}\n')
    run_dir = tmp_path / "runs"
    call_log = tmp_path / "calls.log"
    process = _start("batch", str(prompts), "--profile", "test", "--size", "32x32", run_dir=run_dir)
    leases = run_dir / "checkpoints.sqlite-leases"
    deadline = time.monotonic() + 60
    # A thread's lease is held while it runs: the batch is drawing (for SLOW seconds).
    while not (leases.is_dir() and any(leases.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == (
        f"hint: rerun the batch (`interleave batch {prompts}` with the same options): finished "
        "prompts are skipped and unfinished ones resume where they stopped"
    )
    _finish(_start("batch", str(prompts), "--profile", "test", "--size", "32x32", run_dir=run_dir,
                   delay="0", call_log=call_log))
    assert {json.loads(line)["thread"] for line in call_log.read_text().splitlines()} <= {
        "a", "b", *(p.name for p in (run_dir / "documents").iterdir())}


# A 20-sentence request: 20 steps, 7 of which the test critic rejects once, so 27 calls.
FLIP_BOOK = " ".join(f"Frame {n} of the flip book." for n in range(1, 21))


def _calls(log: Path) -> list[tuple[str, int, int, int]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [(c["thread"], c["step"], c["attempt"], c["seed"]) for c in map(json.loads, lines)]


def _recorded(run_dir: Path) -> int:
    """How many generator calls the ledger holds (staged, unfinished writes left out)."""
    return len(list((run_dir / "generations").glob("??/*.json")))


def test_a_long_test_profile_trajectory_is_killed_and_resumed(tmp_path: Path) -> None:
    run_dir, call_log = tmp_path / "runs", tmp_path / "calls.log"
    process = _start("run", "--profile", "test", "--size", "32x32", "--max-attempts", "3",
                     "--max-steps", "20", "--thread", "flip", FLIP_BOOK,
                     run_dir=run_dir, delay="0.2", call_log=call_log)
    deadline = time.monotonic() + 60
    # Killed while a call sleeps, after the last drawn image is in the ledger: a kill between a
    # draw and its record would rightly redraw that one image on resume.
    while len(_calls(call_log)) < 12 or _recorded(run_dir) < len(_calls(call_log)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _calls(call_log)
    # Steps are edits of the one before, so calls run one at a time, in the ledger's order: the
    # first `recorded` calls are in the ledger (normally all of them).
    recorded = _recorded(run_dir)
    assert 12 <= recorded <= len(before) < 25
    _finish(_start("resume", "flip", run_dir=run_dir, delay="0", call_log=call_log))
    calls = _calls(call_log)
    after = Counter(calls[len(before):])
    assert [call for call in before[:recorded] if after[call]] == []
    assert [call for call, count in after.items() if count > 1] == []
    report = json.loads(_finish(_start("show", "flip", "--json", run_dir=run_dir)))
    assert report["status"] == "done" and len(report["steps"]) == 20
    assert report["generator_calls"] == len(calls) - (len(before) - recorded) >= 25
