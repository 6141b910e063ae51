"""The paper's critic reward: each term on hand-computed cases, the redraw and judge wiring, the
TRL functions and EasyR1's compute_score, and failures that are counted instead of raised."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from conftest import RecordingGenerator
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.judge import Judge, UnreadableReply
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.training.judging import parse_scores, read_step_judge_prompts
from interleave_thinker.training.rewards import (
    TERM_WEIGHTS,
    CriticReward,
    Label,
    RewardSample,
    accuracy_reward,
    compute_score,
    critic_accuracy,
    critic_format,
    format_reward,
    gain,
    overall_reward,
    read_reply,
)
from training_fixtures import QUALITY_MARK, SEMANTIC_MARK, message_text, scripted_judge, write_judge_prompts

REJECT = "<think>The hat is missing.</think>\n<answer>{'previous_step_success': False, " \
         "'refine_prompt': 'add a red hat to the cat'}</answer>"
ACCEPT = "<think>All there.</think>\n<answer>{'previous_step_success': True, " \
         "'refine_prompt': 'a cat'}</answer>"


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    return write_judge_prompts(tmp_path / "official")


def _reward(clone: Path, tmp_path: Path, generator: object | None = None, **judge_kwargs: object
            ) -> CriticReward:
    judge = Judge(scripted_judge(**judge_kwargs), retry_delay=0)  # type: ignore[arg-type]
    return CriticReward(generator or RecordingGenerator(), judge, clone, width=64, height=64,
                        work_dir=tmp_path / "work", progress=False)


def _origin(tmp_path: Path, colour: str = "orange") -> Path:
    path = tmp_path / f"{colour}.png"
    Image.new("RGB", (64, 64), colour).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# The terms


def test_the_papers_seventy_percent_case() -> None:
    """Well-formed, but wrong on a success label: 0.5·1 + 0.5·(0.2·0 + 0.6·0.5 + 0.2·0.5) = 0.7."""
    assert format_reward(REJECT) == 1.0
    assert accuracy_reward(REJECT, True) == 0.0
    assert overall_reward(1.0, 0.0, 0.5, 0.5) == pytest.approx(0.7)


def test_hand_computed_totals() -> None:
    assert overall_reward(1.0, 1.0, 0.5, 0.5) == pytest.approx(0.8)   # right on a success label
    assert overall_reward(0.0, 0.0, 0.5, 0.5) == pytest.approx(0.2)   # unreadable, success label
    # Failure label (semantics 4, quality 6) and a redraw judged SC 6, PQ 7:
    assert gain(6, 4) == pytest.approx(0.6) and gain(7, 6) == pytest.approx(0.55)
    assert overall_reward(1.0, 1.0, 0.6, 0.55) == pytest.approx(0.5 + 0.5 * (0.2 + 0.36 + 0.11))
    assert gain(0, 10) == 0.0 and gain(10, 0) == 1.0 and gain(5, 5) == 0.5
    # The TRL term weights add up to the same total.
    terms = (1.0, 1.0, 0.6, 0.55)
    weighted = sum(w * t for w, t in zip(TERM_WEIGHTS, terms, strict=True))
    assert weighted == pytest.approx(overall_reward(*terms))


@pytest.mark.parametrize(("reply", "expected"), [
    (REJECT, 1.0),
    (ACCEPT, 1.0),
    ("<answer>{'previous_step_success': False, 'refine_prompt': 'x'}</answer>", 1.0),  # no think
    ('<think>a</think><answer>{"previous_step_success": false, "refine_prompt": "x"}</answer>', 1.0),
    ("< think >a</ think >< answer >{'previous_step_success': True, 'refine_prompt': 'x'}</ answer >", 1.0),
    ("<answer>{'previous_step_success': True, 'refine_prompt': 'x'}</answer><think>late</think>", 0.0),
    ("<think>a</think>{'previous_step_success': True, 'refine_prompt': 'x'}", 0.0),  # no answer tags
    ("<think>a</think><answer>{'previous_step_success': 'false', 'refine_prompt': 'x'}</answer>", 0.0),
    ("<think>a</think><answer>{'previous_step_success': False, 'refine_prompt': None}</answer>", 0.0),
    ("<think>a</think><answer>{'previous_step_success': False}</answer>", 0.0),
    ("<think>a</think><answer></answer>", 0.0),
    ("<think>a</think><answer>yes</answer>", 0.0),
    ("", 0.0),
])
def test_format_reward(reply: str, expected: float) -> None:
    assert format_reward(reply) == expected


def test_accuracy_compares_the_answer_with_the_label() -> None:
    assert accuracy_reward(REJECT, False) == 1.0 and accuracy_reward(REJECT, True) == 0.0
    assert accuracy_reward(ACCEPT, True) == 1.0
    # The official reward compares with ==: a missing key or a word never matches.
    assert accuracy_reward("<answer>{'refine_prompt': 'x'}</answer>", False) == 0.0
    assert accuracy_reward("<answer>{'previous_step_success': 'False'}</answer>", False) == 0.0
    assert accuracy_reward("no answer", False) == 0.0
    # Accuracy does not need the format: the answer is read alone.
    late = "<answer>{'previous_step_success': False, 'refine_prompt': 'x'}</answer><think>late</think>"
    assert accuracy_reward(late, False) == 1.0 and format_reward(late) == 0.0


def test_redraw_prompt_falls_back_to_the_previous_prompt() -> None:
    assert read_reply(REJECT).redraw_prompt("old") == "add a red hat to the cat"
    for reply in ("<answer>{'previous_step_success': False, 'refine_prompt': ''}</answer>",
                  "<answer>{'previous_step_success': False, 'refine_prompt': None}</answer>", "garbage"):
        assert read_reply(reply).redraw_prompt("old") == "old"


def test_judge_scores_are_read_like_the_official_scorer() -> None:
    assert parse_scores('{"score": [6, 8], "reasoning": "fine"}') == 6
    assert parse_scores('||V^=^V||{"score": [3, 9], "reasoning": "x"}||V^=^V||') == 3
    assert parse_scores("[5, 2]") == 2 and parse_scores("7") == 7
    for bad in ("I cannot tell", '{"score": [11]}', '{"score": []}', '{"score": ["high"]}'):
        with pytest.raises(UnreadableReply):
            parse_scores(bad)


def test_judge_prompts_come_from_the_clone(clone: Path, tmp_path: Path) -> None:
    prompts = read_step_judge_prompts(clone)
    assert "add a hat" in prompts.semantic_text("add a hat") and SEMANTIC_MARK in prompts.semantic_text("x")
    assert QUALITY_MARK in prompts.quality_text()
    with pytest.raises(ConfigurationError, match=r"vie_prompts\.py does not exist"):
        read_step_judge_prompts(tmp_path)
    broken = clone / "train" / "EasyR1" / "viescore" / "vie_prompts.py"
    broken.write_text(broken.read_text().replace("<instruction>", "INSTRUCTION"))
    with pytest.raises(ConfigurationError, match="lacks <instruction>"):
        read_step_judge_prompts(clone)


def test_no_clone_no_judge_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError, match="none was fetched"):
        read_step_judge_prompts(None)


# ---------------------------------------------------------------------------------------------
# Redraws and the judge


def test_success_labels_are_not_redrawn(clone: Path, tmp_path: Path) -> None:
    generator = RecordingGenerator()
    reward = _reward(clone, tmp_path, generator)
    sample = RewardSample(REJECT, Label(True, 7, 8), _origin(tmp_path), "a cat", "a cat")
    [result] = reward.score([sample])
    assert (result.format, result.accuracy, result.semantic, result.quality) == (1.0, 0.0, 0.5, 0.5)
    assert result.overall == pytest.approx(0.7)
    assert generator.jobs == [] and reward.judge.calls == 0


def test_failure_labels_are_redrawn_with_the_refined_prompt_and_judged(clone: Path, tmp_path: Path) -> None:
    generator = RecordingGenerator()
    seen: list[str] = []
    reward = _reward(clone, tmp_path, generator, on_call=lambda messages: seen.append(message_text(messages)))
    origin = _origin(tmp_path)
    samples = [RewardSample(REJECT, Label(False, 4, 6), origin, "a cat in a red hat", "a cat")] * 8
    results = reward.score(samples)
    # A group of identical replies is drawn and judged once.
    assert len(generator.jobs) == 1 and reward.judge.calls == 2
    job = generator.jobs[0]
    assert (job.prompt, job.seed, job.width, job.height) == ("add a red hat to the cat", 0, 64, 64)
    assert len(job.source_images) == 1 and job.source_images[0].getpixel((0, 0)) == (255, 165, 0)
    # The judge's instruction is the planned prompt.
    assert any("a cat in a red hat" in text and SEMANTIC_MARK in text for text in seen)
    result = results[0]
    assert (result.semantic, result.quality) == (pytest.approx(0.6), pytest.approx(0.55))
    assert result.overall == pytest.approx(0.5 + 0.5 * (0.2 + 0.36 + 0.11))
    assert reward.stats.redraws == 1 and reward.stats.samples == 8
    # Remembered: the next batch asks nobody.
    reward.score(samples[:1])
    assert len(generator.jobs) == 1 and reward.judge.calls == 2


def test_a_white_canvas_is_drawn_from_text(clone: Path, tmp_path: Path) -> None:
    generator = RecordingGenerator()
    reward = _reward(clone, tmp_path, generator)
    reward.score([RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path, "white"), "a cat", "a cat")])
    assert generator.jobs[0].source_images == ()


class FailingGenerator(RecordingGenerator):
    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.jobs.extend(jobs)
        if any("explode" in job.prompt for job in jobs):
            raise RuntimeError("the pipeline ran out of memory")
        return await super().agenerate(jobs)


def test_a_failed_redraw_gives_the_neutral_gain(clone: Path, tmp_path: Path) -> None:
    reward = _reward(clone, tmp_path, FailingGenerator())
    bad = REJECT.replace("add a red hat to the cat", "explode")
    results = reward.score([
        RewardSample(bad, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat"),
        RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat"),
    ])
    assert results[0].redraw_failed and (results[0].semantic, results[0].quality) == (0.5, 0.5)
    assert results[0].overall == pytest.approx(0.5 + 0.5 * (0.2 + 0.4))
    # The other job of the batch was drawn on its own and judged.
    assert not results[1].redraw_failed and results[1].semantic == pytest.approx(0.6)
    assert reward.stats.redraw_failures == 1


def test_a_judge_failure_gives_none_and_is_counted(clone: Path, tmp_path: Path) -> None:
    reward = _reward(clone, tmp_path, quality="I would rather not say.")
    [result] = reward.score([RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat")])
    assert result.judge_failed and result.overall is None and result.semantic is None
    assert (result.format, result.accuracy) == (1.0, 1.0)
    assert reward.stats.judge_failures == 1 and "unreadable" in reward.stats.last_errors[-1]


def test_a_broken_judge_never_raises(clone: Path, tmp_path: Path) -> None:
    from conftest import scripted

    class AuthenticationError(Exception):
        """Named like the OpenAI SDK's: the judge refuses every call."""

    def broken(_: object) -> str:
        raise RuntimeError("connection refused")

    def refused(_: object) -> str:
        raise AuthenticationError("bad key")

    sample = RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path), "c", "c")
    reward = CriticReward(RecordingGenerator(), Judge(scripted(broken), attempts=2, retry_delay=0), clone,
                          width=64, height=64, progress=False)
    [result] = reward.score([sample])
    assert result.overall is None and reward.stats.judge_failures == 1
    assert "connection refused" in result.error
    reward = CriticReward(RecordingGenerator(), Judge(scripted(refused), retry_delay=0), clone,
                          width=64, height=64, progress=False)
    with pytest.warns(RuntimeWarning, match="judge failed"):
        [result] = reward.score([sample])
    assert result.overall is None and reward.stats.judge_failures == 1 and "bad key" in result.error


# ---------------------------------------------------------------------------------------------
# TRL and EasyR1


def _trl_kwargs(tmp_path: Path, n: int, success: bool = False) -> dict[str, list]:
    origin = Image.open(_origin(tmp_path))
    return {
        "images": [[origin, origin]] * n,
        "origin_prompt": ["a cat in a red hat"] * n,
        "rewritten_prompt": ["a cat"] * n,
        "success": [success] * n,
        "semantics": [4.0] * n,
        "quality": [6.0] * n,
        "origin_blank": [False] * n,
    }


def test_trl_functions(clone: Path, tmp_path: Path) -> None:
    generator = RecordingGenerator()
    reward = _reward(clone, tmp_path, generator)
    completions = [[{"role": "assistant", "content": REJECT}], [{"role": "assistant", "content": "oops"}]]
    kwargs = _trl_kwargs(tmp_path, 2)
    assert critic_format([None, None], completions, **kwargs) == [1.0, 0.0]
    assert critic_accuracy([None, None], completions, **kwargs) == [1.0, 0.0]
    metrics: dict[str, float] = {}
    [overall] = reward.trl_reward_funcs()
    assert overall.__name__ == "critic_overall"
    totals = asyncio.run(overall([None, None], completions, log_metric=metrics.__setitem__, **kwargs))
    assert totals[0] == pytest.approx(0.5 + 0.5 * (0.2 + 0.36 + 0.11))
    # "oops" is redrawn with the previous prompt: a second redraw.
    assert totals[1] == pytest.approx(0.5 * (0.36 + 0.11))
    assert metrics["critic/format"] == 0.5 and metrics["critic/judge_failures"] == 0.0
    # The two gain functions run at once on one batch and share each redraw.
    funcs = reward.trl_term_funcs()
    assert [getattr(f, "__name__", "") for f in funcs] == [
        "critic_format", "critic_accuracy", "critic_semantic_gain", "critic_quality_gain"]
    fresh = _reward(clone, tmp_path, RecordingGenerator())
    semantic, quality = fresh.trl_term_funcs()[2:]

    async def both() -> list[list[float | None]]:
        return await asyncio.gather(semantic([None, None], completions, **kwargs),
                                    quality([None, None], completions, **kwargs))

    sem, qual = asyncio.run(both())
    assert sem == [pytest.approx(0.6)] * 2 and qual == [pytest.approx(0.55)] * 2
    assert len(fresh.generator.jobs) == 2 and fresh.judge.calls == 4  # type: ignore[attr-defined]


def test_trl_overall_is_none_when_the_judge_fails(clone: Path, tmp_path: Path) -> None:
    reward = _reward(clone, tmp_path, quality="no")
    completions = [[{"role": "assistant", "content": REJECT}]]
    [overall] = reward.trl_reward_funcs()
    assert asyncio.run(overall([None], completions, **_trl_kwargs(tmp_path, 1))) == [None]


def test_trl_needs_the_label_columns(clone: Path, tmp_path: Path) -> None:
    [overall] = _reward(clone, tmp_path).trl_reward_funcs()
    with pytest.raises(ConfigurationError, match="dataset columns"):
        asyncio.run(overall([None], ["x"], images=[[None]]))


def test_compute_score_for_easyr1(clone: Path, tmp_path: Path) -> None:
    reward = _reward(clone, tmp_path)
    origin = str(_origin(tmp_path))
    inputs = [
        {"response": REJECT, "ground_truth": {"semantics": 4, "quality": 6, "success": False},
         "origin_prompt": "a cat in a red hat", "origin_image_path": origin, "previous_prompt": "a cat"},
        {"response": REJECT, "ground_truth": {"semantics": 7, "quality": 7, "success": True},
         "origin_prompt": "a cat", "origin_image_path": origin, "previous_prompt": "a cat"},
    ]
    scores = compute_score(inputs, reward=reward)
    assert scores[0]["overall"] == pytest.approx(0.835)
    assert scores[0]["edited_image_reward_semantic"] == pytest.approx(0.6)
    assert scores[1] == {
        "overall": pytest.approx(0.7), "format_reward": 1.0, "judge_accuracy_reward": 0.0,
        "edited_image_reward_semantic": 0.5, "edited_image_reward_quality": 0.5,
        "redraw_failed": 0.0, "judge_failed": 0.0,
    }
    # A second call reuses the reward's loop (the judge's semaphore is bound to it).
    assert compute_score(inputs, reward=reward)[0]["overall"] == pytest.approx(0.835)
    # A judge failure is a number for EasyR1: the neutral gain, flagged.
    failing = _reward(clone, tmp_path, quality="no")
    [flagged] = compute_score(inputs[:1], reward=failing)
    assert flagged["judge_failed"] == 1.0 and flagged["edited_image_reward_semantic"] == 0.5
    assert all(math.isfinite(value) for value in flagged.values())


def test_compute_score_without_a_judge_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from interleave_thinker.training import rewards

    monkeypatch.delenv("INTERLEAVE_REWARD_JUDGE", raising=False)
    rewards.set_default_reward(None)
    with pytest.raises(ConfigurationError, match="INTERLEAVE_REWARD_JUDGE"):
        compute_score([])


# ---------------------------------------------------------------------------------------------
# Progress


class RecordingBars:
    """Stands in for ``training.progress.Bars``: keeps each bar's total and count."""

    made: ClassVar[list[RecordingBars]] = []

    def __init__(self, *, enabled: bool = True, transient: bool = False, console: object = None) -> None:
        self.enabled, self.transient = enabled, transient
        self.bars: dict[str, list[int | None]] = {}
        RecordingBars.made.append(self)

    def __enter__(self) -> RecordingBars:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add(self, description: str, total: int | None = None) -> object:
        counts = self.bars[description] = [total, 0]

        class Line:
            def advance(self, amount: int = 1) -> None:
                counts[1] = (counts[1] or 0) + amount

            def total(self, value: int | None) -> None:
                counts[0] = value

            def grow(self, amount: int = 1) -> None:
                counts[0] = (counts[0] or 0) + amount

            def note(self, text: str) -> None:
                return None

        return Line()


def test_redraws_and_judge_calls_are_shown_on_bars(clone: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import interleave_thinker.training.rewards as rewards_module

    RecordingBars.made = []
    monkeypatch.setattr(rewards_module, "Bars", RecordingBars)
    judge = Judge(scripted_judge(), retry_delay=0)  # type: ignore[arg-type]
    reward = CriticReward(FailingGenerator(), judge, clone, width=64, height=64, work_dir=tmp_path / "w")
    bad = REJECT.replace("add a red hat to the cat", "explode")
    reward.score([RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat"),
                  RewardSample(bad, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat"),
                  RewardSample(REJECT, Label(True, 4, 6), _origin(tmp_path), "a cat", "a cat")])
    [bars] = RecordingBars.made
    assert bars.enabled and bars.transient
    # Two redraws (the success label is not redrawn), one failed; two judge questions for each
    # redraw, the failed one's counted as done without a call.
    assert bars.bars == {"critic reward: redraws": [2, 2], "critic reward: judge calls": [4, 4]}
    assert reward.judge.calls == 2
    # Nothing to redraw, no bars; progress=False, bars that draw nothing.
    reward.score([RewardSample(REJECT, Label(True, 4, 6), _origin(tmp_path), "a cat", "a cat")])
    assert len(RecordingBars.made) == 1
    quiet = _reward(clone, tmp_path)
    quiet.score([RewardSample(REJECT, Label(False, 4, 6), _origin(tmp_path), "a cat", "a cat")])
    assert not RecordingBars.made[-1].enabled
