"""Kill ``interleave run`` with SIGKILL mid-trajectory, resume it, and compare with a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REQUEST = "A seed falls. Rain comes. A sprout rises. Leaves unfold. A bud forms. It blooms."
DELAY = 0.4
# The installed console script, as a user runs it.
INTERLEAVE = Path(sys.executable).with_name("interleave")


def _interleave(*args: str, run_dir: Path, call_log: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "INTERLEAVE_RUN_DIR": str(run_dir),
        "INTERLEAVE_TEST_CALL_LOG": str(call_log),
        "INTERLEAVE_TEST_GENERATOR_DELAY": str(DELAY),
    }
    return subprocess.Popen(
        [str(INTERLEAVE), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # SIGINT as a terminal delivers it, even when pytest runs in the background (ignoring it).
        start_new_session=True, preexec_fn=_default_signals,
    )


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _finish(process: subprocess.Popen[str]) -> str:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return stdout


def _calls(log: Path) -> list[tuple[str, int, int, int]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [(c["thread"], c["step"], c["attempt"], c["seed"]) for c in map(json.loads, lines)]


def _document(run_dir: Path, call_log: Path, thread: str) -> list[dict]:
    out = run_dir / f"{thread}.json"
    _finish(_interleave("export", thread, "--format", "json", "-o", str(out),
                        run_dir=run_dir, call_log=call_log))
    steps = json.loads(out.read_text())["document"]["steps"]
    for step in steps:
        for attempt in step["attempts"]:
            for timing in ("started_at", "generation_seconds", "critique_seconds", "reused"):
                attempt.pop(timing)
    return steps


@pytest.mark.parametrize("kill_after", [1, 4])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, kill_after: int) -> None:
    run_args = ("run", "--profile", "test", "--size", "96x96", "--thread", "story", REQUEST)

    clean_dir, clean_log = tmp_path / "clean", tmp_path / "clean.log"
    _finish(_interleave(*run_args, run_dir=clean_dir, call_log=clean_log))
    expected = _document(clean_dir, clean_log, "story")
    clean_calls = _calls(clean_log)
    assert len(clean_calls) > kill_after + 1

    crash_dir, crash_log = tmp_path / "crash", tmp_path / "crash.log"
    process = _interleave(*run_args, run_dir=crash_dir, call_log=crash_log)
    deadline = time.monotonic() + 60
    while len(_calls(crash_log)) < kill_after:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Half a generator delay later the process is inside the next call: k calls are finished.
    time.sleep(DELAY / 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(_calls(crash_log)) == kill_after

    stdout = _finish(_interleave("resume", "story", run_dir=crash_dir, call_log=crash_log))
    assert Path(stdout.strip().splitlines()[-1]).is_file()

    calls = _calls(crash_log)
    repeated = [call for call, count in Counter(calls).items() if count > 1]
    assert repeated == [], f"finished generator calls were repeated: {repeated}"
    assert sorted(calls) == sorted(clean_calls)
    assert _document(crash_dir, crash_log, "story") == expected
    # No half-written file is left in the image store.
    assert not [p for p in (crash_dir / "images").rglob("*") if p.name.startswith(".tmp-")]


def test_ctrl_c_says_how_to_resume_without_a_traceback(tmp_path: Path) -> None:
    after_calls = 2
    run_args = ("run", "--profile", "test", "--size", "96x96", "--thread", "story", REQUEST)
    run_dir, call_log = tmp_path / "runs", tmp_path / "calls.log"
    process = _interleave(*run_args, run_dir=run_dir, call_log=call_log)
    deadline = time.monotonic() + 60
    while len(_calls(call_log)) < after_calls:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    # Interrupted inside the next generator call, which LangGraph cancels while it still has
    # checkpoint writes of the step in flight.
    time.sleep(DELAY / 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "exception" not in stderr.lower(), stderr
    assert stderr.rstrip().splitlines()[-2:] == [
        "error: interrupted (Ctrl-C); finished work is saved",
        f"hint: continue with `interleave resume story --run-dir {run_dir}`",
    ]
    _finish(_interleave("resume", "story", run_dir=run_dir, call_log=call_log))
    calls = _calls(call_log)
    assert [call for call, count in Counter(calls).items() if count > 1] == []
