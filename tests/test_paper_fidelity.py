"""Paper fidelity: the official layout end to end, decoding as shipped, and paper mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator, scripted
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, SettingsMismatchError
from interleave_thinker.inspect import athread_report
from interleave_thinker.models.chat_inputs import to_conversation
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.prompts import official
from interleave_thinker.prompts.official import read_official_templates
from interleave_thinker.prompts.packs import OfficialPack
from interleave_thinker.runner import aresume, arun
from interleave_thinker.settings import PAPER_CRITIC, PAPER_GENERATOR, PAPER_PLANNER, load_model_settings
from interleave_thinker.state import RunOptions
from official_clone import CRITIC, GUIDANCE, NARRATIVE, write_clone, write_git_clone

REJECT = "<think>no</think><answer>{'previous_step_success': False, 'refine_prompt': 'try harder'}</answer>"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / "cache"))


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    return write_clone(tmp_path / "InterleaveThinker")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> CliRunner:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    return CliRunner()


def invoke(cli: CliRunner, *args: str) -> tuple[int, str, str]:
    result = cli.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# --- interleave prompts show ---------------------------------------------------------------


def test_prompts_show_gives_the_official_texts_byte_for_byte(cli: CliRunner, clone: Path) -> None:
    spec = f"official:{clone}"
    code, out, _ = invoke(cli, "prompts", "show", "--role", "planner", "--prompts", spec, "--json",
                          "--request", "Teach me to draw an owl both visually and textually.")
    assert code == 0
    assert json.loads(out) == [{"role": "user", "content": [
        {"type": "text", "text": NARRATIVE.replace("{text_input}", "Teach me to draw an owl.")}
    ]}]

    code, out, _ = invoke(cli, "prompts", "show", "--role", "planner", "--prompts", spec, "--json",
                          "--request", "<image> is step one; continue it.", "--image", "one.png")
    filled = GUIDANCE.replace("{text_input}", "<image> is step one; continue it.")
    before, after = filled.split("<image>")
    assert json.loads(out)[0]["content"] == [
        {"type": "text", "text": before}, {"type": "image", "image": "one.png"},
        {"type": "text", "text": after},
    ]

    code, out, _ = invoke(cli, "prompts", "show", "--role", "critic", "--prompts", spec, "--json",
                          "--image", "prev.png", "--image", "cand.png",
                          "--planned-prompt", "a red kite", "--used-prompt", "a red kite, bigger")
    assert code == 0
    expected = CRITIC.replace("{original_instruction}", "a red kite").replace(
        "{rewritten_prompt}", "a red kite, bigger")
    assert json.loads(out) == [{"role": "user", "content": [
        {"type": "image", "image": "prev.png"}, {"type": "image", "image": "cand.png"},
        {"type": "text", "text": expected},
    ]}]


def test_a_clone_missing_a_placeholder_fails_in_one_line(cli: CliRunner, tmp_path: Path) -> None:
    broken = write_clone(tmp_path / "broken", critic="Judge {original_instruction} only.")
    code, out, err = invoke(cli, "run", "A kite.", "--profile", "test", "--prompts", f"official:{broken}")
    assert code == 1 and out == ""
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "lacks the placeholder(s) {rewritten_prompt}" in error[0]
    assert "Traceback" not in err


def test_fetch_official_from_a_local_repository(cli: CliRunner, tmp_path: Path) -> None:
    upstream = write_git_clone(tmp_path / "upstream")
    code, out, err = invoke(cli, "prompts", "fetch-official", "--from", str(upstream))
    assert code == 0, err
    assert (Path(out.strip()) / "UEval" / "system.py").is_file()
    assert "official prompts ready: official:" in err
    code, out, _ = invoke(cli, "prompts", "show", "--prompts", "official", "--json", "--request", "x")
    assert json.loads(out)[0]["content"][0]["text"] == NARRATIVE.replace("{text_input}", "x")


# --- what an in-process model renders ------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoProcessor

    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm

    folder = build_scripted_vlm(tmp_path_factory.mktemp("vlm") / "critic", REJECT)
    return AutoProcessor.from_pretrained(folder)


def _png_block(color: str) -> dict:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buffer, format="PNG")
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}


def test_our_backend_renders_exactly_what_the_official_script_renders(processor, clone: Path) -> None:
    """The official script hands {"type": "image", "image": ...} parts straight to the processor's
    chat template; our backend turns LangChain messages into the same template input."""
    pack = OfficialPack(read_official_templates(clone))
    previous, candidate = Image.new("RGB", (40, 32), "white"), Image.new("RGB", (40, 32), "red")
    ours = pack.critic_messages(step_name="s", instruction="i", planned_prompt="a cat",
                                used_prompt="a cat, sharper", previous_image=_png_block("white"),
                                candidate_image=_png_block("red"))
    conversation, images = to_conversation(ours)
    filled = CRITIC.replace("{original_instruction}", "a cat").replace("{rewritten_prompt}", "a cat, sharper")
    theirs = [{"role": "user", "content": [
        {"type": "image", "image": previous}, {"type": "image", "image": candidate},
        {"type": "text", "text": filled},
    ]}]
    rendered = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered == processor.apply_chat_template(theirs, tokenize=False, add_generation_prompt=True)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 255, 255), (255, 0, 0)]
    # The planner's single text part renders as the official list-of-parts message does.
    planner = pack.planner_messages("Draw a kite.", [], max_steps=None)
    conversation, _ = to_conversation(planner)
    text = NARRATIVE.replace("{text_input}", "Draw a kite.")
    assert processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                      tokenize=False, add_generation_prompt=True)
    )


# --- decoding as shipped -------------------------------------------------------------------


def test_unset_decoding_keeps_the_checkpoints_generation_config(tmp_path: Path) -> None:
    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm
    from interleave_thinker.models.transformers_chat import TransformersChatModel

    folder = build_scripted_vlm(tmp_path / "vlm", REJECT)
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
    config_path.write_text(json.dumps(config))

    def generation(**settings: object):
        model = TransformersChatModel(model_name=str(folder), device="cpu", **settings)
        return model._generation_config(model.loaded)

    shipped = generation()
    assert (shipped.do_sample, shipped.temperature, shipped.top_p, shipped.top_k) == (True, 0.7, 0.8, 20)
    assert generation(temperature=1.0, top_k=5).temperature == 1.0
    assert generation(top_k=5).top_k == 5 and generation(top_k=5).top_p == 0.8
    for greedy in ({"temperature": 0.0}, {"do_sample": False}):
        config = generation(**greedy)
        assert config.do_sample is False and config.temperature is None and config.top_k is None


def test_the_official_pack_raises_the_reply_length_unless_the_user_sets_it(clone: Path) -> None:
    from interleave_thinker.runner import choose_models
    from interleave_thinker.settings import ModelSettings

    # A served generator is built without any network call; the chat models are in-process.
    settings = ModelSettings(planner="/m/p", critic="/m/c", prompts=f"official:{clone}",
                             generator_url="http://127.0.0.1:9/v1")
    _, backends, pack = choose_models("default", None, settings)
    assert isinstance(pack, OfficialPack) and backends.planner.max_new_tokens == 4096
    _, backends, _ = choose_models("default", None, settings.model_copy(update={"max_new_tokens": 512}))
    assert backends.critic.max_new_tokens == 512
    _, backends, _ = choose_models("default", None, settings.model_copy(update={"prompts": "interleave"}))
    assert backends.planner.max_new_tokens == 2048


# --- paper mode ----------------------------------------------------------------------------


def test_paper_mode_needs_the_official_prompts(run_dir: Path) -> None:
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                        generator=RecordingGenerator())
    with pytest.raises(ConfigurationError, match="paper mode needs the official prompts") as caught:
        import asyncio

        asyncio.run(arun("A kite.", backends=backends, options=RunOptions(paper=True), run_dir=run_dir))
    assert "interleave prompts fetch-official" in (caught.value.hint or "")


def test_paper_defaults_to_the_official_scripts_models_each_overridable() -> None:
    settings = load_model_settings(paper=True)
    assert (settings.planner, settings.critic, settings.generator) == (
        PAPER_PLANNER, PAPER_CRITIC, PAPER_GENERATOR)
    assert load_model_settings(paper=True, critic="/my/critic").critic == "/my/critic"
    assert RunOptions(paper=True, max_steps=4).budget.max_attempts == 3
    assert RunOptions(paper=True, budget={"max_attempts": 5}).budget.accept_final_without_critic


async def test_paper_loop_seeds_and_skips_the_critic_on_the_last_try(run_dir: Path, clone: Path) -> None:
    generator = RecordingGenerator()
    planner = StandInPlannerModel()
    # A critic that never accepts and, twice, prints nothing readable: read as a rejection.
    replies = iter(["garbage", "still garbage", "", "?", "no", REJECT, REJECT, REJECT, REJECT])
    critic = scripted(lambda _: next(replies))
    result = await arun(
        "A fox sits. The fox jumps.",
        backends=Backends(planner=planner, critic=critic, generator=generator),
        options=RunOptions(paper=True, width=64, height=64),
        prompts=f"official:{clone}",
        run_dir=run_dir,
    )
    steps = result.document.steps
    assert [step.status for step in steps] == ["forced", "forced"]
    # step position * 100 + try, from 0: the official UEval script's seeds.
    assert [[a.seed for a in step.attempts] for step in steps] == [[100, 101, 102], [200, 201, 202]]
    # The third try of each step is kept without asking the critic.
    assert [[a.critique is not None for a in step.attempts] for step in steps] == [[True, True, False]] * 2
    assert steps[0].attempts[0].critique.success is False
    assert "no readable verdict" in steps[0].attempts[0].critique.reasoning
    # Unreadable replies were sampled again with the same single user turn (5 tries in all).
    assert len(critic.calls) == 5 + 3
    assert all(len(call) == 1 for call in critic.calls)
    assert result.document.text_answer == "A fox sitsThe fox jumps"
    report = await athread_report(result.thread_id, run_dir=run_dir)
    assert report["settings"]["prompts"].startswith("official:")
    assert report["text_answer"] == "A fox sitsThe fox jumps"


async def test_a_resume_with_another_pack_is_refused(run_dir: Path, clone: Path) -> None:
    backends = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                        generator=RecordingGenerator())
    done = await arun("A kite.", backends=backends, options=RunOptions(width=64, height=64),
                      prompts=f"official:{clone}", run_dir=run_dir, thread_id="t1")
    other = write_clone(clone.parent / "other", narrative="Another plan for {text_input}.")
    with pytest.raises(SettingsMismatchError, match="prompts: thread has"):
        await aresume("t1", backends=backends, prompts=f"official:{other}", run_dir=run_dir)
    # The same text in another folder is the same pack.
    copy = shutil.copytree(clone, clone.parent / "copy")
    again = await aresume("t1", backends=backends, prompts=f"official:{copy}", run_dir=run_dir)
    assert again.document == done.document


def test_paper_run_from_the_cli_with_the_test_models(cli: CliRunner, clone: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("INTERLEAVE_TEST_CALL_LOG", str(calls))
    code, _, err = invoke(cli, "run", "A red kite. A blue kite. A green kite.", "--paper",
                          "--profile", "test", "--prompts", f"official:{clone}", "--size", "64x64",
                          "--max-attempts", "2", "--thread", "paper")
    assert code == 0, err
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert all(call["seed"] == call["step"] * 100 + call["attempt"] - 1 for call in logged)
    code, out, _ = invoke(cli, "show", "paper", "--json")
    report = json.loads(out)
    for step in report["steps"]:
        # With two tries allowed, the second is the last: kept without asking the critic.
        attempts = step["attempts"]
        assert len(attempts) == 2 or attempts[0]["critique"]["success"]
        if len(attempts) == 2:
            assert attempts[1]["critique"] is None and step["status"] == "forced"
    assert report["settings"]["options"]["seed_scheme"] == "ueval"
