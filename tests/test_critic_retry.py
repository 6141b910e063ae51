"""The critic never pays twice: a verdict is recorded as it arrives, so a critic node that runs
again (retried after a transient failure, or resumed after a crash) asks only about the attempts
still without one."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.types import RetryPolicy
from pydantic import Field

from conftest import RecordingGenerator, ScriptedChatModel
from interleave_thinker.context import Backends
from interleave_thinker.errors import ModelCallError
from interleave_thinker.nodes import critic as critic_node
from interleave_thinker.nodes import retrying
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions
from interleave_thinker.storage.verdicts import VerdictLedger, verdict_key
from test_graph import plan_reply, step, verdict_reply

FAST_RETRY = RetryPolicy(
    max_attempts=3, initial_interval=0.01, backoff_factor=2.0, jitter=False,
    retry_on=retrying.is_transient,
)
THREE_TOGETHER = [step(n, f"picture {n}", sources=[]) for n in (1, 2, 3)]
_STEP = re.compile(r"instruction: show (\d+)\n")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "MODEL_RETRY", FAST_RETRY)


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/checkpoints.sqlite"


def step_of(messages: list[BaseMessage]) -> int:
    found = {int(m) for message in messages for m in _STEP.findall(message.text)}
    assert len(found) == 1, found
    return found.pop()


class CountingCritic(ScriptedChatModel):
    """Says yes to everything; counts its calls per step and fails the calls ``failing`` names.

    ``failing`` maps a step to (error, how many of its calls fail). A failing call waits until
    ``wait_for_others`` other calls have answered (so their verdicts are in), or fails at once
    while the others are still thinking (``slow_others`` seconds each).
    """

    per_step: Counter[int] = Field(default_factory=Counter)
    failing: dict[int, tuple[Exception, int]] = Field(default_factory=dict)
    wait_for_others: int = 0
    slow_others: float = 0.0
    answered: int = 0
    # When set, "answered" means the verdict is recorded in this run directory, not only
    # returned: a permanent failure cancels the calls still in flight at once.
    run_dir: Path | None = None

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        number = step_of(messages)
        self.per_step[number] += 1
        self.calls.append(list(messages))
        error, times = self.failing.get(number, (None, 0))
        if error is not None and self.per_step[number] <= times:
            async with asyncio.timeout(5):
                while self._answered() < self.wait_for_others:
                    await asyncio.sleep(0.005)
            raise error
        await asyncio.sleep(self.slow_others)
        self.answered += 1
        return ChatResult(generations=[ChatGeneration(message=AIMessage(verdict_reply(True)))])


    def _answered(self) -> int:
        return self.answered if self.run_dir is None else len(verdict_files(self.run_dir))


def counting_critic(**fields: Any) -> CountingCritic:
    return CountingCritic(reply=lambda _: verdict_reply(True), calls=[], **fields)


def backends(critic: Any) -> Backends:
    return Backends(planner=ScriptedChatModel(reply=lambda _: plan_reply(THREE_TOGETHER), calls=[]),
                    critic=critic, generator=RecordingGenerator())


def small() -> RunOptions:
    return RunOptions(width=64, height=64)


def verdict_files(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "verdicts").rglob("*.json") if ".incoming" not in p.parts]


@pytest.mark.parametrize(
    ("wait_for_others", "slow_others"),
    [(2, 0.0), (0, 0.2)],
    ids=["fails-after-the-others-answered", "fails-while-the-others-think"],
)
async def test_a_transient_critic_failure_asks_again_only_about_its_own_attempt(
    run_dir: Path, ckpt: str, wait_for_others: int, slow_others: float
) -> None:
    # Three independent steps, judged concurrently in one critic pass; step 2's first call
    # loses its connection. The node is retried: only step 2 is asked again.
    critic = counting_critic(
        failing={2: (ConnectionResetError("connection reset by peer"), 1)},
        wait_for_others=wait_for_others,
        slow_others=slow_others,
    )
    result = await arun("three pictures", backends=backends(critic), options=small(),
                        run_dir=run_dir, checkpointer=ckpt, thread_id="flaky-critic")
    assert [s.status for s in result.document.steps] == ["accepted"] * 3
    assert critic.per_step == {1: 1, 2: 2, 3: 1}
    assert len(verdict_files(run_dir)) == 3


async def test_a_run_without_faults_asks_once_per_attempt_and_records_each_verdict(
    run_dir: Path, ckpt: str
) -> None:
    critic = counting_critic()
    result = await arun("three pictures", backends=backends(critic), options=small(),
                        run_dir=run_dir, checkpointer=ckpt, thread_id="calm")
    assert critic.per_step == {1: 1, 2: 1, 3: 1}
    assert all(s.attempts[0].critique and s.attempts[0].critique.success
               for s in result.document.steps)
    assert len(verdict_files(run_dir)) == 3


async def test_a_crash_after_the_verdicts_resumes_without_asking_again(
    run_dir: Path, ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every verdict of the pass is in and recorded, then the process fails before the
    # checkpoint is written: the resume reuses all three.
    real_emit = critic_node.emit

    def crash(runtime: Any, event: Any) -> None:
        raise RuntimeError("simulated crash after the verdicts")

    monkeypatch.setattr(critic_node, "emit", crash)
    first = counting_critic()
    with pytest.raises(RuntimeError, match="simulated crash"):
        await arun("three pictures", backends=backends(first), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="crashed")
    assert first.per_step == {1: 1, 2: 1, 3: 1}
    assert len(verdict_files(run_dir)) == 3
    monkeypatch.setattr(critic_node, "emit", real_emit)

    second = counting_critic()
    result = await aresume("crashed", backends=backends(second), run_dir=run_dir, checkpointer=ckpt)
    assert second.per_step == {}
    assert [s.status for s in result.document.steps] == ["accepted"] * 3
    assert all(s.attempts[0].critique and s.attempts[0].critique.reasoning == "judged"
               for s in result.document.steps)


async def test_a_permanent_failure_keeps_the_other_verdicts_for_the_resume(
    run_dir: Path, ckpt: str
) -> None:
    # Step 2's call fails for good (after the others answered): the run stops; the resume, with
    # the critic fixed, asks only about step 2.
    broken = counting_critic(
        failing={2: (ValueError("bad request"), 99)}, wait_for_others=2, run_dir=run_dir
    )
    with pytest.raises(ModelCallError):
        await arun("three pictures", backends=backends(broken), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="broken-critic")
    assert broken.per_step == {1: 1, 2: 1, 3: 1}

    fixed = counting_critic()
    result = await aresume("broken-critic", backends=backends(fixed), run_dir=run_dir,
                           checkpointer=ckpt)
    assert fixed.per_step == {2: 1}
    assert [s.status for s in result.document.steps] == ["accepted"] * 3


async def test_a_different_critic_is_asked_again(run_dir: Path, ckpt: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Recorded verdicts belong to the critic that gave them: another model identity (or another
    # thread) never reuses them.
    first = counting_critic()
    monkeypatch.setattr(critic_node, "emit", lambda *_: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        await arun("three pictures", backends=backends(first), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="one")
    monkeypatch.undo()
    monkeypatch.setattr(retrying, "MODEL_RETRY", FAST_RETRY)
    other = CountingCritic(reply=lambda _: verdict_reply(True), calls=[],
                           name_for_identity="another-critic")
    # A resume with another critic is refused by the thread's fingerprint; a new thread on the
    # same run directory must not see the first thread's verdicts either.
    await arun("three pictures", backends=backends(other), options=small(),
               run_dir=run_dir, checkpointer=ckpt, thread_id="two")
    assert other.per_step == {1: 1, 2: 1, 3: 1}


def test_verdict_keys_change_with_every_input(tmp_path: Path) -> None:
    fields: dict[str, Any] = {
        "thread": "t", "step": 1, "attempt": 1, "critic": "m", "output_mode": "tagged",
        "messages": [{"type": "human", "content": "x"}],
    }
    key = verdict_key(**fields)
    assert key == verdict_key(**dict(reversed(fields.items())))
    for name, other in [("thread", "u"), ("step", 2), ("attempt", 2), ("critic", "n"),
                        ("output_mode", "structured"), ("messages", [])]:
        assert verdict_key(**{**fields, name: other}) != key, name


def test_a_damaged_or_foreign_record_is_no_verdict(tmp_path: Path) -> None:
    from interleave_thinker.state import Critique

    ledger = VerdictLedger(tmp_path / "verdicts")
    key = verdict_key(thread="t", step=1, attempt=1)
    assert ledger.lookup(key) is None
    ledger.record(key, Critique(success=True, reasoning="fine"), seconds=1.5, thread_id="t",
                  step=1, attempt=1)
    found = ledger.lookup(key)
    assert found is not None and found.critique.reasoning == "fine" and found.seconds == 1.5
    assert found.thread_id == "t"
    path = next((tmp_path / "verdicts").rglob(f"{key}.json"))
    path.write_text("{not json")
    assert ledger.lookup(key) is None
    with pytest.raises(ValueError):
        ledger.lookup("../../etc/passwd")


async def test_gc_removes_the_verdicts_of_deleted_threads_only(run_dir: Path, ckpt: str) -> None:
    import os
    import time

    from interleave_thinker.checkpoints.savers import open_checkpointer
    from interleave_thinker.gc import acollect_garbage
    from interleave_thinker.storage.verdicts import parse_verdict_record

    for thread in ("kept", "gone"):
        await arun("three pictures", backends=backends(counting_critic()), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id=thread)
    async with open_checkpointer(ckpt) as saver:
        await saver.adelete_thread("gone")
    by_thread: dict[str | None, set[Path]] = {}
    for path in verdict_files(run_dir):
        by_thread.setdefault(parse_verdict_record(path.read_bytes()).thread_id, set()).add(path)
    assert {thread: len(paths) for thread, paths in by_thread.items()} == {"kept": 3, "gone": 3}

    # Young records are kept (a run may not have written its first checkpoint yet).
    young = await acollect_garbage(run_dir=run_dir, checkpointer=ckpt, delete=True)
    assert young.verdicts == 6 and young.orphan_verdicts == [] and len(young.young_verdicts) == 3
    assert set(verdict_files(run_dir)) == by_thread["kept"] | by_thread["gone"]

    old = time.time() - 2 * 3600
    for path in verdict_files(run_dir):
        os.utime(path, (old, old))
    dry = await acollect_garbage(run_dir=run_dir, checkpointer=ckpt)
    assert {item.path for item in dry.orphan_verdicts} == by_thread["gone"]
    assert dry.as_json()["would_remove"]["verdicts"] == sorted(str(p) for p in by_thread["gone"])
    assert "would remove 3 critic verdict records of deleted threads" in dry.summary()
    assert dry.unknown == []
    done = await acollect_garbage(run_dir=run_dir, checkpointer=ckpt, delete=True)
    assert {item.path for item in done.orphan_verdicts} == by_thread["gone"]
    assert set(verdict_files(run_dir)) == by_thread["kept"]
