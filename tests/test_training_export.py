"""`interleave export training KIND`: SFT files LLaMA-Factory accepts, EasyR1 records, a GRPO
dataset, all built by the prompt pack code the graph runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.errors import ConfigurationError, UnknownThreadError
from interleave_thinker.evaluation.judge import Judge, JudgeCache
from interleave_thinker.inspect import aload_document
from interleave_thinker.prompts.official import read_official_templates
from interleave_thinker.prompts.packs import InterleavePack, OfficialPack
from interleave_thinker.prompts.parsing import parse_verdict, read_plan
from interleave_thinker.training import export as export_module
from interleave_thinker.training.export import LabelOptions, aexport_training
from interleave_thinker.training.judging import StepJudge, read_step_judge_prompts
from interleave_thinker.training.threads import Selection, parse_since, parse_statuses
from official_clone import CRITIC
from training_fixtures import (
    GUIDE,
    STORY,
    load_sharegpt,
    run_test_threads,
    scripted_judge,
    write_judge_prompts,
)


@pytest.fixture
def threads(run_dir: Path, tmp_path: Path) -> dict[str, str]:
    return run_test_threads(run_dir, tmp_path)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    return write_judge_prompts(tmp_path / "official")


def _export(kind: str, run_dir: Path, out: Path, **kwargs: object):
    selection = kwargs.pop("selection", Selection(all=True))
    return asyncio.run(aexport_training(kind, selection, out, run_dir=run_dir, **kwargs))  # type: ignore[arg-type]


def _labels(clone: Path, cache: Path | None = None, **judge_kwargs: object) -> LabelOptions:
    judge = Judge(scripted_judge(**judge_kwargs), retry_delay=0)  # type: ignore[arg-type]
    store = JudgeCache(cache, judge.identity) if cache else None
    return LabelOptions(judge=StepJudge(judge, read_step_judge_prompts(clone), cache=store))


# ---------------------------------------------------------------------------------------------
# SFT files


def test_planner_sft_has_one_record_per_thread_that_reads_back_into_its_plan(
    threads: dict[str, str], run_dir: Path, tmp_path: Path
) -> None:
    report = _export("planner-sft", run_dir, tmp_path / "out")
    assert report.samples == 2 and report.prompts == ["interleave"]
    records = load_sharegpt(tmp_path / "out", "sft_planner")
    by_request = {}
    for record in records:
        user = next(m for m in record["messages"] if m["role"] == "user")["content"]
        by_request[STORY if STORY in user else GUIDE] = record
    # The user turn is the planner node's own input: our pack's system prompt and marked request.
    pack = InterleavePack()
    expected = pack.planner_messages(STORY, [], max_steps=None)
    story = by_request[STORY]
    assert story["messages"][0] == {"role": "system", "content": expected[0].content}
    assert story["messages"][1]["content"] == expected[1].content[-1]["text"]
    assert story["images"] == []
    # Guidance: the input image is an <image> before the request, its file under out/images.
    guide = by_request[GUIDE]
    assert guide["messages"][1]["content"].startswith("<image><request>")
    assert len(guide["images"]) == 1 and Path(guide["images"][0]).is_relative_to(tmp_path / "out" / "images")
    # The assistant turn is the plan, and reads back into the very plan the thread ran.
    for thread, request in threads.items():
        document = asyncio.run(aload_document(thread, run_dir=run_dir))
        reply = by_request[request]["messages"][-1]["content"]
        plan, _ = read_plan(reply, input_images=len(document.request.images))
        assert [(s.number, s.prompt, s.text, s.sources) for s in plan.steps] == [
            (s.number, s.prompt, s.text, s.sources) for s in _plan(run_dir, thread).steps
        ]


def _plan(run_dir: Path, thread: str):
    from interleave_thinker.workspace import Workspace

    async def read():
        workspace = Workspace.open(run_dir)
        async with workspace.graph() as graph:
            return (await workspace.existing_state(graph, thread))["plan"]

    return asyncio.run(read())


def test_critic_sft_has_one_record_per_judged_attempt(
    threads: dict[str, str], run_dir: Path, tmp_path: Path
) -> None:
    report = _export("critic-sft", run_dir, tmp_path / "out")
    records = load_sharegpt(tmp_path / "out", "sft_critic")
    attempts = []
    for thread in threads:
        document = asyncio.run(aload_document(thread, run_dir=run_dir))
        attempts += [a for s in document.steps for a in s.attempts if a.critique is not None]
    assert report.samples == len(records) == len(attempts)
    verdicts = [parse_verdict(r["messages"][-1]["content"]) for r in records]
    assert sorted((v.success, v.refine_prompt) for v in verdicts) == sorted(
        (a.critique.success, a.critique.refine_prompt) for a in attempts)
    assert any(not v.success for v in verdicts) and any(v.success for v in verdicts)
    for record in records:
        user = record["messages"][1]["content"]
        assert user.startswith("previous image:<image>candidate image:<image>step: ")
        assert len(record["images"]) == 2
    # Step 1's previous image is the white canvas the critic saw, as a file of the candidate's size.
    first = next(r for r in records if "It rains" not in r["messages"][1]["content"]
                 and "step: A girl plants a" in r["messages"][1]["content"])
    with Image.open(first["images"][0]) as canvas:
        assert canvas.size == (64, 64) and canvas.convert("RGB").getextrema() == ((255, 255),) * 3
    # Both kinds share one dataset_info.json.
    _export("planner-sft", run_dir, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert set(info) == {"sft_planner", "sft_critic"}


def test_official_pack_gives_the_official_layout(threads: dict[str, str], run_dir: Path, tmp_path: Path,
                                                 clone: Path) -> None:
    report = _export("critic-sft", run_dir, tmp_path / "out", prompts=f"official:{clone}")
    pack = OfficialPack(read_official_templates(clone))
    assert report.prompts == [pack.identity]
    records = load_sharegpt(tmp_path / "out", "sft_critic")
    for record in records:
        # One user turn: both images first, then the filled template; no system turn.
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        user = record["messages"][0]["content"]
        assert user.startswith("<image><image>")
        head, _tail = CRITIC.split("{original_instruction}")
        assert user[len("<image><image>"):].startswith(head)
        reply = record["messages"][1]["content"]
        # The official checkpoints' answer: a Python literal with a string refine_prompt.
        assert "'previous_step_success': " in reply and "'refine_prompt': '" in reply
    _export("planner-sft", run_dir, tmp_path / "out", prompts=f"official:{clone}")
    plans = load_sharegpt(tmp_path / "out", "sft_planner")
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in plans)
    assert all("'execution_plan': [" in r["messages"][1]["content"] for r in plans)


def test_threads_run_with_the_official_pack_are_exported_in_it(
    run_dir: Path, tmp_path: Path, clone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLEAVE_CACHE_DIR", str(tmp_path / "cache"))
    run_test_threads(run_dir, tmp_path, prompts=f"official:{clone}")
    with pytest.raises(ConfigurationError, match="official prompts"):
        # No fetched clone recorded in this (empty) cache folder: said clearly.
        _export("critic-sft", run_dir, tmp_path / "out")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "official-prompts.json").write_text(json.dumps({"path": str(clone)}))
    report = _export("critic-sft", run_dir, tmp_path / "out")
    assert report.prompts == [OfficialPack(read_official_templates(clone)).identity]
    # A clone whose text differs from the one the threads ran with is refused.
    other = write_judge_prompts(tmp_path / "other")
    (other / "UEval" / "system.py").write_text(
        (other / "UEval" / "system.py").read_text().replace("Synthetic critic", "Another critic"))
    (tmp_path / "cache" / "official-prompts.json").write_text(json.dumps({"path": str(other)}))
    with pytest.raises(ConfigurationError, match="holds official:"):
        _export("critic-sft", run_dir, tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# RL records and the GRPO dataset


def test_critic_rl_records_carry_judge_labels(threads: dict[str, str], run_dir: Path, tmp_path: Path,
                                             clone: Path) -> None:
    labels = _labels(clone, cache=tmp_path / "cache")
    report = _export("critic-rl", run_dir, tmp_path / "out", labels=labels)
    lines = (tmp_path / "out" / "critic_rl.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == report.samples > 0
    assert report.judge_calls == 2 * len(records) and report.judge_failures == 0
    for record in records:
        assert {"origin_prompt", "rewritten_prompt", "origin_image_path", "edited_image_path",
                "evaluation"} <= set(record)
        # min of the judge's listed scores: [6, 8] and [9, 7].
        assert record["evaluation"]["semantics"] == 6 and record["evaluation"]["quality"] == 7
        assert isinstance(record["evaluation"]["success"], bool)
        assert Path(record["origin_image_path"]).is_absolute() and Path(record["edited_image_path"]).is_file()
    # success comes from the critic's verdict by default: both kinds occur.
    assert {r["evaluation"]["success"] for r in records} == {True, False}
    # A second export asks the judge nothing: its answers are cached.
    again = _export("critic-rl", run_dir, tmp_path / "again", labels=labels)
    assert again.samples == report.samples and again.judge_calls == 0


def test_judge_failures_leave_samples_out_and_are_counted(threads: dict[str, str], run_dir: Path,
                                                         tmp_path: Path, clone: Path) -> None:
    labels = _labels(clone, quality="I cannot say.")
    with pytest.raises(ConfigurationError, match="no critic-rl samples"):
        _export("critic-rl", run_dir, tmp_path / "out", labels=labels)
    assert not (tmp_path / "out" / "critic_rl.jsonl").exists()
    # One unreadable answer, no second try: exactly one sample is left out, and counted.
    replies = iter(["no score here"])
    judge = Judge(scripted_judge(quality_reply=lambda: next(replies, '{"score": [8]}')),  # type: ignore[arg-type]
                  attempts=1, retry_delay=0)
    labels = LabelOptions(judge=StepJudge(judge, read_step_judge_prompts(clone)))
    report = _export("critic-rl", run_dir, tmp_path / "out", labels=labels)
    complete = _export("critic-rl", run_dir, tmp_path / "all", labels=_labels(clone))
    assert report.judge_failures == 1 and report.samples == complete.samples - 1
    assert report.skipped == {"samples left out: the judge gave no readable score": 1}


def test_success_from_the_judge(threads: dict[str, str], run_dir: Path, tmp_path: Path, clone: Path) -> None:
    labels = _labels(clone)
    strict = LabelOptions(judge=labels.judge, success_from="judge", success_threshold=7)
    _export("critic-rl", run_dir, tmp_path / "out", labels=strict)
    records = [json.loads(line) for line in (tmp_path / "out" / "critic_rl.jsonl").read_text().splitlines()]
    assert {r["evaluation"]["success"] for r in records} == {False}  # semantics 6 < 7


def test_grpo_dataset_loads_with_datasets(threads: dict[str, str], run_dir: Path, tmp_path: Path,
                                         clone: Path) -> None:
    datasets = pytest.importorskip("datasets")
    report = _export("grpo", run_dir, tmp_path / "grpo", labels=_labels(clone))
    dataset = datasets.load_from_disk(str(tmp_path / "grpo"))
    assert len(dataset) == report.samples > 0
    assert {"prompt", "images", "success", "semantics", "quality", "origin_prompt",
            "rewritten_prompt", "origin_blank"} <= set(dataset.column_names)
    row = dataset[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    user = row["prompt"][1]["content"]
    assert sum(part["type"] == "image" for part in user) == len(row["images"]) == 2
    assert all(isinstance(image, Image.Image) for image in row["images"])
    # The prompt is the critic node's input, placeholders where the images go.
    assert user[0] == {"type": "text", "text": "previous image:"} and user[1]["type"] == "image"
    assert any(r["origin_blank"] for r in dataset) and not all(r["origin_blank"] for r in dataset)
    _export("planner-sft", run_dir, tmp_path / "sft")
    with pytest.raises(ConfigurationError, match="holds LLaMA-Factory"):
        _export("grpo", run_dir, tmp_path / "sft", labels=_labels(clone))
    with pytest.raises(ConfigurationError, match="datasets folder"):
        _export("planner-sft", run_dir, tmp_path / "grpo")


# ---------------------------------------------------------------------------------------------
# Filters and refusals


def test_filters_by_thread_status_manifest_and_date(threads: dict[str, str], run_dir: Path,
                                                   tmp_path: Path) -> None:
    only_story = _export("critic-sft", run_dir, tmp_path / "a", selection=Selection(threads=("story",)))
    assert only_story.threads == 1
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"prompt_id": "p", "thread_id": "guide", "status": "done"}) + "\n"
                        + json.dumps({"prompt_id": "q", "thread_id": "story", "status": "failed"}) + "\n")
    from_manifest = _export("planner-sft", run_dir, tmp_path / "b",
                            selection=Selection(manifests=(manifest,)))
    assert from_manifest.samples == 1
    assert "<image>" in load_sharegpt(tmp_path / "b", "sft_planner")[0]["messages"][1]["content"]
    with pytest.raises(ConfigurationError, match="no critic-sft samples"):
        _export("critic-sft", run_dir, tmp_path / "c",
                selection=Selection(all=True, since=parse_since("2999-01-01")))
    recent = _export("critic-sft", run_dir, tmp_path / "d",
                     selection=Selection(all=True, since=parse_since("1h")))
    assert recent.threads == 2
    # Only accepted steps: the test critic accepts every step here, so nothing changes...
    accepted = _export("critic-sft", run_dir, tmp_path / "e",
                       selection=Selection(all=True, statuses=parse_statuses("accepted")))
    assert accepted.samples == only_story.samples + _export(
        "critic-sft", run_dir, tmp_path / "f", selection=Selection(threads=("guide",))).samples
    with pytest.raises(ConfigurationError, match="--status"):
        parse_statuses("accepted,pending")
    with pytest.raises(ConfigurationError, match="--since"):
        parse_since("last tuesday")


def test_forced_steps_follow_the_status_filter(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"INTERLEAVE_RUN_DIR": str(run_dir)}
    result = runner.invoke(app, ["run", "--profile", "test", "--size", "64x64", "--max-attempts", "1",
                                 "--thread", "short", STORY], env=env)
    assert result.exit_code == 0, result.stderr
    document = asyncio.run(aload_document("short", run_dir=run_dir))
    forced = [s for s in document.steps if s.status == "forced"]
    assert forced, "the test critic rejects some first attempts"
    both = _export("critic-sft", run_dir, tmp_path / "a")
    accepted = _export("critic-sft", run_dir, tmp_path / "b",
                       selection=Selection(all=True, statuses=frozenset({"accepted"})))
    assert both.samples - accepted.samples == len(forced)
    # The planner sample of a thread with forced steps needs --status to include them.
    with pytest.raises(ConfigurationError, match="no planner-sft samples"):
        _export("planner-sft", run_dir, tmp_path / "c",
                selection=Selection(all=True, statuses=frozenset({"accepted"})))


def test_refusals(threads: dict[str, str], run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="judge"):
        _export("critic-rl", run_dir, tmp_path / "out")
    with pytest.raises(ConfigurationError, match="unknown training data kind"):
        _export("dpo", run_dir, tmp_path / "out")
    with pytest.raises(ConfigurationError, match="run's own data"):
        _export("critic-sft", run_dir, run_dir / "images" / "x")
    with pytest.raises(UnknownThreadError, match="nope"):
        _export("critic-sft", run_dir, tmp_path / "out", selection=Selection(threads=("nope",)))
    with pytest.raises(ConfigurationError, match="no threads"):
        _export("critic-sft", run_dir, tmp_path / "out", selection=Selection())
    with pytest.raises(UnknownThreadError, match="no run directory"):
        _export("critic-sft", tmp_path / "elsewhere", tmp_path / "out")


def test_literal_image_tokens_in_text_are_skipped_not_miscounted(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--profile", "test", "--size", "64x64", "--thread", "tok",
                                 "Draw the <image> tag on a sign. A dog reads it."],
                           env={"INTERLEAVE_RUN_DIR": str(run_dir)})
    assert result.exit_code == 0, result.stderr
    report = _export("critic-sft", run_dir, tmp_path / "out")
    assert any("literal <image>" in reason for reason in report.skipped)
    load_sharegpt(tmp_path / "out", "sft_critic")


def test_images_are_linked_when_asked_and_copied_otherwise(threads: dict[str, str], run_dir: Path,
                                                          tmp_path: Path) -> None:
    _export("critic-sft", run_dir, tmp_path / "copied")
    _export("critic-sft", run_dir, tmp_path / "linked", link=True)
    copied = [p for p in (tmp_path / "copied" / "images").rglob("*") if p.is_file()]
    linked = [p for p in (tmp_path / "linked" / "images").rglob("*") if p.is_file()]
    assert len(copied) == len(linked)
    assert all(p.stat().st_nlink == 1 for p in copied)
    # The white canvases are not in the store: always written.
    assert sum(p.stat().st_nlink > 1 for p in linked) == len(linked) - 1


def test_images_without_a_local_file_are_written_from_read(threads: dict[str, str], run_dir: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that is not a folder of files (PostgreSQL) is read through read()."""
    from interleave_thinker.workspace import Workspace

    real = Workspace.image_store

    class ReadOnly:
        def __init__(self, store):
            self.store = store
            self.reads = 0

        def read(self, ref):
            self.reads += 1
            return self.store.read(ref)

    stores: list[ReadOnly] = []

    def wrapped(self):
        stores.append(ReadOnly(real.fget(self)))
        return stores[-1]

    monkeypatch.setattr(Workspace, "image_store", property(wrapped))
    report = _export("critic-sft", run_dir, tmp_path / "out", link=True)
    assert stores and stores[-1].reads == report.images - 1
    load_sharegpt(tmp_path / "out", "sft_critic")


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_exports_training_data_and_still_exports_documents(threads: dict[str, str], run_dir: Path,
                                                               tmp_path: Path, clone: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    env = {"INTERLEAVE_RUN_DIR": str(run_dir)}
    out = tmp_path / "cli"
    result = runner.invoke(app, ["export", "training", "critic-sft", "--all", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "critic_sft.json"), str(out / "dataset_info.json")]
    assert "critic-sft samples from 2 threads" in result.stderr
    load_sharegpt(out, "sft_critic")
    result = runner.invoke(app, ["export", "training", "planner-sft", "story", "--out", str(out),
                                 "--status", "accepted,forced"], env=env)
    assert result.exit_code == 0, result.stderr
    assert len(load_sharegpt(out, "sft_planner")) == 1
    # The judge comes from --judge (here a scripted model), its prompts from the clone.
    import interleave_thinker.evaluation.judge as judge_module

    monkeypatch.setattr(judge_module, "judge_chat_model", lambda *a, **k: scripted_judge())
    result = runner.invoke(app, ["export", "training", "critic-rl", "--all", "--out", str(out),
                                 "--judge", "scripted", "--judge-prompts", str(clone)], env=env)
    assert result.exit_code == 0, result.stderr
    assert "judge " in result.stderr and (out / "critic_rl.jsonl").is_file()
    assert (out / "judge-cache").is_dir()
    # Errors are one line and a hint.
    result = runner.invoke(app, ["export", "training", "grpo", "--all", "--out", str(tmp_path / "g")],
                           env=env)
    assert result.exit_code == 1 and "error: grpo records carry labels" in result.stderr
    result = runner.invoke(app, ["export", "training", "sft", "--all"], env=env)
    assert result.exit_code == 1 and "unknown training data kind" in result.stderr
    # The document export keeps its form, and has a named form too.
    for args in (["export", "story", "--format", "md", "-o", str(tmp_path / "d.md")],
                 ["export", "--format", "json", "story", "-o", str(tmp_path / "d.json")],
                 ["export", "thread", "story", "-o", str(tmp_path / "d.html")]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, (args, result.stderr)
    assert json.loads((tmp_path / "d.json").read_text())["document"]["steps"]
    result = runner.invoke(app, ["export"], env=env)
    assert result.exit_code == 2 and "Missing argument" in result.stderr
    assert "training" in runner.invoke(app, ["export", "--help"], env=env).stdout


def test_export_module_has_every_kind() -> None:
    assert export_module.KINDS == ("planner-sft", "critic-sft", "critic-rl", "grpo")


# ---------------------------------------------------------------------------------------------
# Progress, and threads of the demo profile


def test_export_reports_progress_on_bars(threads: dict[str, str], run_dir: Path, tmp_path: Path,
                                         clone: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from interleave_thinker.training.progress import Bars

    screen = StringIO()
    with Bars(console=Console(file=screen, width=120)) as bars:
        report = _export("critic-rl", run_dir, tmp_path / "out", labels=_labels(clone), bars=bars)
    lines = {line.split()[0]: line for line in screen.getvalue().splitlines() if line.strip()}
    assert "2/2" in lines["threads"]
    assert f"{report.images}/" in lines["images"]
    # Two judge questions per sample, every one answered.
    assert f"{2 * report.samples}/{2 * report.samples}" in lines["judge"]


@pytest.fixture(scope="module")
def demo_threads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished thread of the demo profile (tiny FLUX.2-klein and Qwen3-VL models, built here)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from interleave_thinker.demo.models import DEMO_DIR_ENV, DEMO_REQUEST

    root = tmp_path_factory.mktemp("training-demo")
    env = {"INTERLEAVE_RUN_DIR": str(root / "runs"), DEMO_DIR_ENV: str(root / "models"),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = CliRunner().invoke(app, ["run", "--profile", "demo", "--size", "64x64", "--thread", "demo",
                                      DEMO_REQUEST], env=env)
    assert result.exit_code == 0, result.stderr
    return root / "runs"


@pytest.mark.slow
def test_demo_profile_threads_export_every_kind(demo_threads: Path, tmp_path: Path, clone: Path) -> None:
    datasets = pytest.importorskip("datasets")
    document = asyncio.run(aload_document("demo", run_dir=demo_threads))
    attempts = [a for s in document.steps for a in s.attempts if a.critique is not None]
    planner = _export("planner-sft", demo_threads, tmp_path / "sft")
    critic = _export("critic-sft", demo_threads, tmp_path / "sft")
    [plan] = load_sharegpt(tmp_path / "sft", "sft_planner")
    assert planner.samples == 1 and plan["images"] == []
    # The demo planner's reply is the plan the thread ran.
    plan_read, _ = read_plan(plan["messages"][-1]["content"], input_images=0)
    assert [s.prompt for s in plan_read.steps] == [s.prompt for s in _plan(demo_threads, "demo").steps]
    assert critic.samples == len(load_sharegpt(tmp_path / "sft", "sft_critic")) == len(attempts) > 0
    rl = _export("critic-rl", demo_threads, tmp_path / "rl", labels=_labels(clone))
    records = [json.loads(line) for line in (tmp_path / "rl" / "critic_rl.jsonl").read_text().splitlines()]
    assert rl.samples == len(records) == len(attempts)
    assert all(Path(r["origin_image_path"]).is_file() and Path(r["edited_image_path"]).is_file()
               for r in records)
    assert {(r["evaluation"]["semantics"], r["evaluation"]["quality"]) for r in records} == {(6, 7)}
    _export("grpo", demo_threads, tmp_path / "grpo", labels=_labels(clone))
    dataset = datasets.load_from_disk(str(tmp_path / "grpo"))
    assert len(dataset) == len(attempts) and all(len(row["images"]) == 2 for row in dataset)
