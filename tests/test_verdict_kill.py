"""SIGKILL between the critic's verdict and the checkpoint: the resume reuses the recorded verdict.

The critic node returns (its verdicts recorded in the run directory's verdict ledger) and the
process is killed before LangGraph writes the node's checkpoint, with fault_entry.py's
``exit-critic`` failpoint. The resumed run must not ask the critic about that attempt again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REQUEST = "A seed falls. Rain comes. A sprout rises. Leaves unfold. A bud forms. It blooms."
ENTRY = Path(__file__).with_name("critic_log_entry.py")
RUN = ("run", "--profile", "test", "--size", "64x64", "--thread", "story", REQUEST)


def _interleave(*args: str, run_dir: Path, critic_log: Path, failpoint: str = "") -> int:
    env = {
        **os.environ,
        "INTERLEAVE_RUN_DIR": str(run_dir),
        "INTERLEAVE_TEST_CRITIC_LOG": str(critic_log),
        "INTERLEAVE_FAILPOINT": failpoint,
        "INTERLEAVE_FAILPOINT_FIRED": str(run_dir.parent / f"{run_dir.name}.fired"),
    }
    done = subprocess.run([sys.executable, str(ENTRY), *args], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


def _critic_calls(log: Path) -> list[tuple[int, str, str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [(c["pid"], c["planned"], c["used"]) for c in map(json.loads, lines)]


@pytest.mark.parametrize("kill_at", [1, 3])
def test_a_kill_after_the_verdict_does_not_ask_the_critic_again(tmp_path: Path, kill_at: int) -> None:
    clean_log = tmp_path / "clean.log"
    assert _interleave(*RUN, run_dir=tmp_path / "clean", critic_log=clean_log) == 0
    clean = Counter((planned, used) for _, planned, used in _critic_calls(clean_log))
    assert sum(clean.values()) > kill_at and max(clean.values()) == 1

    run_dir, log = tmp_path / "crash", tmp_path / "crash.log"
    assert _interleave(*RUN, run_dir=run_dir, critic_log=log,
                       failpoint=f"exit-critic:{kill_at}") == -signal.SIGKILL
    fired = json.loads((tmp_path / "crash.fired").read_text())
    assert fired["point"] == "exit-critic"
    before = _critic_calls(log)
    assert len(before) == kill_at
    assert len([p for p in (run_dir / "verdicts").rglob("*.json") if ".incoming" not in p.parts]) == kill_at

    assert _interleave("resume", "story", run_dir=run_dir, critic_log=log) == 0
    calls = Counter((planned, used) for _, planned, used in _critic_calls(log))
    repeated = [question for question, count in calls.items() if count > 1]
    assert repeated == [], f"the critic was asked again about: {repeated}"
    assert calls == clean
