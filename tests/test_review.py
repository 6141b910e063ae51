"""Human in the loop: the run pauses after planning; the plan is kept, edited or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import RecordingGenerator
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, ReviewRequired
from interleave_thinker.inspect import alist_threads
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions

REVIEWED = RunOptions(width=32, height=32, review_plan=True)
REQUEST = "A fox sleeps. The fox wakes. It runs away."


def _backends() -> tuple[Backends, RecordingGenerator]:
    generator = RecordingGenerator()
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=generator), generator


async def test_run_pauses_before_drawing_and_continues_with_the_plan_kept(tmp_path: Path) -> None:
    backends, generator = _backends()
    with pytest.raises(ReviewRequired) as paused:
        await arun(REQUEST, backends=backends, options=REVIEWED, run_dir=tmp_path,
                   checkpointer="memory://review-keep", thread_id="keep")
    assert generator.jobs == []
    assert [s["step_name"] for s in paused.value.plan["execution_plan"]] == [
        "A fox sleeps", "The fox wakes", "It runs away"]
    (summary,) = await alist_threads(run_dir=tmp_path, checkpointer="memory://review-keep")
    assert summary.status == "waiting for review"
    result = await aresume("keep", backends=backends, review=True, run_dir=tmp_path,
                           checkpointer="memory://review-keep")
    assert len(result.document.steps) == 3 and generator.jobs


async def test_edited_plan_replaces_the_planners_and_a_bad_edit_is_refused(
    tmp_path: Path,
) -> None:
    backends, generator = _backends()
    url = "memory://review-edit"
    with pytest.raises(ReviewRequired) as paused:
        await arun(REQUEST, backends=backends, options=REVIEWED, run_dir=tmp_path,
                   checkpointer=url, thread_id="edit")
    plan = paused.value.plan
    with pytest.raises(ConfigurationError, match="edited plan is not valid"):
        await aresume("edit", backends=backends, review={"execution_plan": []},
                      run_dir=tmp_path, checkpointer=url)
    assert generator.jobs == []
    plan["execution_plan"] = plan["execution_plan"][:2]
    plan["execution_plan"][1]["prompt"] = "Edit the previous image: the fox yawns"
    result = await aresume("edit", backends=backends, review=plan, run_dir=tmp_path,
                           checkpointer=url)
    assert [s.name for s in result.document.steps] == ["A fox sleeps", "The fox wakes"]
    assert {job.prompt.split(",")[0] for job in generator.jobs if job.step == 2} == {
        "Edit the previous image: the fox yawns"}


def test_cli_review_writes_the_plan_and_resumes_from_an_edited_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    cli = CliRunner()
    first = cli.invoke(app, ["run", "--profile", "test", "--size", "32x32", "--review-plan",
                             "--thread", "cli", REQUEST])
    assert first.exit_code == 0, first.stderr
    plan_file = Path(first.stdout.strip().splitlines()[-1])
    assert "interleave resume cli --plan" in first.stderr
    # Resuming without an answer shows the pending review again and draws nothing.
    waiting = cli.invoke(app, ["resume", "cli"])
    assert waiting.exit_code == 0 and "interleave resume cli --plan" in waiting.stderr
    assert "drawing" not in waiting.stderr
    plan = json.loads(plan_file.read_text())
    plan["execution_plan"] = plan["execution_plan"][:1]
    plan_file.write_text(json.dumps(plan))
    done = cli.invoke(app, ["resume", "cli", "--plan", str(plan_file)])
    assert done.exit_code == 0, done.stderr
    assert done.stdout.strip().endswith("document.html")
    report = json.loads(cli.invoke(app, ["show", "cli", "--json"]).stdout)
    assert [s["number"] for s in report["steps"]] == [1] and report["status"] == "done"


async def test_forced_step_waits_for_a_person_to_choose_the_attempt(tmp_path: Path) -> None:
    from conftest import scripted
    from test_graph import plan_reply, step, verdict_reply

    planner = scripted([plan_reply([step(1, "a kite"), step(2, "a kite in rain")])])
    critic = scripted(lambda _: verdict_reply(False, "try harder", score=5))
    generator = RecordingGenerator()
    backends = Backends(planner=planner, critic=critic, generator=generator)
    options = RunOptions(width=32, height=32, review_forced=True).with_changes(max_attempts=2)
    url = "memory://review-forced"
    with pytest.raises(ReviewRequired) as paused:
        await arun("kite", backends=backends, options=options, run_dir=tmp_path,
                   checkpointer=url, thread_id="forced")
    assert paused.value.kind == "review_forced"
    (waiting,) = paused.value.payload["steps"]
    assert waiting["step"] == 1 and [a["attempt"] for a in waiting["attempts"]] == [1, 2]
    assert waiting["policy_keeps"] == 2
    # Step 2 edits step 1's image, so nothing more is drawn until a choice is made.
    assert len(generator.jobs) == 2
    for bad, message in [({"7": 1}, "not waiting"), ({"1": 3}, "attempts 1 to 2"),
                         ("yes", "true or a mapping")]:
        with pytest.raises(ConfigurationError, match=message):
            await aresume("forced", backends=backends, review=bad, run_dir=tmp_path,
                          checkpointer=url)
    with pytest.raises(ReviewRequired) as again:
        await aresume("forced", backends=backends, review={"1": 1}, run_dir=tmp_path,
                      checkpointer=url)
    assert again.value.payload["steps"][0]["step"] == 2
    result = await aresume("forced", backends=backends, review=True, run_dir=tmp_path,
                           checkpointer=url)
    first, second = result.document.steps
    assert first.status == second.status == "forced"
    assert first.image == first.attempts[0].image  # the person's choice, not the policy's
    assert second.image == second.attempts[1].image  # accepted: the policy's last attempt
    # The second step edited the image the person chose for the first.
    store_image = generator.jobs[2].source_images[0]
    from interleave_thinker.storage.image_store import ImageStore

    kept = ImageStore(tmp_path / "images").open(first.image)
    assert store_image.tobytes() == kept.convert("RGB").tobytes()
