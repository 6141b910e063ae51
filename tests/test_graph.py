"""The trajectory graph's logic: planning, batching, regeneration, budgets, selection, resume rules."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from PIL import Image

from conftest import RecordingGenerator, scripted
from interleave_thinker.context import Backends
from interleave_thinker.errors import (
    GeneratorError,
    ImageError,
    ModelOutputError,
    SettingsMismatchError,
    TransientGeneratorError,
    UnknownThreadError,
)
from interleave_thinker.inspect import aload_document
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.nodes.scheduling import derive_seed
from interleave_thinker.prompts.templates import prompts_from_messages
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import Budget, RunOptions
from interleave_thinker.storage.image_store import ImageStore

# Unique per test session: a PostgreSQL database outlives the tests that write to it.
RUN = uuid.uuid4().hex[:8]


@pytest.fixture
def ckpt(checkpointer_url: str) -> str:
    """Every graph test runs on the in-memory, SQLite and PostgreSQL checkpointers."""
    return checkpointer_url


def plan_reply(steps: list[dict[str, Any]]) -> str:
    return f"<think>plan</think><answer>{ {'execution_plan': steps}!r}</answer>"


def verdict_reply(success: bool, refine: str | None = None, score: float | None = None) -> str:
    answer: dict[str, Any] = {"previous_step_success": success, "refine_prompt": refine}
    if score is not None:
        answer["score"] = score
    return f"<think>judged</think><answer>{answer!r}</answer>"


def step(number: int, prompt: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "step_number": number,
        "step_name": f"step {number}",
        "instruction": f"show {number}",
        "prompt": prompt,
        "auxiliary_text": None,
        **extra,
    }


def backends(planner: Any, critic: Any, generator: RecordingGenerator | None = None) -> Backends:
    return Backends(planner=planner, critic=critic, generator=generator or RecordingGenerator())


async def test_narrative_run_draws_a_chain_of_edits(ckpt: str, run_dir: Path, small: RunOptions,
                                                    test_backends: Backends) -> None:
    result = await arun(
        "A robot wakes up. It walks to the window. It opens the curtains.",
        backends=test_backends, options=small, run_dir=run_dir, checkpointer=ckpt,
    )
    steps = result.document.steps
    assert [s.number for s in steps] == [1, 2, 3]
    assert all(s.status == "accepted" and s.image is not None for s in steps)
    generator = test_backends.generator
    assert isinstance(generator, RecordingGenerator)
    # Step 1 draws from text; every later step edits the image the step before it kept.
    first_jobs = {job.step: job for job in generator.jobs if job.attempt == 1}
    assert first_jobs[1].source_images == ()
    store = ImageStore(run_dir / "images")
    for earlier, later in [(1, 2), (2, 3)]:
        source = first_jobs[later].source_images[0]
        assert source.tobytes() == store.open(steps[earlier - 1].image).convert("RGB").tobytes()
    # One step per pass along a chain.
    assert all(size == 1 for size in generator.batch_sizes)
    assert result.document_path.is_file()


async def test_guidance_run_with_input_image_and_text_only_step(ckpt: str,
    run_dir: Path, small: RunOptions, test_backends: Backends, tmp_path: Path
) -> None:
    photo = tmp_path / "kitchen.png"
    Image.new("RGB", (48, 48), "orange").save(photo)
    result = await arun(
        "Bake bread in this kitchen. What temperature should the oven be? Take the loaf out.",
        images=[photo], backends=test_backends, options=small, run_dir=run_dir,
        checkpointer=ckpt,
    )
    steps = result.document.steps
    # The user's image is step 1, so the plan continues at 2.
    assert [s.number for s in steps] == [2, 3, 4]
    assert [s.status for s in steps] == ["accepted", "text", "accepted"]
    assert steps[1].image is None and "temperature" in steps[1].text
    generator = test_backends.generator
    assert isinstance(generator, RecordingGenerator)
    jobs = {job.step: job for job in generator.jobs if job.attempt == 1}
    assert set(jobs) == {2, 4}
    # The first image step edits the input image; the step after the text step edits step 2.
    assert jobs[2].source_images[0].getpixel((0, 0)) == (255, 165, 0)
    store = ImageStore(run_dir / "images")
    assert jobs[4].source_images[0].tobytes() == store.open(steps[0].image).tobytes()
    assert result.document.request.images[0].width == 48


async def test_rejected_attempt_is_redrawn_with_the_refined_prompt(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted([plan_reply([step(1, "a red kite")])])
    critic = scripted([verdict_reply(False, "a red kite over a beach"), verdict_reply(True)])
    result = await arun("kite", backends=backends(planner, critic), options=small,
                        run_dir=run_dir, checkpointer=ckpt)
    (only,) = result.document.steps
    assert only.status == "accepted"
    assert [a.prompt for a in only.attempts] == ["a red kite", "a red kite over a beach"]
    # The paper keeps one seed per step: a retry differs only by its prompt.
    assert only.attempts[0].seed == only.attempts[1].seed == derive_seed(0, 1, 1)
    assert only.image == only.attempts[1].image
    # The critic saw the prompt it refined as the prompt used for the second attempt.
    assert prompts_from_messages(critic.calls[1]) == ("a red kite", "a red kite over a beach")


async def test_reseeding_retries_gives_each_attempt_its_own_seed(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted([plan_reply([step(1, "a kite")])])
    critic = scripted([verdict_reply(False, "a kite!"), verdict_reply(True)])
    options = small.with_changes(reseed_retries=True, seed=7)
    result = await arun("kite", backends=backends(planner, critic), options=options,
                        run_dir=run_dir, checkpointer=ckpt)
    seeds = [a.seed for a in result.document.steps[0].attempts]
    assert seeds == [derive_seed(7, 1, 1), derive_seed(7, 1, 2)]
    assert seeds[0] != seeds[1]


@pytest.mark.parametrize(("selection", "kept"), [("last", 3), ("best", 2)])
async def test_step_out_of_attempts_is_forced_with_the_selected_attempt(ckpt: str,
    run_dir: Path, small: RunOptions, selection: str, kept: int
) -> None:
    planner = scripted([plan_reply([step(1, "a cat")])])
    critic = scripted([
        verdict_reply(False, "a cat, try 2", score=5),
        verdict_reply(False, "a cat, try 3", score=9),
        verdict_reply(False, "a cat, try 4", score=2),
    ])
    generator = RecordingGenerator()
    options = small.with_changes(selection=selection)
    result = await arun("cat", backends=backends(planner, critic, generator), options=options,
                        run_dir=run_dir, checkpointer=ckpt)
    (only,) = result.document.steps
    assert only.status == "forced"
    assert len(only.attempts) == 3 and len(generator.jobs) == 3
    assert only.image == only.attempts[kept - 1].image
    assert result.document.generator_calls == 3


async def test_final_attempt_accepted_without_critic_when_asked(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted([plan_reply([step(1, "a cat")])])
    critic = scripted([verdict_reply(False, "b"), verdict_reply(False, "c")])
    options = small.with_changes(accept_final_without_critic=True)
    result = await arun("cat", backends=backends(planner, critic), options=options,
                        run_dir=run_dir, checkpointer=ckpt)
    (only,) = result.document.steps
    assert len(critic.calls) == 2
    assert only.status == "forced" and only.attempts[-1].critique is None
    assert only.image == only.attempts[2].image


async def test_independent_steps_share_one_batched_generator_call(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    plan = [step(1, "a fox", sources=[]), step(2, "an owl", sources=[]),
            step(3, "a bear", sources=[]), step(4, "all three together", sources=[1, 2, 3])]
    planner = scripted([plan_reply(plan)])
    critic = scripted(lambda _: verdict_reply(True))
    generator = RecordingGenerator()
    result = await arun("animals", backends=backends(planner, critic, generator), options=small,
                        run_dir=run_dir, checkpointer=ckpt)
    assert generator.batch_sizes == [3, 1]
    assert [s.status for s in result.document.steps] == ["accepted"] * 4
    final_job = generator.jobs[-1]
    assert final_job.step == 4 and len(final_job.source_images) == 3


async def test_trajectory_call_budget_skips_what_it_cannot_pay_for(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted([plan_reply([step(1, "a"), step(2, "b"), step(3, "c")])])
    critic = scripted([verdict_reply(True), verdict_reply(False, "b2")])
    generator = RecordingGenerator()
    options = small.model_copy(update={"budget": Budget(max_calls=2)})
    result = await arun("abc", backends=backends(planner, critic, generator), options=options,
                        run_dir=run_dir, checkpointer=ckpt)
    assert len(generator.jobs) == 2
    assert [s.status for s in result.document.steps] == ["accepted", "forced", "skipped"]
    assert result.document.steps[2].image is None


async def test_unreadable_planner_output_is_reasked_then_accepted(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted(["I think the plan is {'execution_plan': [", plan_reply([step(1, "x")])])
    critic = scripted(lambda _: verdict_reply(True))
    result = await arun("x", backends=backends(planner, critic), options=small,
                        run_dir=run_dir, checkpointer=ckpt)
    assert len(planner.calls) == 2
    # The re-ask shows the model its reply and says what was wrong with it.
    assert len(planner.calls[1]) == len(planner.calls[0]) + 2
    assert result.document.steps[0].status == "accepted"


async def test_planner_that_never_parses_gives_a_clear_error(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted(lambda _: "no plan today")
    options = small.with_changes(max_reasks=2)
    with pytest.raises(ModelOutputError, match=rf"thread t-plan-{RUN}, planning.*3 tries"):
        await arun("x", backends=backends(planner, scripted([])), options=options,
                   run_dir=run_dir, checkpointer=ckpt, thread_id=f"t-plan-{RUN}")
    assert len(planner.calls) == 3


async def test_critic_garbage_error_names_thread_and_step_and_keeps_images(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    planner = scripted([plan_reply([step(5, "x")])])
    critic = scripted(lambda _: "<answer>{'previous_step_success': 'maybe'}</answer>")
    generator = RecordingGenerator()
    with pytest.raises(ModelOutputError, match=rf"thread t-crit-{RUN}, step 5, attempt 1"):
        await arun("x", backends=backends(planner, critic, generator), options=small,
                   run_dir=run_dir, checkpointer=ckpt, thread_id=f"t-crit-{RUN}")
    # Resuming with a working critic reuses the checkpointed image: no new generator call.
    fixed = Backends(planner=planner, critic=scripted(lambda _: verdict_reply(True)),
                     generator=generator)
    result = await aresume(f"t-crit-{RUN}", backends=fixed, run_dir=run_dir, checkpointer=ckpt)
    assert len(generator.jobs) == 1
    assert result.document.steps[0].status == "accepted"


async def test_resume_with_other_settings_is_refused(ckpt: str, run_dir: Path, small: RunOptions) -> None:
    await arun("A boat. A storm.", profile="test", options=small, run_dir=run_dir,
               checkpointer=ckpt, thread_id=f"same-{RUN}")
    with pytest.raises(SettingsMismatchError, match=r"options\.budget\.max_attempts.*3.*5"):
        await aresume(f"same-{RUN}", changes={"max_attempts": 5}, run_dir=run_dir, checkpointer=ckpt)
    with pytest.raises(SettingsMismatchError, match="request"):
        await arun("A different boat.", profile="test", options=small, run_dir=run_dir,
                   checkpointer=ckpt, thread_id=f"same-{RUN}")
    # The same request and settings on the same thread is a resume, not a conflict.
    again = await arun("A boat. A storm.", profile="test", options=small, run_dir=run_dir,
                       checkpointer=ckpt, thread_id=f"same-{RUN}")
    assert again.document == await aload_document(f"same-{RUN}", run_dir=run_dir, checkpointer=ckpt)


async def test_resume_with_other_models_is_refused(ckpt: str, run_dir: Path, small: RunOptions) -> None:
    await arun("A boat.", profile="test", options=small, run_dir=run_dir,
               checkpointer=ckpt, thread_id=f"models-{RUN}")
    other = Backends(planner=StandInPlannerModel(), critic=scripted([], name="other-critic"),
                     generator=RecordingGenerator())
    with pytest.raises(SettingsMismatchError, match="critic: thread has"):
        await aresume(f"models-{RUN}", backends=other, profile="test", run_dir=run_dir,
                      checkpointer=ckpt)


async def test_unknown_thread_and_missing_image_give_clear_errors(ckpt: str,
    run_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(UnknownThreadError, match=f"no thread 'ghost-{RUN}'"):
        await aresume(f"ghost-{RUN}", run_dir=run_dir, checkpointer=ckpt)
    with pytest.raises(ImageError, match="does not exist"):
        await arun("x", images=[tmp_path / "nope.png"], profile="test", run_dir=run_dir,
                   checkpointer=ckpt)


async def test_same_request_and_seed_gives_identical_documents(ckpt: str,
    tmp_path: Path, small: RunOptions
) -> None:
    text = "A lighthouse at dusk. Fog rolls in. The lamp turns on."
    first = await arun(text, profile="test", options=small, run_dir=tmp_path / "a",
                       checkpointer=ckpt, thread_id=f"one-{RUN}")
    second = await arun(text, profile="test", options=small, run_dir=tmp_path / "b",
                        checkpointer=ckpt, thread_id=f"two-{RUN}")
    assert first.document.content_for_comparison() == second.document.content_for_comparison()
    other_seed = await arun(text, profile="test", options=small.with_changes(seed=1),
                            run_dir=tmp_path / "c", checkpointer=ckpt, thread_id=f"three-{RUN}")
    assert other_seed.document.steps[0].image != first.document.steps[0].image


async def test_state_holds_references_not_image_bytes(
    run_dir: Path, small: RunOptions, tmp_path: Path
) -> None:
    from interleave_thinker.checkpoints.savers import open_checkpointer

    noise = tmp_path / "noise.png"
    Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(noise)
    url = f"sqlite:///{run_dir / 'state.sqlite'}"
    await arun("A red door. A blue door.", images=[noise], profile="test", options=small,
               run_dir=run_dir, checkpointer=url, thread_id="small")
    async with open_checkpointer(url) as saver:
        sizes = [len(saver.serde.dumps_typed(item.checkpoint)[1])
                 async for item in saver.alist(None)]
    # Every checkpoint is far smaller than the input image (about 790 KB): only hashes are kept.
    assert noise.stat().st_size > 700_000
    assert len(sizes) > 5 and max(sizes) < 20_000


def _critic_sees_two_images(messages: list[BaseMessage]) -> str:
    return StandInCriticModel()._reply(messages)


async def test_critic_receives_blank_canvas_then_previous_image(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    critic = scripted(_critic_sees_two_images)
    await arun("A. B.", backends=backends(StandInPlannerModel(), critic), options=small,
               run_dir=run_dir, checkpointer=ckpt)
    import base64
    import io

    first_previous = critic.calls[0][-1].content[1]
    image = Image.open(io.BytesIO(base64.b64decode(first_previous["base64"])))
    assert image.size == (64, 64) and image.getextrema() == ((255, 255),) * 3


class _FlakyGenerator(RecordingGenerator):
    """Fails its first ``failures`` backend calls with ``error``, then draws normally."""

    def __init__(self, error: Exception, failures: int) -> None:
        super().__init__()
        self.error, self.failures = error, failures

    async def agenerate(self, jobs):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise self.error
        return await super().agenerate(jobs)


async def test_transient_generator_error_is_retried_by_the_graph(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    generator = _FlakyGenerator(TransientGeneratorError("server busy"), failures=1)
    planner = scripted([plan_reply([step(1, "a lamp")])])
    result = await arun("lamp", backends=backends(planner, scripted(lambda _: verdict_reply(True)),
                                                 generator),
                        options=small, run_dir=run_dir, checkpointer=ckpt)
    assert generator.failures == 0 and len(generator.jobs) == 1
    assert result.document.steps[0].status == "accepted"


async def test_permanent_generator_error_stops_and_the_thread_resumes_later(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    generator = _FlakyGenerator(GeneratorError("model refused the prompt"), failures=1)
    planner = scripted([plan_reply([step(1, "a lamp"), step(2, "a lamp, lit")])])
    critic = scripted(lambda _: verdict_reply(True))
    with pytest.raises(GeneratorError, match="refused"):
        await arun("lamp", backends=backends(planner, critic, generator), options=small,
                   run_dir=run_dir, checkpointer=ckpt, thread_id=f"stops-{RUN}")
    # The plan survived; resuming does not ask the planner again.
    result = await aresume(f"stops-{RUN}", backends=backends(planner, critic, generator),
                           run_dir=run_dir, checkpointer=ckpt)
    assert len(planner.calls) == 1
    assert [s.status for s in result.document.steps] == ["accepted", "accepted"]


async def test_structured_mode_binds_json_schemas_and_parses_json_replies(ckpt: str,
    run_dir: Path, small: RunOptions
) -> None:
    plan_json = '{"execution_plan": [{"step_number": 1, "step_name": "Kite", ' \
        '"instruction": "A kite flies.", "prompt": "a red kite", "auxiliary_text": null}]}'
    planner = scripted([plan_json])
    critic = scripted(lambda _: '{"previous_step_success": true, "refine_prompt": null}')
    options = small.with_changes(output_mode="structured")
    result = await arun("kite", backends=backends(planner, critic), options=options,
                        run_dir=run_dir, checkpointer=ckpt)
    assert result.document.steps[0].status == "accepted"
    plan_format = planner.call_kwargs[0]["response_format"]
    verdict_format = critic.call_kwargs[0]["response_format"]
    assert plan_format["type"] == verdict_format["type"] == "json_schema"
    assert "execution_plan" in plan_format["json_schema"]["schema"]["properties"]
    assert "previous_step_success" in verdict_format["json_schema"]["schema"]["properties"]
    assert "JSON object" in planner.calls[0][-1].content
    # Tagged mode (the default) sends no response_format at all.
    tagged_planner = scripted([plan_reply([step(1, "x")])])
    await arun("x", backends=backends(tagged_planner, scripted(lambda _: verdict_reply(True))),
               options=small, run_dir=run_dir, checkpointer=ckpt)
    assert "response_format" not in tagged_planner.call_kwargs[0]
