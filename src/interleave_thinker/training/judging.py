"""The image judge of the critic's reward: semantic consistency and perceptual quality, 0-10.

The official reward asks a VLM two questions about an edited image, with prompts of the VIEScore
family kept in the official repository (``train/EasyR1/viescore/vie_prompts.py``):

- semantic consistency (SC): the image before and the image after, and the step's planned
  prompt as the instruction; the reply lists scores, and SC is the smallest;
- perceptual quality (PQ): the image after alone; PQ is the smallest score listed.

The prompts are read at run time from the user's clone of the official repository (the one
``interleave prompts fetch-official`` made, or any path), parsed with :mod:`ast`, never
imported; none of their text is in this project. Both questions are one user turn, the text
first and then the images, as the official scorer sends them. A reply must hold the scores as
``"score": [...]`` numbers from 0 to 10; anything else is asked again (the official scorer
guesses a random score instead) and, once the judge's tries are spent, counted as a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import json_repair

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.judge import (
    ImageInput,
    Judge,
    JudgeCache,
    JudgePrompt,
    UnreadableReply,
    ask_cached,
    user,
)
from interleave_thinker.evaluation.sources import Clone
from interleave_thinker.prompts.official import FETCH_COMMAND, OFFICIAL_REPOSITORY, recorded_clone

PROMPTS_FILE = "train/EasyR1/viescore/vie_prompts.py"
# The constants the official scorer joins (with newlines) into its two questions.
CONTEXT = "_context_no_delimit"
TWO_IMAGE_RULE = "_prompts_0shot_two_image_edit_rule_ours"
SEMANTIC_RULE = "_prompts_0shot_tie_rule_SC_ours"
QUALITY_RULE = "_prompts_0shot_rule_PQ_ours"
INSTRUCTION_SLOT = "<instruction>"
# The official scorer's delimiter around the JSON, when a judge prints it.
_DELIMITER = "||V^=^V||"
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True)
class StepJudgePrompts:
    """The two judge prompts, as read from one clone."""

    context: str
    two_image_rule: str
    semantic_rule: str
    quality_rule: str
    source: Path

    def semantic_text(self, instruction: str) -> str:
        joined = "\n".join([self.context, self.two_image_rule, self.semantic_rule])
        return joined.replace(INSTRUCTION_SLOT, instruction)

    def quality_text(self) -> str:
        return "\n".join([self.context, self.quality_rule])


def read_step_judge_prompts(clone: str | os.PathLike[str] | None = None) -> StepJudgePrompts:
    """The judge prompts in ``clone`` (default: the clone ``interleave prompts fetch-official``
    made); a clear error naming the file or constant that is missing."""
    if clone is None:
        clone = recorded_clone()
        if clone is None:
            raise ConfigurationError(
                "the critic reward's judge prompts are read from a clone of the official repository, "
                "and none was fetched",
                hint=f"run `{FETCH_COMMAND}`, or pass the path of your clone (--judge-prompts PATH)",
            )
    repo = Clone.at(clone, benchmark="critic reward judge", repository=OFFICIAL_REPOSITORY)
    texts = repo.constants(PROMPTS_FILE, {
        CONTEXT: (), TWO_IMAGE_RULE: (), SEMANTIC_RULE: (INSTRUCTION_SLOT,), QUALITY_RULE: (),
    })
    return StepJudgePrompts(texts[CONTEXT], texts[TWO_IMAGE_RULE], texts[SEMANTIC_RULE],
                            texts[QUALITY_RULE], repo.root)


def parse_scores(text: str) -> float:
    """The smallest of the scores in a judge reply (``{"score": [7, 9], ...}``, with or without
    the official delimiters); UnreadableReply when there are none or one is outside 0-10."""
    if text.count(_DELIMITER) == 2:
        body = text.split(_DELIMITER)[1]
    else:
        start, end = text.find("{"), text.rfind("}")
        body = text[start : end + 1] if start != -1 and end > start else ""
    data: object = None
    if body:
        try:
            data = json.loads(body, strict=False)
        except ValueError:
            try:
                data = json_repair.loads(body)
            except Exception:  # the repair layer failing means "unreadable"
                data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict) and "score" in data:
        raw = data["score"]
    elif (bare := _bare_scores(text)) is not None:
        # Some judges print only the list of scores, or one number (the official parser takes these).
        raw = bare
    else:
        raise UnreadableReply('the reply holds no {"score": [...]} object')
    values = raw if isinstance(raw, list) else [raw]
    scores = []
    for value in values:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UnreadableReply(f"score {value!r} is not a number")
        if not 0 <= value <= 10:
            raise UnreadableReply(f"score {value} is outside 0-10")
        scores.append(float(value))
    if not scores:
        raise UnreadableReply("the score list is empty")
    return min(scores)


_BARE_LIST = re.compile(r"\[\s*[0-9]+(?:\s*,\s*[0-9]+)*\s*\]")


def _bare_scores(text: str) -> list[object] | None:
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return [float(stripped)]
    found = _BARE_LIST.findall(text)
    if len(found) == 1 and "{" not in text:
        return json.loads(found[0])
    return None


class StepJudge:
    """Asks a :class:`Judge` the two questions about one image; answers may be cached on disk."""

    def __init__(self, judge: Judge, prompts: StepJudgePrompts, *, cache: JudgeCache | None = None) -> None:
        self.judge = judge
        self.prompts = prompts
        self.cache = cache

    def semantic_prompt(self, before: ImageInput, after: ImageInput, instruction: str) -> JudgePrompt:
        return JudgePrompt.of(user(self.prompts.semantic_text(instruction), before, after))

    def quality_prompt(self, after: ImageInput) -> JudgePrompt:
        return JudgePrompt.of(user(self.prompts.quality_text(), after))

    async def scores(self, before: ImageInput, after: ImageInput, instruction: str, *, item: str
                     ) -> tuple[float | None, float | None, str]:
        """(semantic consistency, perceptual quality, error): a score is None when the judge
        gave no readable answer within its tries, and ``error`` then says why."""
        semantic, quality = await asyncio.gather(
            ask_cached(self.judge, self.cache, item, "semantics",
                       self.semantic_prompt(before, after, instruction), parse_scores),
            ask_cached(self.judge, self.cache, item, "quality", self.quality_prompt(after), parse_scores),
        )
        errors = "; ".join(f"{v.criterion}: {v.error}" for v in (semantic, quality) if not v.ok)
        return (semantic.value if semantic.ok else None, quality.value if quality.ok else None, errors)
