"""Model faults through whole runs: flaky, hung and misbehaving generators; broken planner and
critic replies. Each ends in a bounded number of retries or re-asks and then a clear error that
leaves the thread resumable, or in a correct result."""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.types import RetryPolicy
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator, ScriptedChatModel, scripted
from interleave_thinker.cli import app
from interleave_thinker.context import Backends, Timeouts
from interleave_thinker.errors import (
    ConfigurationError,
    GeneratorError,
    InterleaveError,
    ModelOutputError,
    ModelTimeoutError,
    TransientGeneratorError,
    TransientModelError,
)
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.graph import build_graph
from interleave_thinker.inspect import alist_threads
from interleave_thinker.nodes import retrying
from interleave_thinker.runner import aresume, arun
from interleave_thinker.settings import load_model_settings
from interleave_thinker.state import Budget, RunOptions
from test_graph import plan_reply, step, verdict_reply

# ------------------------------------------------------------------------------------------------
# Helpers

# The real policy sleeps about 1 + 2 + 4 s; these tests keep its shape with tiny sleeps and
# three tries (test_the_graph_retries_with_the_documented_backoff checks the real one).
FAST_RETRY = RetryPolicy(
    max_attempts=3, initial_interval=0.01, backoff_factor=2.0, jitter=False,
    retry_on=retrying.is_transient,
)


# Taken before the fixture below swaps it.
PRODUCTION_RETRY = retrying.MODEL_RETRY


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "MODEL_RETRY", FAST_RETRY)


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    # SQLite: the failed runs must survive in a real checkpoint file to be resumed.
    return f"sqlite:///{tmp_path}/checkpoints.sqlite"




async def guarded(call: Awaitable[Any]) -> Any:
    """Await a run that must end by itself: if a timeout stops working, the test fails instead
    of hanging."""
    return await asyncio.wait_for(call, 30)


def always(reply: str) -> Callable[[list[BaseMessage]], str]:
    return lambda _: reply


YES = always(verdict_reply(True))
TWO_CHAINED = [step(1, "a lamp"), step(2, "the lamp, lit")]
# Independent steps: drawn together in one batched backend call.
TWO_TOGETHER = [step(1, "a cat", sources=[]), step(2, "a dog", sources=[])]


def small(**changes: Any) -> RunOptions:
    return RunOptions(width=64, height=64, max_steps=12).with_changes(**changes)


def ledger_records(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "generations").rglob("*.json") if ".incoming" not in p.parts]


def stored_images(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "images").rglob("*.*") if ".incoming" not in p.parts]


async def status_of(thread: str, run_dir: Path, ckpt: str) -> str:
    return {t.thread_id: t.status for t in await alist_threads(run_dir=run_dir, checkpointer=ckpt)}[
        thread
    ]


class FlakyGenerator(RecordingGenerator):
    """The test generator, failing the backend calls whose numbers (from 1) are in ``fail_on``."""

    identity = "flaky-generator"

    def __init__(self, error: Exception, fail_on: Callable[[int], bool]) -> None:
        super().__init__()
        self.error, self.fail_on = error, fail_on
        self.calls: list[float] = []

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.calls.append(time.monotonic())
        if self.fail_on(len(self.calls)):
            raise self.error
        return await super().agenerate(jobs)


class HangingGenerator(RecordingGenerator):
    """Hangs on its first ``hangs`` calls: on the event loop, or blocked in a worker thread."""

    identity = "hanging-generator"

    def __init__(self, hangs: int, *, in_thread: bool = False) -> None:
        super().__init__()
        self.hangs, self.in_thread = hangs, in_thread
        self.calls = 0
        self.cancelled = 0
        self.release = threading.Event()

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.calls += 1
        if self.calls <= self.hangs:
            try:
                if self.in_thread:
                    await asyncio.to_thread(self.release.wait)
                else:
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().agenerate(jobs)


class HangingChat(ScriptedChatModel):
    """A scripted chat model that never answers the calls ``hang_if`` picks."""

    hang_if: Callable[[list[BaseMessage]], bool] = lambda _: False
    hanging: int = 0
    cancelled: int = 0

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.hang_if(messages):
            self.calls.append(list(messages))
            self.hanging += 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return self._generate(messages, stop, run_manager, **kwargs)


def hanging_chat(reply: Callable[[list[BaseMessage]], str],
                 hang_if: Callable[[list[BaseMessage]], bool]) -> HangingChat:
    return HangingChat(reply=reply, calls=[], hang_if=hang_if)


def about_step(number: int) -> Callable[[list[BaseMessage]], bool]:
    """Whether a critic call judges step ``number`` (its instruction is 'show N')."""
    return lambda messages: any(f"instruction: show {number}\n" in m.text for m in messages)


class MisbehavingGenerator(RecordingGenerator):
    """Draws real images, then lets ``fault`` change what goes back (None: behaves)."""

    identity = "misbehaving-generator"

    def __init__(self, fault: Callable[[list[Any]], Any] | None) -> None:
        super().__init__()
        self.fault = fault
        self.calls = 0

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> Any:
        self.calls += 1
        images = await super().agenerate(jobs)
        return self.fault(list(images)) if self.fault else images


def png_bytes(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=fmt)
    return buffer.getvalue()


def backends(planner: Any, critic: Any, generator: Any = None) -> Backends:
    return Backends(planner=planner, critic=critic, generator=generator or RecordingGenerator())


async def clean_document(tmp_path: Path, steps: list[dict[str, Any]], generator: Any) -> Any:
    """The document of an undisturbed run of the same plan (same seeds, same generator)."""
    result = await arun("lamp", backends=backends(scripted([plan_reply(steps)]), scripted(YES),
                                                  generator),
                        options=small(), run_dir=tmp_path / "clean", checkpointer="memory://")
    return result.document


# ------------------------------------------------------------------------------------------------
# Generator: transient errors and the retry policy


def test_the_graph_retries_with_the_documented_backoff() -> None:
    policy = PRODUCTION_RETRY
    assert policy.max_attempts == 4
    assert policy.initial_interval == 1.0 and policy.backoff_factor == 2.0 and policy.jitter
    for transient in (TransientGeneratorError("busy"), TransientModelError("down"),
                      ModelTimeoutError("slow"), ConnectionResetError(), TimeoutError()):
        assert policy.retry_on(transient), transient
    for permanent in (GeneratorError("refused"), ModelOutputError("garbage"), ValueError("bad"),
                      ConfigurationError("setting"), RuntimeError("bug")):
        assert not policy.retry_on(permanent), permanent
    # Every model-calling node carries the policy in force when the graph is built (here the
    # fixture's); the review nodes (people, not models) have none.
    graph = build_graph()
    for name in ("planner", "generator", "critic"):
        assert graph.builder.nodes[name].retry_policy == retrying.MODEL_RETRY
    assert graph.builder.nodes["review_plan"].retry_policy is None


async def test_retries_back_off_exponentially(run_dir: Path, ckpt: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The same policy shape with measurable sleeps: 0.15 s, then 0.3 s, then 0.6 s.
    policy = RetryPolicy(max_attempts=4, initial_interval=0.15, backoff_factor=2.0, jitter=False,
                         retry_on=retrying.is_transient)
    monkeypatch.setattr(retrying, "MODEL_RETRY", policy)
    generator = FlakyGenerator(TransientGeneratorError("overloaded"), lambda n: n <= 3)
    await arun("lamp", backends=backends(scripted([plan_reply([step(1, "a lamp")])]), scripted(YES),
                                         generator),
               options=small(), run_dir=run_dir, checkpointer=ckpt)
    gaps = [later - earlier for earlier, later in zip(generator.calls[:-1], generator.calls[1:], strict=True)]
    assert len(gaps) == 3
    # Each wait is at least the doubling schedule (the node's own work adds a little).
    for gap, sleep in zip(gaps, [0.15, 0.3, 0.6], strict=True):
        assert gap >= sleep


async def test_transient_errors_twice_then_success_give_the_clean_runs_document(
    run_dir: Path, ckpt: str, tmp_path: Path
) -> None:
    generator = FlakyGenerator(TransientGeneratorError("server busy"), lambda n: n in (2, 3))
    planner = scripted([plan_reply(TWO_CHAINED)])
    critic = scripted(YES)
    result = await arun("lamp", backends=backends(planner, critic, generator), options=small(),
                        run_dir=run_dir, checkpointer=ckpt)
    # Call 1 drew step 1; calls 2 and 3 failed; call 4 drew step 2.
    assert len(generator.calls) == 4
    assert [job.step for job in generator.jobs] == [1, 2]
    assert len(planner.calls) == 1 and len(critic.calls) == 2
    clean = await clean_document(tmp_path, TWO_CHAINED, FlakyGenerator(RuntimeError(), lambda n: False))
    assert result.document.content_for_comparison() == clean.content_for_comparison()


@pytest.mark.parametrize(
    "error",
    [TransientGeneratorError("server busy"), ConnectionResetError("connection reset by peer")],
    ids=["transient-generator-error", "connection-error"],
)
async def test_transient_errors_forever_stop_clearly_and_resume_without_redrawing(
    error: Exception, run_dir: Path, ckpt: str, tmp_path: Path
) -> None:
    generator = FlakyGenerator(error, lambda n: n >= 2)
    planner, critic = scripted([plan_reply(TWO_CHAINED)]), scripted(YES)
    with pytest.raises(TransientGeneratorError) as caught:
        await arun("lamp", backends=backends(planner, critic, generator), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="flaky")
    # One good call, then the policy's three tries of the second batch.
    assert len(generator.calls) == 4
    message = str(caught.value)
    assert message.startswith("thread flaky: generator flaky-generator, step(s) 2 (try 3 of 3)")
    assert str(error) in message
    assert "interleave resume" in caught.value.hint
    assert await status_of("flaky", run_dir, ckpt) == "failed"

    generator.fail_on = lambda n: False
    result = await aresume("flaky", backends=backends(planner, critic, generator),
                           run_dir=run_dir, checkpointer=ckpt)
    # Step 1 was not drawn again, and each step was drawn exactly once.
    assert [job.step for job in generator.jobs] == [1, 2]
    assert len(planner.calls) == 1 and len(critic.calls) == 2
    clean = await clean_document(tmp_path, TWO_CHAINED, FlakyGenerator(RuntimeError(), lambda n: False))
    assert result.document.content_for_comparison() == clean.content_for_comparison()


async def test_a_backend_bug_is_a_permanent_error_naming_the_backend(run_dir: Path, ckpt: str) -> None:
    generator = FlakyGenerator(RuntimeError("CUDA error: an illegal memory access"), lambda n: n == 1)
    planner = scripted([plan_reply([step(1, "a lamp")])])
    with pytest.raises(GeneratorError) as caught:
        await arun("lamp", backends=backends(planner, scripted(YES), generator), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="bug")
    assert len(generator.calls) == 1  # not retried
    assert str(caught.value) == ("thread bug: generator flaky-generator, step(s) 1: the backend failed: "
                                 "RuntimeError: CUDA error: an illegal memory access")
    assert isinstance(caught.value.__cause__, RuntimeError)
    result = await aresume("bug", backends=backends(planner, scripted(YES), generator),
                           run_dir=run_dir, checkpointer=ckpt)
    assert result.document.steps[0].status == "accepted"


# ------------------------------------------------------------------------------------------------
# Timeouts


@pytest.mark.parametrize("in_thread", [False, True], ids=["on-the-loop", "in-a-worker-thread"])
async def test_a_hung_generator_times_out_is_retried_then_stops_resumably(
    in_thread: bool, run_dir: Path, ckpt: str
) -> None:
    generator = HangingGenerator(hangs=99, in_thread=in_thread)
    planner, critic = scripted([plan_reply(TWO_CHAINED)]), scripted(YES)
    started = time.monotonic()
    try:
        with pytest.raises(ModelTimeoutError) as caught:
            await guarded(arun("lamp", backends=backends(planner, critic, generator), options=small(),
                       run_dir=run_dir, checkpointer=ckpt, thread_id="hung",
                       timeouts=Timeouts(generator=0.2)))
    finally:
        generator.release.set()
    assert time.monotonic() - started < 10
    assert generator.calls == 3
    if not in_thread:
        # The hung calls were cancelled, not left running beside their retries.
        assert generator.cancelled == 3
    assert str(caught.value) == (
        "thread hung: generator hanging-generator, step(s) 1: no images after 0.2 s (try 3 of 3)"
    )
    assert "--generator-timeout" in caught.value.hint and "interleave resume hung" in caught.value.hint
    assert ledger_records(run_dir) == []

    # Timeouts are not part of the thread's settings: the resume gives the backend more time.
    generator.hangs = 0
    result = await aresume("hung", backends=backends(planner, critic, generator),
                           run_dir=run_dir, checkpointer=ckpt, timeouts=Timeouts(generator=30))
    assert [s.status for s in result.document.steps] == ["accepted", "accepted"]
    assert len(planner.calls) == 1


async def test_a_generator_slow_once_is_retried_to_success(run_dir: Path, ckpt: str) -> None:
    generator = HangingGenerator(hangs=1)
    result = await guarded(arun("lamp", backends=backends(scripted([plan_reply([step(1, "a lamp")])]),
                                                  scripted(YES), generator),
                        options=small(), run_dir=run_dir, checkpointer=ckpt,
                        timeouts=Timeouts(generator=0.2)))
    assert generator.calls == 2 and generator.cancelled == 1
    assert result.document.steps[0].status == "accepted"


async def test_a_hung_planner_times_out_then_resumes(run_dir: Path, ckpt: str) -> None:
    planner = hanging_chat(always(plan_reply([step(1, "a lamp")])), hang_if=lambda _: True)
    with pytest.raises(ModelTimeoutError) as caught:
        await guarded(arun("lamp", backends=backends(planner, scripted(YES)), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="slow-plan",
                   timeouts=Timeouts(model=0.2)))
    assert len(planner.calls) == 3 and planner.cancelled == 3
    assert str(caught.value) == (
        "thread slow-plan, planning: planner scripted did not reply within 0.2 s (try 3 of 3)"
    )
    assert "--model-timeout" in caught.value.hint
    planner.hang_if = lambda _: False
    result = await aresume("slow-plan", backends=backends(planner, scripted(YES)),
                           run_dir=run_dir, checkpointer=ckpt)
    assert result.document.steps[0].status == "accepted"


async def test_a_hung_critic_times_out_and_the_resume_keeps_the_drawn_image(
    run_dir: Path, ckpt: str
) -> None:
    generator = RecordingGenerator()
    planner = scripted([plan_reply(TWO_CHAINED)])
    critic = hanging_chat(YES, hang_if=about_step(2))
    with pytest.raises(ModelTimeoutError) as caught:
        await guarded(arun("lamp", backends=backends(planner, critic, generator), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="slow-critic",
                   timeouts=Timeouts(model=0.2)))
    assert str(caught.value) == ("thread slow-critic, step 2, attempt 1: critic scripted did not "
                                 "reply within 0.2 s (try 3 of 3)")
    assert critic.cancelled == 3 and len(critic.calls) == 1 + 3
    assert [job.step for job in generator.jobs] == [1, 2]
    fixed = backends(planner, scripted(YES), generator)
    result = await aresume("slow-critic", backends=fixed, run_dir=run_dir, checkpointer=ckpt)
    # Nothing was drawn again (step 2's image came from the checkpoint) and step 1 was not
    # judged again.
    assert [job.step for job in generator.jobs] == [1, 2]
    assert len(fixed.critic.calls) == 1  # type: ignore[attr-defined]
    assert [s.status for s in result.document.steps] == ["accepted", "accepted"]


async def test_a_failing_verdict_cancels_the_other_critic_calls(run_dir: Path, ckpt: str) -> None:
    # Two steps judged concurrently: step 1's critic hangs, step 2's prints garbage (once the
    # other call is surely hanging).
    class GarbageAfterTheHang(HangingChat):
        async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
            if not self.hang_if(messages):
                async with asyncio.timeout(5):
                    while not self.hanging:
                        await asyncio.sleep(0.01)
            return await super()._agenerate(messages, *args, **kwargs)

    critic = GarbageAfterTheHang(reply=always("no idea"), calls=[], hang_if=about_step(1))
    planner = scripted([plan_reply(TWO_TOGETHER)])
    with pytest.raises(ModelOutputError):
        await guarded(arun("pets", backends=backends(planner, critic), options=small(max_reasks=0),
                   run_dir=run_dir, checkpointer=ckpt, timeouts=Timeouts(model=60)))
    assert critic.cancelled == 1 and len(critic.calls) == 2


def test_timeouts_are_validated_and_chosen_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Timeouts() == Timeouts(generator=900.0, model=600.0)
    assert Timeouts(generator=None, model=None).generator is None
    for bad in (0, -1, math.inf, math.nan, True, "10"):
        with pytest.raises(ConfigurationError, match="timeout must be a positive number"):
            Timeouts(generator=bad)  # type: ignore[arg-type]
    monkeypatch.setenv("INTERLEAVE_GENERATOR_TIMEOUT", "42")
    settings = load_model_settings(None, model_timeout=7.5)
    assert Timeouts.chosen(None, settings) == Timeouts(generator=42.0, model=7.5)
    assert Timeouts.chosen(Timeouts(generator=1), settings) == Timeouts(generator=1)
    assert Timeouts.chosen(None, None) == Timeouts()
    monkeypatch.setenv("INTERLEAVE_MODEL_TIMEOUT", "0")
    with pytest.raises(ConfigurationError, match="model_timeout"):
        load_model_settings(None)


def test_cli_timeout_flags_stop_a_slow_generator_and_resume_may_change_them(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path
) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("INTERLEAVE_TEST_GENERATOR_DELAY", "30")
    cli = CliRunner()
    failed = cli.invoke(app, ["run", "--profile", "test", "--size", "64x64", "--thread", "slow",
                              "--generator-timeout", "0.2", "A kite rises."])
    assert failed.exit_code == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert errors[0] == (
        "error: thread slow: generator test-generator, step(s) 1: no images after 0.2 s (try 3 of 3)"
    )
    assert "--generator-timeout" in errors[1]
    monkeypatch.setenv("INTERLEAVE_TEST_GENERATOR_DELAY", "0.3")
    done = cli.invoke(app, ["resume", "slow", "--generator-timeout", "20", "--model-timeout", "20"])
    assert done.exit_code == 0, done.stderr
    assert "done: thread slow" in done.stderr


# ------------------------------------------------------------------------------------------------
# Wrong-size, undecodable and missing generator output


def _replace_second(value: Any) -> Callable[[list[Any]], list[Any]]:
    return lambda images: [images[0], value]


GENERATOR_FAULTS = {
    "wrong size (PIL)": (_replace_second(Image.new("RGB", (32, 32))),
                         "the image of step 2 is 32x32, but 64x64 was requested"),
    "wrong size (PNG bytes)": (_replace_second(png_bytes((64, 32))),
                               "the image of step 2 is 64x32, but 64x64 was requested"),
    "undecodable bytes": (_replace_second(b"definitely not an image"),
                          "the image of step 2 could not be decoded"),
    "truncated PNG": (_replace_second(png_bytes((64, 64))[:60]),
                      "the image of step 2 could not be decoded"),
    "GIF bytes": (_replace_second(png_bytes((64, 64), "GIF")),
                  "the image of step 2 is GIF, not PNG, JPEG or WebP"),
    "a string": (_replace_second("a picture of a dog"), "the image of step 2 is a str, not an image"),
    "None in the list": (_replace_second(None), "the image of step 2 is a NoneType, not an image"),
    "None instead of a list": (lambda images: None,
                               "the backend returned NoneType, not a list of images"),
    "a dict instead of a list": (lambda images: {"images": images},
                                 "the backend returned dict, not a list of images"),
    "too few images": (lambda images: images[:1], "the backend returned 1 images for 2 requests"),
    "too many images": (lambda images: images * 2, "the backend returned 4 images for 2 requests"),
}


@pytest.mark.parametrize("fault", GENERATOR_FAULTS, ids=list(GENERATOR_FAULTS))
async def test_bad_generator_output_is_refused_whole_and_the_thread_resumes(
    fault: str, run_dir: Path, ckpt: str
) -> None:
    change, words = GENERATOR_FAULTS[fault]
    generator = MisbehavingGenerator(change)
    planner, critic = scripted([plan_reply(TWO_TOGETHER)]), scripted(YES)
    with pytest.raises(GeneratorError) as caught:
        await arun("pets", backends=backends(planner, critic, generator), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="bad-output")
    assert str(caught.value).startswith(
        f"thread bad-output: generator misbehaving-generator, step(s) 1, 2: {words}"
    )
    assert "nothing of this batch was kept" in caught.value.hint
    # Permanent: not retried; and not even the good image of the batch was kept.
    assert generator.calls == 1
    assert ledger_records(run_dir) == [] and stored_images(run_dir) == []
    assert await status_of("bad-output", run_dir, ckpt) == "failed"

    generator.fault = None
    result = await aresume("bad-output", backends=backends(planner, critic, generator),
                           run_dir=run_dir, checkpointer=ckpt)
    assert generator.calls == 2 and len(planner.calls) == 1
    assert [s.status for s in result.document.steps] == ["accepted", "accepted"]
    assert all(s.image is not None and (s.image.width, s.image.height) == (64, 64)
               for s in result.document.steps)


async def test_encoded_bytes_of_the_right_size_are_kept_as_they_are(run_dir: Path, ckpt: str) -> None:
    jpeg = png_bytes((64, 64), "JPEG")
    generator = MisbehavingGenerator(lambda images: [jpeg for _ in images])
    result = await arun("pets", backends=backends(scripted([plan_reply(TWO_TOGETHER)]),
                                                  scripted(YES), generator),
                        options=small(), run_dir=run_dir, checkpointer=ckpt)
    assert {s.image.media_type for s in result.document.steps if s.image} == {"image/jpeg"}
    assert len(ledger_records(run_dir)) == 2


# ------------------------------------------------------------------------------------------------
# Planner faults

MB = 1024 * 1024
# Compact steps, so that the reply stays under the 1,000,000-character reading limit.
TEN_THOUSAND = [{"step_number": n, "instruction": "go", "prompt": "p"} for n in range(1, 10_001)]
PLANNER_FAULTS: dict[str, tuple[str, str]] = {
    "garbage": ("no plan today, sorry", "no dict found"),
    "truncated": ("<think>ok</think><answer>{'execution_plan': [{'step_number': 1, 'instruction': 'a",
                  "the reply was probably truncated"),
    "1 MB": ("x" * MB, "the reply is 1,048,576 characters long; at most 1,000,000 are read"),
    "5 MB": ("{'a': '" + "y" * (5 * MB), "the reply is 5,242,887 characters long"),
    "steps as a string": ("<answer>{'execution_plan': 'draw a cat, then a dog'}</answer>",
                          "'execution_plan' must be a list of step dicts, not a str"),
    "step number as a list": (plan_reply([{**step(1, "a cat"), "step_number": [1]}]),
                              "step 1 of the plan has step_number [1]; expected a whole number"),
    "steps as numbers": ("<answer>{'execution_plan': [1, 2]}</answer>",
                         "step 1 of the plan is a int, not a dict"),
    "prompt as a dict": (plan_reply([step(1, {"text": "a cat"})]),  # type: ignore[arg-type]
                         "step 1: 'prompt' must be text, not a dict"),
    "empty plan": (plan_reply([]), "the plan is empty"),
    "10,000 steps": (plan_reply(TEN_THOUSAND),
                     "the plan has 10,000 steps; at most 12 are allowed (the max_steps setting)"),
    "absurd step number": (plan_reply([{**step(1, "a"), "step_number": 10**30}]),
                           "expected a number from 1 to 1000000"),
    "source in the future": (plan_reply([step(1, "a", sources=[2]), step(2, "b")]),
                             "step 1 names source 2, but no earlier step 2 draws an image"),
    "source is itself": (plan_reply([step(1, "a"), step(2, "b", sources=["step:2"])]),
                         "step 2 names source 'step:2', but no earlier step 2 draws an image"),
    "sources in a cycle": (plan_reply([step(1, "a", sources=[2]), step(2, "b", sources=[1])]),
                           "step 1 names source 2, but no earlier step 2"),
    "input image that was not given": (plan_reply([step(1, "a", sources=["input:1"])]),
                                       "there is no input image 1 (input images: none were given)"),
    "step with nothing to show": (plan_reply([step(1, None, instruction="")]),
                                  "step 1 has neither an instruction, a prompt nor an auxiliary_text"),
    "enormous prompt": (plan_reply([step(1, "z" * 30_000)]),
                        "step 1: 'prompt' is 30,000 characters long; at most 20,000 are allowed"),
    "deep nesting": ("<answer>{'execution_plan': " + "[" * 5000 + "]" * 5000 + "}</answer>",
                     "too many nested parentheses"),
    "empty string": ("", "no dict found"),
    "only a think block": ("<think>A kite story in three steps.</think>",
                           "the reply stops after its reasoning"),
    "cut off while thinking": ("<think>Draft: {'execution_plan': [{'step_number': 1, 'instruction': "
                               "'a', 'prompt': 'a'}]} but maybe I should also",
                               "the reply ends inside its <think> block"),
    "a list of steps without the key": ("<answer>[{'step_number': 1}]</answer>",
                                         "the answer has no 'execution_plan' key (found keys: "
                                         "'step_number')"),
}


@pytest.mark.parametrize("fault", PLANNER_FAULTS, ids=list(PLANNER_FAULTS))
async def test_planner_faults_are_reasked_a_bounded_number_of_times_then_stop_clearly(
    fault: str, run_dir: Path, ckpt: str
) -> None:
    reply, words = PLANNER_FAULTS[fault]
    planner = scripted(always(reply))
    started = time.monotonic()
    with pytest.raises(ModelOutputError) as caught:
        await arun("pets", backends=backends(planner, scripted(YES)), options=small(max_reasks=2),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="bad-plan")
    assert time.monotonic() - started < 20
    assert len(planner.calls) == 3
    message = str(caught.value)
    assert message.startswith("thread bad-plan, planning: the plan could not be read after 3 tries: ")
    assert words in message
    assert len(message) < 600
    # The re-asks quote the reply back, but an enormous one only by its two ends.
    assert sum(len(m.text) for m in planner.calls[-1]) < 40_000
    assert "could not be read as a plan" in planner.calls[-1][-1].text

    # Resumable: a planner that answers properly finishes the same thread.
    planner.reply = always(plan_reply([step(1, "a cat")]))
    result = await aresume("bad-plan", backends=backends(planner, scripted(YES)),
                           run_dir=run_dir, checkpointer=ckpt)
    assert [s.status for s in result.document.steps] == ["accepted"]


async def test_a_planner_that_recovers_within_its_reasks_gives_the_right_plan(
    run_dir: Path, ckpt: str
) -> None:
    good = plan_reply([step(1, "a cat"), step(4, "a dog"), step(9, "a bird")])
    planner = scripted(["gibberish", "x" * (5 * MB), plan_reply(TEN_THOUSAND), good])
    result = await arun("pets", backends=backends(planner, scripted(YES)), options=small(max_reasks=3),
                        run_dir=run_dir, checkpointer=ckpt)
    assert len(planner.calls) == 4
    # Gaps in the numbering are kept as the planner wrote them.
    assert [s.number for s in result.document.steps] == [1, 4, 9]
    reasks = [m.text for m in planner.calls[-1] if "could not be read as a plan" in m.text]
    assert len(reasks) == 3 and "at most 12 are allowed" in reasks[2]


async def test_lone_surrogates_in_a_plan_are_replaced_and_the_run_completes(
    run_dir: Path, ckpt: str
) -> None:
    # Escapes in a Python-style dict give strings with UTF-16 surrogates, which UTF-8 cannot
    # encode: a lone one becomes U+FFFD, and a split pair is joined again (not two U+FFFD).
    reply = ("<answer>{'execution_plan': [{'step_number': 1, 'step_name': 'bad \\ud800 name', "
             "'instruction': 'show \\udfff it', 'prompt': 'a cat \\ud83d\\ude00 \\ud800', "
             "'auxiliary_text': None}]}</answer>")
    critic = scripted(always('<think>fine \ud800</think><answer>{"previous_step_success": true, '
                             '"refine_prompt": "more \\ud83d\\ude00"}</answer>'))
    result = await arun("cat", backends=backends(scripted([reply]), critic), options=small(),
                        run_dir=run_dir, checkpointer=ckpt)
    (only,) = result.document.steps
    assert only.name == "bad \ufffd name" and only.instruction == "show \ufffd it"
    assert only.attempts[0].prompt == "a cat \U0001f600 \ufffd"
    assert only.attempts[0].critique is not None
    assert only.attempts[0].critique.reasoning == "fine \ufffd"
    assert "\ufffd" in result.document_path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Critic faults

CRITIC_FAULTS: dict[str, tuple[str, str]] = {
    "garbage": ("looks fine to me", "no dict found"),
    "truncated": ("<think>ok</think><answer>{'previous_step_success': Tr", "probably truncated"),
    "1 MB": ("z" * MB, "the reply is 1,048,576 characters long"),
    "5 MB": ("z" * (5 * MB), "the reply is 5,242,880 characters long"),
    "verdict as a number": ("<answer>{'previous_step_success': 5}</answer>",
                            "'previous_step_success' is 5; expected true or false"),
    "verdict as a fraction": ("<answer>{'previous_step_success': 0.5}</answer>",
                              "'previous_step_success' is 0.5"),
    "verdict as a list": ("<answer>{'previous_step_success': [True]}</answer>",
                          "'previous_step_success' is [True]"),
    "verdict as an enormous string": ("<answer>{'previous_step_success': '" + "q" * 100_000 + "'}</answer>",
                                      "'previous_step_success' is 'qqqq"),
    "refine prompt as a number": ("<answer>{'previous_step_success': False, 'refine_prompt': 7}</answer>",
                                  "'refine_prompt' must be text or null, not a int"),
    "refine prompt enormous": ("<answer>{'previous_step_success': False, 'refine_prompt': '"
                               + "r" * 30_000 + "'}</answer>",
                               "'refine_prompt' is 30,000 characters long"),
    "missing verdict": ("<answer>{'success': True}</answer>",
                        "the answer has no 'previous_step_success' key (found keys: 'success')"),
    "empty string": ("", "no dict found"),
    "only a think block": ("<think>The lamp looks right.</think>", "stops after its reasoning"),
    "cut off while thinking": ("<think>{'previous_step_success': True} hmm, but the colour",
                               "ends inside its <think> block"),
}


@pytest.mark.parametrize("fault", CRITIC_FAULTS, ids=list(CRITIC_FAULTS))
async def test_critic_faults_stop_clearly_and_keep_what_was_accepted(
    fault: str, run_dir: Path, ckpt: str
) -> None:
    reply, words = CRITIC_FAULTS[fault]
    generator = RecordingGenerator()
    planner = scripted([plan_reply(TWO_CHAINED)])
    # Step 1 is accepted; every verdict on step 2 is broken.
    critic = scripted(lambda messages: verdict_reply(True) if about_step(1)(messages) else reply)
    with pytest.raises(ModelOutputError) as caught:
        await arun("lamp", backends=backends(planner, critic, generator),
                   options=small(max_reasks=2), run_dir=run_dir, checkpointer=ckpt,
                   thread_id="bad-verdict")
    message = str(caught.value)
    assert message.startswith(
        "thread bad-verdict, step 2, attempt 1: the verdict could not be read after 3 tries: "
    )
    assert words in message and len(message) < 600
    assert len(critic.calls) == 1 + 3
    assert sum(len(m.text) for m in critic.calls[-1]) < 40_000

    fixed = backends(planner, scripted(YES), generator)
    result = await aresume("bad-verdict", backends=fixed, run_dir=run_dir, checkpointer=ckpt)
    # Nothing accepted or drawn before the error is lost or paid for again.
    assert [job.step for job in generator.jobs] == [1, 2]
    assert [s.status for s in result.document.steps] == ["accepted", "accepted"]
    assert len(fixed.critic.calls) == 1  # type: ignore[attr-defined]


async def test_the_critic_is_never_asked_about_a_text_only_step(run_dir: Path, ckpt: str) -> None:
    critic = scripted(YES)  # would say yes to anything
    planner = scripted([plan_reply([step(1, "a lamp"), step(2, None, auxiliary_text="Why?"),
                                    step(3, "the lamp, lit")])])
    generator = RecordingGenerator()
    result = await arun("lamp", backends=backends(planner, critic, generator), options=small(),
                        run_dir=run_dir, checkpointer=ckpt)
    assert [s.status for s in result.document.steps] == ["accepted", "text", "accepted"]
    assert result.document.steps[1].image is None and result.document.steps[1].attempts == ()
    assert len(critic.calls) == 2 and sorted(job.step for job in generator.jobs) == [1, 3]


@pytest.mark.parametrize("bad_score", [42, -1, 1e308, "9"], ids=["42", "-1", "1e308", "a-string"])
async def test_an_out_of_range_critic_score_is_dropped_not_trusted(
    bad_score: Any, run_dir: Path, ckpt: str
) -> None:
    # Two rejected attempts: the first scored 3, the second out of range. 'best' must keep the
    # first: had the bad score been read (or clamped to 10), it would keep the second.
    replies = [verdict_reply(False, "a lamp, brighter", score=3),
               f"<answer>{{'previous_step_success': False, 'refine_prompt': None, "
               f"'score': {bad_score!r}}}</answer>"]
    options = small().model_copy(update={"budget": Budget(max_attempts=2, selection="best")})
    result = await arun("lamp", backends=backends(scripted([plan_reply([step(1, "a lamp")])]),
                                                  scripted(replies)),
                        options=options, run_dir=run_dir, checkpointer=ckpt)
    (only,) = result.document.steps
    assert only.status == "forced"
    assert [a.critique.score for a in only.attempts if a.critique] == [3.0, None]
    assert only.image == only.attempts[0].image


async def test_a_model_that_cannot_be_reached_is_retried_then_named(run_dir: Path, ckpt: str) -> None:
    class Unreachable(ScriptedChatModel):
        async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                             run_manager: Any = None, **kwargs: Any) -> ChatResult:
            self.calls.append(list(messages))
            if len(self.calls) <= 3:
                raise ConnectionRefusedError("[Errno 111] Connection refused")
            return ChatResult(generations=[ChatGeneration(message=AIMessage(self.reply(messages)))])

    planner = Unreachable(reply=always(plan_reply([step(1, "a lamp")])), calls=[])
    with pytest.raises(TransientModelError) as caught:
        await arun("lamp", backends=backends(planner, scripted(YES)), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="down")
    assert len(planner.calls) == 3
    assert str(caught.value) == ("thread down, planning: planner scripted could not be reached "
                                 "(try 3 of 3): ConnectionRefusedError: [Errno 111] Connection refused")
    assert isinstance(caught.value, InterleaveError)
    result = await aresume("down", backends=backends(planner, scripted(YES)), run_dir=run_dir,
                           checkpointer=ckpt)
    assert result.document.steps[0].status == "accepted"


async def test_a_models_own_output_check_failing_is_a_named_permanent_error(
    run_dir: Path, ckpt: str
) -> None:
    # The in-process model raises this when a constrained JSON reply hits its token limit:
    # asking again would hit the same limit.
    class CutOff(ScriptedChatModel):
        async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                             run_manager: Any = None, **kwargs: Any) -> ChatResult:
            self.calls.append(list(messages))
            raise OutputParserException("the JSON reply was cut off after 2048 tokens")

    planner = CutOff(reply=always(""), calls=[])
    with pytest.raises(ModelOutputError) as caught:
        await arun("lamp", backends=backends(planner, scripted(YES)), options=small(),
                   run_dir=run_dir, checkpointer=ckpt, thread_id="cut")
    assert len(planner.calls) == 1
    assert str(caught.value).startswith("thread cut, planning: planner scripted: the JSON reply "
                                        "was cut off after 2048 tokens")
