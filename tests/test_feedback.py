"""Feedback a user can act on: whole thread ids in `list`, budget and redraw messages, one
number per step, reuse labels and call counts, refused profile flags, read-only commands that
create nothing, and the test profile's --max-steps."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator, scripted
from interleave_thinker.cli import app
from interleave_thinker.cli.progress import Progress
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.events import ImageReady, StepStarted, Verdict
from interleave_thinker.graph import recursion_limit
from interleave_thinker.inspect import alist_threads
from interleave_thinker.models.profiles import load_profile
from interleave_thinker.runner import arun
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import Budget, RunOptions, RunSettings
from test_graph import plan_reply, step, verdict_reply

SMALL = ["--size", "32x32"]
LONG_ID = "batch-ueval-123456-abcdef0123"
# By the test critic's rule (an even first byte of the planned prompt's sha256), the first of
# these is rejected at its first attempt, the other two accepted.
REJECTED_FIRST = "A red kite rises. A kite rises. A cat sleeps."


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> CliRunner:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    return CliRunner()


def invoke(cli: CliRunner, *args: str, **kwargs: Any) -> Any:
    return cli.invoke(app, list(args), **kwargs)


# -- interleave list ----------------------------------------------------------------------------


def test_list_shows_whole_thread_ids_at_80_columns(cli: CliRunner) -> None:
    request = "A very long request about kites. " * 8
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", LONG_ID, request).exit_code == 0
    shown = invoke(cli, "list", env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # The id is whole on one line, where a copy takes it for show, resume and export.
    assert any(line.split()[:1] == [LONG_ID] for line in lines), shown.stdout
    row = next(line for line in lines if line.startswith(LONG_ID))
    assert row.split()[1] == "done"
    # The request follows, shortened to the terminal's width.
    assert all(len(line) <= 80 for line in lines if not line.startswith(LONG_ID))
    as_json = [json.loads(line) for line in invoke(cli, "list", "--json").stdout.splitlines()]
    assert [row["thread_id"] for row in as_json] == [LONG_ID]
    assert {"status", "steps", "generator_calls", "updated_at", "request"} <= set(as_json[0])


# -- read-only commands create nothing ---------------------------------------------------------


def test_list_show_export_and_gc_never_create_a_run_directory(cli: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    where = ["--run-dir", str(missing)]
    listed = invoke(cli, "list", *where)
    assert listed.exit_code == 0 and listed.stdout == ""
    assert f"no threads: there is no run directory at {missing}" in listed.stderr
    assert "hint: pass the --run-dir" in listed.stderr
    assert invoke(cli, "list", "--json", *where).stdout == ""
    for command in (["show", "t1"], ["show", "t1", "--json"], ["export", "t1"]):
        result = invoke(cli, *command, *where)
        assert result.exit_code == 1
        first, hint = result.stderr.splitlines()[:2]
        assert first == f"error: no thread 't1': there is no run directory at {missing}"
        assert hint.startswith("hint: pass the --run-dir")
    result = invoke(cli, "gc", *where)
    assert result.exit_code == 1 and "does not exist" in result.stderr
    assert not missing.exists()


def test_an_existing_folder_without_checkpoints_stays_empty(tmp_path: Path, cli: CliRunner) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    assert asyncio.run(alist_threads(run_dir=folder)) == []
    result = invoke(cli, "show", "t1", "--run-dir", str(folder))
    assert result.exit_code == 1
    assert f"there is no checkpoint database at {folder.resolve() / 'checkpoints.sqlite'}" in result.stderr
    assert invoke(cli, "list", "--run-dir", str(folder)).exit_code == 0
    assert list(folder.iterdir()) == []


# -- --profile test with model flags is refused ----------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--planner-url", "http://127.0.0.1:9/v1"], "--planner-url"),
        (["--critic", "my-critic", "--generator-url", "http://127.0.0.1:9/v1"], "--critic, --generator-url"),
        (["--engine", "vllm"], "--engine"),
    ],
)
def test_the_test_profile_refuses_model_flags(
    cli: CliRunner, run_dir: Path, flags: list[str], named: str
) -> None:
    result = invoke(cli, "run", "--profile", "test", *flags, "A kite.")
    assert result.exit_code == 1
    first, hint = result.stderr.splitlines()
    assert first == f"error: the test profile brings its own models, so {named} would be ignored"
    assert hint.startswith(f"hint: drop {named} (check INTERLEAVE_")
    assert hint.endswith("start a new thread without --profile test")
    assert not (run_dir / "documents").exists()


def test_the_test_profile_refuses_model_settings_from_the_environment(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLEAVE_CRITIC_URL", "http://127.0.0.1:9/v1")
    result = invoke(cli, "run", "--profile", "test", "A kite.")
    assert result.exit_code == 1 and "--critic-url would be ignored" in result.stderr
    assert "INTERLEAVE_CRITIC_URL" in result.stderr


def test_a_resumed_test_thread_refuses_model_flags_but_not_the_environment(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "kite", "A kite.").exit_code == 0
    # A served critic exported for other threads does not stop this one: resume takes the
    # thread's models, and only model flags given on the command line are choices.
    monkeypatch.setenv("INTERLEAVE_CRITIC_URL", "http://127.0.0.1:9/v1")
    assert invoke(cli, "resume", "kite").exit_code == 0
    result = invoke(cli, "resume", "kite", "--critic-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert "--critic-url would be ignored" in result.stderr and "hint: drop --critic-url" in result.stderr


def test_a_refused_batch_shows_no_progress_bar(cli: CliRunner, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "text": "A kite."}\n')
    result = invoke(cli, "batch", str(prompts), "--profile", "test", "--planner-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("error: the test profile brings its own models")
    assert "batch" not in result.stderr.splitlines()[0] and "running" not in result.stderr


def test_profiles_refuse_ignored_model_choices_in_python() -> None:
    with pytest.raises(ConfigurationError, match="the test profile brings its own models"):
        load_profile("test", ModelSettings(planner_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigurationError, match="the demo profile brings its own models, so --generator"):
        load_profile("demo", ModelSettings(generator="/models/flux"))
    # The paper's model names are what --paper sets, not a choice: allowed.
    assert load_profile("test", ModelSettings(planner="InterleaveThinker/InterleaveThinker-Planner-8B"))


# -- the test profile honours --max-steps ----------------------------------------------------------


def _frames(count: int) -> str:
    return " ".join(f"Frame {n} of the flip book." for n in range(1, count + 1))


def test_the_test_planner_writes_a_step_per_sentence_up_to_max_steps(cli: CliRunner) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "all", _frames(10)).exit_code == 0
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "capped", "--max-steps", "4",
                  _frames(10)).exit_code == 0
    steps = {row["thread_id"]: row["steps"]
             for row in map(json.loads, invoke(cli, "list", "--json").stdout.splitlines())}
    assert steps == {"all": 10, "capped": 4}
    report = json.loads(invoke(cli, "show", "capped", "--json").stdout)
    # The overflow is folded into the last step, not dropped.
    assert "Frame 10 of the flip book" in report["steps"][-1]["instruction"]


# -- progress: the budget, redraws that will not happen, one number per step -------------------------


def test_progress_says_when_the_budget_runs_out_and_what_is_skipped(cli: CliRunner) -> None:
    result = invoke(cli, "run", "--profile", "test", *SMALL, "--max-calls", "1", REJECTED_FIRST)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "step 1 of 3, attempt 1: rejected by the critic; no generator call is left for a redraw " \
           "(--max-calls), so the step will be committed as forced" in lines
    assert not any("redrawing" in line for line in lines)
    assert ("call budget spent: 1 of 1 generator calls (--max-calls); forced with a rejected attempt: "
            "step 1; skipped, no image: steps 2, 3") in lines
    assert "done:" in lines[-1] and "1 generator calls" in lines[-1]


def test_a_redraw_is_announced_only_when_a_call_pays_for_it(cli: CliRunner) -> None:
    result = invoke(cli, "run", "--profile", "test", *SMALL, "--max-calls", "2", REJECTED_FIRST)
    assert result.exit_code == 0, result.stderr
    redraw = "step 1 of 3, attempt 1: rejected by the critic; redrawing with its refined prompt"
    assert redraw in result.stderr
    assert "step 1 of 3, attempt 2: drawing" in result.stderr
    assert "call budget spent: 2 of 2 generator calls (--max-calls); skipped, no image: steps 2, 3" \
        in result.stderr


def _png(path: Path, colour: str) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_guidance_steps_have_one_number_in_plan_progress_and_document(cli: CliRunner, tmp_path: Path) -> None:
    images = ["--image", str(_png(tmp_path / "a.png", "red")),
              "--image", str(_png(tmp_path / "b.png", "blue"))]
    result = invoke(cli, "run", "--profile", "test", *SMALL, *images, "--thread", "guide",
                    "A kite rises. A cat sleeps.")
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    assert "planned 2 steps, numbered from 3 (your input images are steps 1 to 2)" in err
    assert "  3. A kite rises (image)" in err and "  4. A cat sleeps (image)" in err
    assert "step 3 (position 1 of 2 in the plan), attempt 1: drawing" in err
    assert "step 4 (position 2 of 2 in the plan), attempt 1: drawing" in err
    # No bare "step 1 of 2": a step is never named by its position alone.
    assert "step 1 of" not in err and "step 2 of" not in err
    report = json.loads(invoke(cli, "show", "guide", "--json").stdout)
    assert [s["number"] for s in report["steps"]] == [3, 4]
    markdown = tmp_path / "guide.md"
    assert invoke(cli, "export", "guide", "--format", "md", "-o", str(markdown)).exit_code == 0
    assert "Step 3: A kite rises" in markdown.read_text() and "Step 4: A cat sleeps" in markdown.read_text()
    one = invoke(cli, "run", "--profile", "test", *SMALL, *images[:2], "A kite rises.")
    assert "planned 1 step, numbered from 2 (your input image is step 1)" in one.stderr


# -- reuse labels and call counts ----------------------------------------------------------------


def _always_rejects_without_a_prompt(_: Any) -> str:
    return verdict_reply(False, None)


async def test_a_repeated_request_reuses_its_image_without_counting_a_call(run_dir: Path) -> None:
    # The critic rejects without a new prompt: every attempt asks for the same prompt and seed.
    generator = RecordingGenerator()
    backends = Backends(planner=scripted([plan_reply([step(1, "a kite")])]),
                        critic=scripted(_always_rejects_without_a_prompt), generator=generator)
    events: list[Any] = []
    result = await arun("a kite", backends=backends, run_dir=run_dir,
                        checkpointer="memory://" + uuid.uuid4().hex,
                        options=RunOptions(width=32, height=32, budget=Budget(max_attempts=3, max_calls=2)),
                        on_event=events.append)
    attempts = result.document.steps[0].attempts
    # One draw; attempts 2 and 3 take its image, within a budget of two calls.
    assert len(generator.jobs) == 1 and result.document.generator_calls == 1
    assert len(attempts) == 3 and len({a.image.sha256 for a in attempts}) == 1
    assert not any(a.reused for a in attempts)  # nothing was restarted
    assert result.document.steps[0].status == "forced"
    assert [e.attempt for e in events if isinstance(e, StepStarted)] == [1]
    assert [(e.attempt, e.reused, e.repeats) for e in events if isinstance(e, ImageReady)] == [
        (1, False, None), (2, False, 1), (3, False, 1)]
    assert [e.next_attempt for e in events if isinstance(e, Verdict)] == ["repeated", "repeated", None]


async def test_progress_words_for_a_repeated_request(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = Backends(planner=scripted([plan_reply([step(1, "a kite")])]),
                        critic=scripted(_always_rejects_without_a_prompt), generator=RecordingGenerator())
    await arun("a kite", backends=backends, run_dir=run_dir, checkpointer="memory://" + uuid.uuid4().hex,
               options=RunOptions(width=32, height=32, budget=Budget(max_attempts=2)), on_event=Progress())
    err = capsys.readouterr().err
    assert ("step 1 of 1, attempt 1: rejected by the critic without a new prompt; the next attempt "
            "repeats the same request, so the same image is judged again") in err
    assert ("step 1 of 1, attempt 2: the same prompt and seed as attempt 1, so its image is reused "
            "(nothing drawn, no call counted)") in err
    assert "before the restart" not in err and "attempt 2: drawing" not in err


async def test_repeats_do_not_count_but_the_recursion_limit_still_holds(run_dir: Path) -> None:
    # Ten chained steps, each rejected twice without a new prompt: 30 passes on 10 draws. (With
    # --max-calls 10 the last step would stop at its draw: once the budget is spent, nothing
    # more is attempted, repeats included.)
    steps = 10
    generator = RecordingGenerator()
    backends = Backends(planner=scripted([plan_reply([step(n, f"frame {n}") for n in range(1, steps + 1)])]),
                        critic=scripted(_always_rejects_without_a_prompt), generator=generator)
    options = RunOptions(width=32, height=32, budget=Budget(max_attempts=3, max_calls=steps + 1))
    settings = RunSettings(profile="custom", planner="p", critic="c", generator="g", options=options)
    assert recursion_limit(settings) >= 2 + 3 * steps * 3 + 1
    result = await arun("a flip book", backends=backends, options=options, run_dir=run_dir,
                        checkpointer="memory://" + uuid.uuid4().hex)
    assert [len(s.attempts) for s in result.document.steps] == [3] * steps
    assert len(generator.jobs) == result.document.generator_calls == steps


# -- the README's bring-your-own-models section --------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _byo_section() -> str:
    text = README.read_text()
    start = text.index("Bring your own models:")
    return text[start:text.index("### Notebooks and async code", start)]


def test_the_readme_critic_reply_is_what_the_parser_reads() -> None:
    from interleave_thinker.prompts.parsing import parse_verdict

    section = _byo_section()
    start = section.index("<think>why</think>")
    block = section[start:section.index("</answer>", start) + len("</answer>")]
    verdict = parse_verdict("\n".join(line.strip() for line in block.splitlines()))
    assert (verdict.success, verdict.refine_prompt, verdict.score) == (False, "a better prompt", 4)


def test_the_readme_names_every_generation_job_field_and_top_level_review_required() -> None:
    import dataclasses

    import interleave_thinker
    from interleave_thinker import GenerationJob, ReviewRequired

    section = " ".join(_byo_section().split())
    jobs = section[section.index("**Generator jobs**"):]
    assert [f.name for f in dataclasses.fields(GenerationJob) if f"`{f.name}`" not in jobs] == []
    assert "from interleave_thinker import ReviewRequired" in section
    assert ReviewRequired is interleave_thinker.errors.ReviewRequired
    examples = (README.parent / "examples" / "README.md").read_text()
    assert "langchain>=1.0" in examples
