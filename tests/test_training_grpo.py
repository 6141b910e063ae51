"""A real GRPO step: TRL's GRPOTrainer trains a tiny Qwen3-VL critic on our exported GRPO data
with our reward (redraws by the tiny FLUX.2-klein pipeline, a scripted judge), on the CPU."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from interleave_thinker.evaluation.judge import Judge
from interleave_thinker.training.export import LabelOptions, aexport_training
from interleave_thinker.training.judging import StepJudge, read_step_judge_prompts
from interleave_thinker.training.rewards import TERM_WEIGHTS, CriticReward
from interleave_thinker.training.threads import Selection
from training_fixtures import run_test_threads, scripted_judge, write_judge_prompts

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub traffic: TRL sends telemetry unless the Hub is off (huggingface_hub reads the
    variables once, at import, so its constants are set too)."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_critic_grpo.py"


def _example() -> Any:
    """examples/train_critic_grpo.py as a module."""
    spec = importlib.util.spec_from_file_location("train_critic_grpo", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_defaults_to_the_papers_settings(tmp_path: Path) -> None:
    config = _example().grpo_config(tmp_path, use_cpu=True)
    assert (config.num_generations, config.temperature, config.learning_rate, config.beta) == (
        8, 1.0, 2e-6, 0.0)
    assert config.per_device_train_batch_size == 8


class Recorded:
    """Wraps a TRL reward function and keeps every list it returned."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__name__ = func.__name__
        self.returned: list[list[float | None]] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        result = self.func(*args, **kwargs)
        values = await result if asyncio.iscoroutine(result) else result
        self.returned.append(list(values))
        return values


def test_grpo_trainer_runs_two_steps_with_our_rewards(run_dir: Path, tmp_path: Path) -> None:
    from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein
    from interleave_thinker.demo.tiny_vlm import build_tiny_qwen3_vl
    from interleave_thinker.generators.diffusers_backend import DiffusersGenerator

    started = time.monotonic()
    clone = write_judge_prompts(tmp_path / "official")
    # FLUX.2-klein refuses source images under 64 px: the input image is 64x64.
    run_test_threads(run_dir, tmp_path, image_size=(64, 64))
    # The judge labels every edit a failure (semantics 6 < 7): every completion is redrawn.
    labels = LabelOptions(judge=StepJudge(Judge(scripted_judge(), retry_delay=0),  # type: ignore[arg-type]
                                          read_step_judge_prompts(clone)),
                          success_from="judge", success_threshold=7)
    asyncio.run(aexport_training("grpo", Selection(all=True), tmp_path / "grpo", run_dir=run_dir,
                                 labels=labels))
    dataset = datasets.load_from_disk(str(tmp_path / "grpo"))
    assert len(dataset) >= 2 and not any(dataset["success"])

    model = build_tiny_qwen3_vl(tmp_path / "critic", seed=0)
    generator = DiffusersGenerator(model=build_tiny_flux2_klein(tmp_path / "klein"), device="cpu",
                                   dtype="float32", steps=2, guidance=1.0)
    judge = Judge(scripted_judge(semantic='{"score": [8, 9]}', quality='{"score": [5, 6]}'), retry_delay=0)
    reward = CriticReward(generator, judge, clone, width=64, height=64, work_dir=tmp_path / "work",
                          progress=False)
    overall = Recorded(reward.trl_reward_funcs()[0])
    # The example's own wiring: its GRPOConfig (paper settings but a group of 2) and trainer.
    example = _example()
    config = example.grpo_config(tmp_path / "out", num_generations=2, max_steps=2, max_completion_length=16,
                                 use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    assert (config.learning_rate, config.beta, config.temperature) == (2e-6, 0.0, 1.0)
    trainer = example.build_trainer(model, dataset, [overall], config)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "rewards/critic_overall/mean" in entry]
    assert len(logs) == 2 and trainer.state.global_step == 2
    for entry, returned in zip(logs, overall.returned, strict=True):
        assert math.isfinite(entry["reward"]) and math.isfinite(entry["rewards/critic_overall/mean"])
        assert entry["rewards/critic_overall/mean"] == pytest.approx(sum(returned) / len(returned), abs=1e-6)
        # The terms the reward logged as metrics.
        assert {"critic/format", "critic/semantic_gain", "critic/quality_gain"} <= set(entry)
    # A random tiny model writes no well-formed verdict: format and accuracy are 0, so each total
    # is 0.5·(0.6·gain(8, SC label) + 0.2·gain(5, PQ label)), the labels being the export's 6 and 7.
    expected = 0.5 * (0.6 * ((8 - 6) / 10 + 1) / 2 + 0.2 * ((5 - 7) / 10 + 1) / 2)
    assert all(value == pytest.approx(expected) for batch in overall.returned for value in batch)
    assert reward.stats.redraws >= 1 and reward.stats.redraw_failures == 0
    assert reward.stats.judge_failures == 0 and sum(TERM_WEIGHTS) == pytest.approx(1.0)
    print(f"GRPO test took {time.monotonic() - started:.1f}s")


def test_the_example_runs_offline(tmp_path: Path) -> None:
    """``python examples/train_critic_grpo.py --demo``: threads, export, one GRPO step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--demo", "--max-steps", "1", "--out",
                           str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 steps; mean reward per step: 0.200" in done.stderr
    assert "0 without a score" in done.stderr and (tmp_path / "demo" / "grpo-data" / "state.json").is_file()
