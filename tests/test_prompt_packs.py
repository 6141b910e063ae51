"""Prompt packs: our own layout, the official one read from a clone, and choosing between them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.prompts import official, packs
from interleave_thinker.prompts.official import read_official_templates
from interleave_thinker.prompts.packs import (
    InterleavePack,
    OfficialPack,
    PromptPackWarning,
    messages_as_json,
    resolve_prompt_pack,
)
from official_clone import CRITIC, GUIDANCE, NARRATIVE, write_clone, write_git_clone

PREVIOUS = {"type": "image", "image": "before.png"}
CANDIDATE = {"type": "image", "image": "after.png"}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(official.CACHE_DIR_ENV, str(cache))
    monkeypatch.setattr(packs, "_warned", False)
    return cache


@pytest.fixture
def pack(tmp_path: Path) -> OfficialPack:
    return OfficialPack(read_official_templates(write_clone(tmp_path / "clone")))


# --- the official layout --------------------------------------------------------------------


def test_official_planner_is_one_user_turn_with_the_template_filled_by_replace(pack: OfficialPack):
    request = "Show how to fold a boat both visually and textually, with {braces} kept."
    messages = pack.planner_messages(request, [], max_steps=None)
    expected = NARRATIVE.replace(
        "{text_input}", "Show how to fold a boat, with {braces} kept."
    )
    assert messages_as_json(messages) == [
        {"role": "user", "content": [{"type": "text", "text": expected}]}
    ]
    assert not any(isinstance(m, SystemMessage) for m in messages)


def test_official_guidance_puts_each_image_at_its_placeholder(pack: OfficialPack):
    images = [{"type": "image", "image": f"{n}.png"} for n in (1, 2)]
    messages = pack.planner_messages("First <image> then <IMAGE>: what next?", images, max_steps=5)
    filled = GUIDANCE.replace("{text_input}", "First <image> then <IMAGE>: what next?")
    before, rest = filled.split("<image>", 1)
    middle, after = rest.split("<IMAGE>", 1)
    assert messages_as_json(messages)[0]["content"] == [
        {"type": "text", "text": before},
        images[0],
        {"type": "text", "text": middle},
        images[1],
        {"type": "text", "text": after},
    ]


def test_official_guidance_with_five_images_shrinks_each_to_384_squared(pack: OfficialPack):
    images = [{"type": "image", "image": f"{n}.png"} for n in range(5)]
    content = messages_as_json(
        pack.planner_messages("<image>" * 5 + " continue", images, max_steps=None)
    )[0]["content"]
    shown = [part for part in content if part["type"] == "image"]
    assert [part["image"] for part in shown] == [f"{n}.png" for n in range(5)]
    assert all(part["max_pixels"] == 384 * 384 for part in shown)


def test_official_guidance_without_placeholders_keeps_every_image(pack: OfficialPack):
    images = [{"type": "image", "image": f"{n}.png"} for n in (1, 2)]
    content = messages_as_json(pack.planner_messages("What happens next?", images, max_steps=None))[0][
        "content"
    ]
    assert [part for part in content if part["type"] == "image"] == images


def test_official_critic_sends_both_images_first_then_the_filled_template(pack: OfficialPack):
    messages = pack.critic_messages(
        step_name="Rain",
        instruction="Rain falls.",
        planned_prompt="add rain",
        used_prompt="add heavy rain, keep the boat",
        previous_image=PREVIOUS,
        candidate_image=CANDIDATE,
    )
    expected = CRITIC.replace("{original_instruction}", "add rain").replace(
        "{rewritten_prompt}", "add heavy rain, keep the boat"
    )
    assert messages_as_json(messages) == [
        {"role": "user", "content": [PREVIOUS, CANDIDATE, {"type": "text", "text": expected}]}
    ]
    assert pack.prompts_from_messages(messages) == ("add rain", "add heavy rain, keep the boat")


def test_official_pack_resamples_instead_of_reasking(pack: OfficialPack):
    assert pack.reask_message("no dict", what="plan") is None
    assert pack.resample_unreadable and pack.default_max_new_tokens == 4096


def test_stand_ins_can_read_the_request_back_from_either_layout(pack: OfficialPack):
    for chosen in (pack, InterleavePack()):
        messages = chosen.planner_messages("A fox. A hen?", [], max_steps=None)
        assert chosen.request_from_messages(messages) == "A fox. A hen?"


def test_identity_is_a_digest_of_the_text_not_the_path(tmp_path: Path):
    one = OfficialPack(read_official_templates(write_clone(tmp_path / "a")))
    two = OfficialPack(read_official_templates(write_clone(tmp_path / "b")))
    other = OfficialPack(read_official_templates(write_clone(tmp_path / "c", critic=CRITIC + "!")))
    assert one.identity == two.identity != other.identity
    assert one.identity.startswith("official:")


# --- reading a clone ------------------------------------------------------------------------


def test_the_prompt_file_is_parsed_never_executed(tmp_path: Path):
    # The synthetic file raises SystemExit at import: reading it must not run it.
    texts = read_official_templates(write_clone(tmp_path / "clone"))
    assert texts.narrative == NARRATIVE and texts.critic == CRITIC


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        (
            {"narrative": "no slot here"},
            "NARRATIVE_PROMPT_JSON in .* lacks the placeholder\\(s\\) \\{text_input\\}",
        ),
        ({"critic": "only {original_instruction}"}, "lacks the placeholder\\(s\\) \\{rewritten_prompt\\}"),
    ],
)
def test_a_template_missing_a_placeholder_is_one_clear_error(tmp_path: Path, templates, message):
    with pytest.raises(ConfigurationError, match=message) as caught:
        read_official_templates(write_clone(tmp_path / "clone", **templates))
    assert "system.py" in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_that_is_no_clone_is_refused_with_the_fetch_command(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="does not exist") as caught:
        read_official_templates(tmp_path)
    assert "interleave prompts fetch-official" in (caught.value.hint or "")


def test_a_constant_that_is_not_a_string_literal_is_missing(tmp_path: Path):
    clone = write_clone(tmp_path / "clone")
    path = clone / "UEval" / "system.py"
    path.write_text(path.read_text().replace("GUIDANCE_GLOBAL_PROMPT_JSON =", "GUIDANCE = "))
    path.write_text(path.read_text() + "\nGUIDANCE_GLOBAL_PROMPT_JSON = make_prompt()\n")
    with pytest.raises(ConfigurationError, match="defines no string constant GUIDANCE_GLOBAL_PROMPT_JSON"):
        read_official_templates(clone)


# --- choosing a pack ------------------------------------------------------------------------


def test_explicit_specs(tmp_path: Path):
    clone = write_clone(tmp_path / "clone")
    assert isinstance(resolve_prompt_pack("interleave"), InterleavePack)
    chosen = resolve_prompt_pack(f"official:{clone}")
    assert isinstance(chosen, OfficialPack) and chosen.source == clone
    with pytest.raises(ConfigurationError, match="unknown prompt pack"):
        resolve_prompt_pack("mine")
    with pytest.raises(ConfigurationError, match="no clone of the official repository was fetched"):
        resolve_prompt_pack("official")


def test_auto_gives_our_prompts_to_other_models_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = resolve_prompt_pack(None, planner="Qwen/Qwen3-VL-8B-Instruct", critic="openai:gpt-5")
    assert isinstance(chosen, InterleavePack)


def test_auto_warns_once_when_checkpoints_cannot_get_their_prompts():
    with pytest.warns(PromptPackWarning, match="interleave prompts fetch-official"):
        resolve_prompt_pack(None, planner="InterleaveThinker/InterleaveThinker-Planner-8B")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = resolve_prompt_pack(None, critic="/m/Critic-SFT-8B-InterleaveThinker")
    assert isinstance(chosen, InterleavePack)


def test_fetch_official_clones_checks_and_records(tmp_path: Path):
    source = write_git_clone(tmp_path / "upstream")
    target, texts = official.fetch_official(str(source))
    assert (target / "UEval" / "system.py").is_file() and texts.guidance == GUIDANCE
    assert official.recorded_clone() == target
    # From now on the checkpoints get the official pack without being asked.
    chosen = resolve_prompt_pack(None, planner="InterleaveThinker/InterleaveThinker-Planner-8B")
    assert isinstance(chosen, OfficialPack)
    assert isinstance(resolve_prompt_pack("official"), OfficialPack)


def test_a_failed_fetch_keeps_the_working_clone(tmp_path: Path):
    good = write_git_clone(tmp_path / "good")
    target, _ = official.fetch_official(str(good))
    broken = write_git_clone(tmp_path / "broken", narrative="no placeholder")
    with pytest.raises(ConfigurationError, match="lacks the placeholder"):
        official.fetch_official(str(broken))
    with pytest.raises(ConfigurationError, match="git could not clone"):
        official.fetch_official(str(tmp_path / "nothing-here"))
    assert official.recorded_clone() == target
    assert read_official_templates(target).narrative == NARRATIVE


def test_our_pack_leaves_the_step_limit_out_unless_one_is_set():
    unlimited = InterleavePack().planner_messages("A fox.", [], max_steps=None)
    limited = InterleavePack().planner_messages("A fox.", [], max_steps=7)
    assert "at most" not in unlimited[0].content and "Write at most 7 steps." in limited[0].content
    assert isinstance(unlimited[1], HumanMessage)
