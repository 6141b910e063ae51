"""Training data from trajectories, and the paper's critic reward for GRPO.

- ``training.export``: ``aexport_training`` writes LLaMA-Factory SFT files (planner, critic),
  EasyR1 RL records and a GRPO ``datasets`` folder from finished threads
  (``interleave export training KIND``).
- ``training.rewards``: the format, accuracy and step-wise terms and their total, as plain
  functions, as TRL reward functions (``CriticReward.trl_reward_funcs``) and as EasyR1's
  ``compute_score``.
- ``training.judging``: the reward's image judge, its prompts read from the user's clone of the
  official repository.

Nothing here imports torch, TRL or datasets until it is used.
"""

from __future__ import annotations

from interleave_thinker.training.export import KINDS, ExportReport, LabelOptions, aexport_training
from interleave_thinker.training.judging import StepJudge, StepJudgePrompts, read_step_judge_prompts
from interleave_thinker.training.rewards import (
    TERM_WEIGHTS,
    CriticReward,
    Label,
    RewardResult,
    RewardSample,
    accuracy_reward,
    compute_score,
    format_reward,
    gain,
    overall_reward,
)
from interleave_thinker.training.threads import Selection, Trajectory

__all__ = [
    "KINDS",
    "TERM_WEIGHTS",
    "CriticReward",
    "ExportReport",
    "Label",
    "LabelOptions",
    "RewardResult",
    "RewardSample",
    "Selection",
    "StepJudge",
    "StepJudgePrompts",
    "Trajectory",
    "accuracy_reward",
    "aexport_training",
    "compute_score",
    "format_reward",
    "gain",
    "overall_reward",
    "read_step_judge_prompts",
]
