"""Train the critic with GRPO on TRL, rewarded by the paper's critic reward.

The data is the folder ``interleave export training grpo`` writes (conversational prompts in the
critic's layout, an ``images`` column, and each sample's label); the reward is
``interleave_thinker.training.rewards.CriticReward``: format, accuracy and the step-wise gains,
which redraw the image with the critic's refined prompt on any project generator backend and
ask a judge model about the new image. The paper's settings are the defaults: 8 generations per
prompt, temperature 1.0, learning rate 2e-6, no KL term (beta 0).

Real run (a GPU; Qwen3-VL-8B-Instruct as the base, a served judge, FLUX.2-klein for redraws)::

    interleave export training grpo --all --out grpo-data --judge Qwen/Qwen3-VL-30B-A3B-Instruct \\
        --judge-url http://localhost:8001/v1
    python examples/train_critic_grpo.py grpo-data --model Qwen/Qwen3-VL-8B-Instruct \\
        --judge Qwen/Qwen3-VL-30B-A3B-Instruct --judge-url http://localhost:8001/v1 --out critic-grpo

Offline smoke run on the CPU in under a minute (``--demo``): two threads of the ``test``
profile, exported with a tiny scripted judge, then two optimisation steps of a tiny random
Qwen3-VL with redraws by a tiny FLUX.2-klein. The demo's judge questions are stand-ins in our
own words (the real ones are read from your clone of the official repository).

Needs ``pip install -e '.[train,diffusers,transformers]'`` (torch first).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The paper's GRPO settings for the critic.
PAPER_SETTINGS = {"num_generations": 8, "temperature": 1.0, "learning_rate": 2e-6, "beta": 0.0}


def grpo_config(
    output_dir: str | os.PathLike[str],
    *,
    num_generations: int = 8,
    temperature: float = 1.0,
    learning_rate: float = 2e-6,
    beta: float = 0.0,
    batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    max_steps: int = -1,
    epochs: float = 1.0,
    max_completion_length: int = 1024,
    use_cpu: bool = False,
    bf16: bool | None = None,
    seed: int = 0,
    report_to: Sequence[str] = (),
    **extra: Any,
) -> Any:
    """TRL's GRPOConfig with the paper's settings by default. ``batch_size`` (completions per
    device and step) defaults to one group: ``num_generations``."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        num_generations=num_generations,
        temperature=temperature,
        learning_rate=learning_rate,
        beta=beta,
        per_device_train_batch_size=batch_size or num_generations,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=max_steps,
        num_train_epochs=epochs,
        max_completion_length=max_completion_length,
        use_cpu=use_cpu,
        bf16=(not use_cpu) if bf16 is None else bf16,
        seed=seed,
        report_to=list(report_to),
        logging_steps=1,
        **extra,
    )


def build_trainer(model: str | os.PathLike[str], dataset: Any, reward_funcs: list[Any], config: Any, *,
                  lora: bool = False) -> Any:
    """A GRPOTrainer for ``model`` (a hub id or folder) on the exported dataset, with our reward
    functions (``CriticReward.trl_reward_funcs()``); ``lora`` trains LoRA adapters (peft)."""
    from trl import GRPOTrainer

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    return GRPOTrainer(model=str(model), reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                       peft_config=peft_config)


def real_reward(args: argparse.Namespace) -> Any:
    """The reward with the judge and generator the options name (see ``reward_from_env``)."""
    from interleave_thinker.training.rewards import reward_from_env

    env = {"INTERLEAVE_REWARD_JUDGE": args.judge, "INTERLEAVE_REWARD_SIZE": args.size,
           "INTERLEAVE_REWARD_DEVICE": args.device}
    for name, value in (("JUDGE_URL", args.judge_url), ("GENERATOR", args.generator),
                        ("GENERATOR_URL", args.generator_url), ("PROMPTS", args.judge_prompts)):
        if value:
            env[f"INTERLEAVE_REWARD_{name}"] = str(value)
    return reward_from_env(env)


# ---------------------------------------------------------------------------------------------
# --demo: everything tiny and offline

DEMO_STORIES = (
    "A girl plants a seed. It rains. A sprout appears. Is it a sunflower? It blooms.",
    "A kite rises over a beach. The wind drops. The kite lands on the sand.",
)
# The tiny judge answers every question with this: 6 (the smallest score counts).
DEMO_JUDGE_REPLY = '{"score": [6, 9], "reasoning": "demo judge"}'


def demo_judge_prompts(folder: Path) -> Any:
    """Stand-in judge questions for the demo, in our own words."""
    from interleave_thinker.training.judging import StepJudgePrompts

    return StepJudgePrompts(
        context="(demo) You rate pictures made by an image model. Reply with "
                '{"score": [numbers from 0 to 10], "reasoning": "..."}.',
        two_image_rule="(demo) The first picture is the one before the edit, the second the one after.",
        semantic_rule="(demo) How well does the picture after follow: <instruction>",
        quality_rule="(demo) How natural is the picture, and how free of artifacts?",
        source=folder,
    )


def demo(args: argparse.Namespace) -> tuple[Path, Any, Any, str]:
    """Build the demo's data, models and reward; returns (dataset folder, reward, config, model)."""
    from interleave_thinker import RunOptions, arun
    from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein
    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm, build_tiny_qwen3_vl
    from interleave_thinker.evaluation.judge import Judge, judge_chat_model
    from interleave_thinker.generators.diffusers_backend import DiffusersGenerator
    from interleave_thinker.training import CriticReward, LabelOptions, Selection, StepJudge, aexport_training
    from interleave_thinker.training.progress import Bars

    root = Path(args.out)
    runs, data = root / "runs", root / "grpo-data"
    models = root / "models"
    prompts = demo_judge_prompts(root)
    print(f"demo: tiny models and test-profile threads under {root}", file=sys.stderr)
    judge_model = judge_chat_model(str(build_scripted_vlm(models / "judge", DEMO_JUDGE_REPLY)), device="cpu")
    judge = Judge(judge_model, retry_delay=0)

    async def threads_and_export() -> None:
        for index, story in enumerate(DEMO_STORIES):
            await arun(story, profile="test", options=RunOptions(width=64, height=64),
                       thread_id=f"demo-{index}", run_dir=runs)
        # Every label a failure (semantics 6 < 7): each completion is redrawn and judged.
        labels = LabelOptions(judge=StepJudge(judge, prompts), success_from="judge", success_threshold=7)
        with Bars() as bars:
            await aexport_training("grpo", Selection(all=True), data, run_dir=runs, labels=labels, bars=bars)

    asyncio.run(threads_and_export())
    critic = build_tiny_qwen3_vl(models / "critic", seed=0)
    generator = DiffusersGenerator(model=build_tiny_flux2_klein(models / "flux2-klein"), device="cpu",
                                   dtype="float32", steps=2, guidance=1.0)
    reward = CriticReward(generator, judge, prompts, width=64, height=64, work_dir=root / "reward")
    steps = args.max_steps if args.max_steps > 0 else 2
    config = grpo_config(root / "checkpoints", num_generations=2, max_steps=steps, max_completion_length=16,
                         use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    return data, reward, config, str(critic)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GRPO for the critic with the paper's reward (TRL).")
    parser.add_argument("data", nargs="?", help="the folder `interleave export training grpo` wrote")
    parser.add_argument("--demo", action="store_true", help="tiny models, offline, on the CPU")
    parser.add_argument("--model", default="Qwen/Qwen3-VL-8B-Instruct",
                        help="the critic to train: your SFT checkpoint, or the base model")
    parser.add_argument("--out", default="critic-grpo", help="checkpoints (with --demo: everything)")
    parser.add_argument("--judge", help="the reward's judge: a served name with --judge-url, "
                        "provider:name, or a local model")
    parser.add_argument("--judge-url", help="the judge's OpenAI-compatible endpoint")
    parser.add_argument("--judge-prompts", help="your clone of the official repository "
                        "(default: the one `interleave prompts fetch-official` made)")
    parser.add_argument("--generator", help="the redraw generator (default FLUX.2-klein-4B, 4 steps)")
    parser.add_argument("--generator-url", help="an Images API endpoint for the redraws")
    parser.add_argument("--size", default="1024x1024", help="redraw size (the paper: 1024x1024)")
    parser.add_argument("--device", default="auto", help="for in-process judge and generator")
    parser.add_argument("--num-generations", type=int, default=PAPER_SETTINGS["num_generations"])
    parser.add_argument("--temperature", type=float, default=PAPER_SETTINGS["temperature"])
    parser.add_argument("--learning-rate", type=float, default=PAPER_SETTINGS["learning_rate"])
    parser.add_argument("--beta", type=float, default=PAPER_SETTINGS["beta"], help="KL weight (paper: 0)")
    parser.add_argument("--batch-size", type=int, help="completions per device and step "
                        "(default: --num-generations)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    parser.add_argument("--max-completion-length", type=int, default=1024)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft)")
    parser.add_argument("--report-to", nargs="*", default=[], help="e.g. wandb, tensorboard")
    args = parser.parse_args(argv)
    if not args.demo and not (args.data and args.judge):
        parser.error("give the exported GRPO folder and --judge (or --demo)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        # Offline: huggingface_hub reads these once, when first imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets

    if args.demo:
        if args.out == "critic-grpo":
            args.out = tempfile.mkdtemp(prefix="critic-grpo-demo-")
        data, reward, config, model = demo(args)
    else:
        data, reward, model = Path(args.data), real_reward(args), args.model
        config = grpo_config(
            args.out, num_generations=args.num_generations, temperature=args.temperature,
            learning_rate=args.learning_rate, beta=args.beta, batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs,
            max_completion_length=args.max_completion_length, report_to=args.report_to,
        )
    dataset = datasets.load_from_disk(str(data))
    trainer = build_trainer(model, dataset, reward.trl_reward_funcs(), config, lora=args.lora)
    trainer.train()
    if not args.demo:
        trainer.save_model(args.out)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    stats = reward.stats
    print(f"{trainer.state.global_step} steps; mean reward per step: "
          + ", ".join(f"{value:.3f}" for value in rewards), file=sys.stderr)
    print(f"reward: {stats.samples} completions scored, {stats.redraws} redraws "
          f"({stats.redraw_failures} failed), {stats.judged} judged ({stats.judge_failures} without a "
          "score, left out)", file=sys.stderr)
    return 0 if rewards and all(math.isfinite(value) for value in rewards) else 1


if __name__ == "__main__":
    sys.exit(main())
