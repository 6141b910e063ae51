"""The critic's GRPO reward of the paper: format, accuracy, step-wise gain, and their total.

For one critic reply to a labelled sample (the planned prompt, the prompt that drew the edited
image, the image before, and the label ``{success, semantics, quality}`` of the edited image):

- **format** (0/1): the reply has ``<answer>...</answer>``, any ``<think>`` comes before it, and
  the answer (read with json-repair, as the official reward reads it) is a dict whose
  ``previous_step_success`` is a bool and ``refine_prompt`` a string;
- **accuracy** (0/1): ``previous_step_success`` equals the label's ``success``;
- **step-wise gain**, only when the label says the edit failed: the reply's ``refine_prompt``
  (the previous prompt when it gives none) is drawn again on the image before (text-to-image
  when that is the white canvas), seed 0, 1024x1024 by default; a judge scores the new image's
  semantic consistency SC (two images, the planned prompt) and perceptual quality PQ (one
  image), and each gain is ``((new - label) / 10 + 1) / 2``. Both gains are 0.5 when the label
  says success or the redraw fails;
- **overall** = 0.5·format + 0.5·(0.2·accuracy + 0.6·semantic gain + 0.2·quality gain).

A judge that gives no readable score makes the gains and the total ``None``: TRL then leaves
the sample out of its group (no advantage), and :attr:`CriticReward.stats` counts it. Nothing
here raises for a failed redraw or judge call.

Use :class:`CriticReward` with any project generator backend (``generators.base.ImageGenerator``)
and any LangChain chat model as judge (through ``evaluation.judge.Judge``):

- ``reward.trl_reward_funcs()``: ``[critic_overall]`` for TRL's GRPOTrainer (one async function
  returning the paper's total, which also logs each term); ``reward.trl_term_funcs()`` gives
  the four terms separately (``critic_format`` and ``critic_accuracy`` sync, the gains async),
  with ``TERM_WEIGHTS`` as GRPOConfig's ``reward_weights``;
- :func:`compute_score`: EasyR1's batch reward function (``reward_function=...:compute_score``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import json_repair
from PIL import Image

from interleave_thinker.errors import ConfigurationError, one_line
from interleave_thinker.evaluation.judge import ImageInput, Judge
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.storage.image_store import encode_png
from interleave_thinker.training.judging import StepJudge, StepJudgePrompts, read_step_judge_prompts
from interleave_thinker.training.progress import Bars

__all__ = [
    "ACCURACY_WEIGHT",
    "FORMAT_WEIGHT",
    "NEUTRAL_GAIN",
    "QUALITY_WEIGHT",
    "SEMANTIC_WEIGHT",
    "TERM_WEIGHTS",
    "CriticReply",
    "CriticReward",
    "Label",
    "RewardResult",
    "RewardSample",
    "RewardStats",
    "accuracy_reward",
    "compute_score",
    "critic_accuracy",
    "critic_format",
    "format_reward",
    "gain",
    "overall_reward",
    "read_reply",
    "reward_from_env",
    "set_default_reward",
]

FORMAT_WEIGHT = 0.5
# Inside the other half: accuracy, semantic gain and quality gain.
ACCURACY_WEIGHT = 0.2
SEMANTIC_WEIGHT = 0.6
QUALITY_WEIGHT = 0.2
# The gain when nothing is redrawn (success label) or the redraw fails.
NEUTRAL_GAIN = 0.5
# GRPOConfig.reward_weights for trl_term_funcs(): format, accuracy, semantic gain, quality gain.
TERM_WEIGHTS = (
    FORMAT_WEIGHT,
    (1 - FORMAT_WEIGHT) * ACCURACY_WEIGHT,
    (1 - FORMAT_WEIGHT) * SEMANTIC_WEIGHT,
    (1 - FORMAT_WEIGHT) * QUALITY_WEIGHT,
)
SUCCESS_KEY = "previous_step_success"
REFINE_KEY = "refine_prompt"

_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
# json-repair reads character by character in Python: a runaway answer is not worth it.
_MAX_ANSWER_CHARS = 100_000
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# The terms, on one reply


@dataclass(frozen=True)
class CriticReply:
    """What a reward needs of a critic reply: the answer dict (None if there is none) and
    whether the reply is well formed."""

    answer: dict | None
    well_formed: bool

    @property
    def success(self) -> object:
        """The answer's ``previous_step_success`` as written (None when absent)."""
        return None if self.answer is None else self.answer.get(SUCCESS_KEY)

    def redraw_prompt(self, previous_prompt: str) -> str:
        """The prompt to draw again with: the reply's ``refine_prompt``, else the previous one."""
        refine = None if self.answer is None else self.answer.get(REFINE_KEY)
        return refine if isinstance(refine, str) and refine.strip() else previous_prompt


def read_reply(text: str) -> CriticReply:
    """The answer dict of a critic reply and whether the reply is well formed (see module doc)."""
    if not isinstance(text, str):
        return CriticReply(None, False)
    match = _ANSWER.search(text)
    if match is None:
        return CriticReply(None, False)
    answer = _answer_dict(match.group(1).strip())
    think = _THINK_OPEN.search(text)
    opened = _ANSWER_OPEN.search(text)
    ordered = think is None or (opened is not None and think.start() < opened.start())
    well_formed = (
        ordered
        and answer is not None
        and isinstance(answer.get(SUCCESS_KEY), bool)
        and isinstance(answer.get(REFINE_KEY), str)
    )
    return CriticReply(answer, well_formed)


def _answer_dict(text: str) -> dict | None:
    if not text or len(text) > _MAX_ANSWER_CHARS:
        return None
    try:
        value = json_repair.loads(text)
    except Exception:  # the repair layer failing means "no answer"
        return None
    return value if isinstance(value, dict) and value else None


def format_reward(text: str) -> float:
    """1.0 when the reply is well formed (think before answer, a readable answer with a bool
    ``previous_step_success`` and a string ``refine_prompt``), else 0.0."""
    return 1.0 if read_reply(text).well_formed else 0.0


def accuracy_reward(text: str, label_success: bool) -> float:
    """1.0 when the reply's ``previous_step_success`` equals the label, else 0.0 (as the official
    reward compares them: a missing key never matches)."""
    answer = read_reply(text).answer
    if answer is None:
        return 0.0
    predicted = answer.get(SUCCESS_KEY, _MISSING)
    if predicted is _MISSING or isinstance(predicted, str):
        return 0.0
    try:
        return 1.0 if predicted == bool(label_success) else 0.0
    except Exception:  # an answer value whose comparison raises
        return 0.0


def gain(new_score: float, label_score: float) -> float:
    """The step-wise gain of one judge score (0-10) over the label's: ((new - label)/10 + 1)/2."""
    return ((float(new_score) - float(label_score)) / 10.0 + 1.0) / 2.0


def overall_reward(format_score: float, accuracy: float, semantic: float, quality: float) -> float:
    """The paper's total: 0.5·format + 0.5·(0.2·accuracy + 0.6·semantic + 0.2·quality)."""
    rest = ACCURACY_WEIGHT * accuracy + SEMANTIC_WEIGHT * semantic + QUALITY_WEIGHT * quality
    return FORMAT_WEIGHT * format_score + (1 - FORMAT_WEIGHT) * rest


# ---------------------------------------------------------------------------------------------
# Samples and results


@dataclass(frozen=True)
class Label:
    """What the judge said of the edited image being criticised, and whether the edit succeeded."""

    success: bool
    semantics: float
    quality: float

    @classmethod
    def of(cls, value: Label | Mapping[str, Any]) -> Label:
        if isinstance(value, Label):
            return value
        return cls(bool(value["success"]), float(value["semantics"]), float(value["quality"]))


@dataclass(frozen=True)
class RewardSample:
    """One critic reply to score, with the record it answered."""

    response: str
    label: Label
    # The image before the edit: a PIL image, encoded bytes, or a file path.
    origin_image: Any
    # The step's planned prompt (the judge's instruction) and the prompt that drew the image.
    origin_prompt: str
    previous_prompt: str
    # Whether the image before is the white canvas (text-to-image); None: look at its pixels.
    origin_blank: bool | None = None


@dataclass(frozen=True)
class RewardResult:
    """The four terms and the total of one reply; the gains and total are None when the judge
    gave no readable score."""

    format: float
    accuracy: float
    semantic: float | None
    quality: float | None
    overall: float | None
    redrawn: bool = False
    redraw_failed: bool = False
    judge_failed: bool = False
    error: str = ""


@dataclass
class RewardStats:
    """Counts over the reward's life: replies scored, redraws, failures, judge calls."""

    samples: int = 0
    success_labels: int = 0
    redraws: int = 0
    redraw_failures: int = 0
    judged: int = 0
    judge_failures: int = 0
    reused: int = 0
    last_errors: list[str] = field(default_factory=list)

    def note(self, error: str) -> None:
        self.last_errors = [*self.last_errors[-9:], error]


@dataclass(frozen=True)
class _Outcome:
    semantic: float | None = None
    quality: float | None = None
    redraw_failed: bool = False
    error: str = ""


@dataclass
class _Origin:
    image: Image.Image
    digest: str
    blank: bool


T = TypeVar("T")


class _LoopThread:
    """An event loop on a daemon thread, for the synchronous entry points (EasyR1, scripts):
    the judge's and generators' loop-bound objects then always meet the same loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="critic-reward", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


# ---------------------------------------------------------------------------------------------
# The reward


class CriticReward:
    """The paper's critic reward with a generator for the redraws and a judge for the gains.

    ``generator``: any project backend (``ImageGenerator``). ``judge``: a :class:`Judge` or any
    LangChain chat model (wrapped in one: 3 tries, growing pauses). ``prompts``: the judge prompts,
    or the path of a clone of the official repository to read them from (default: the clone
    ``interleave prompts fetch-official`` made). Redraws are ``width`` x ``height`` with
    ``seed`` (the paper: 1024x1024, seed 0), sent in batches of ``max_batch``; identical redraws
    (same image before, same prompt) are drawn and judged once, and remembered (``cache_size``).
    """

    def __init__(
        self,
        generator: ImageGenerator,
        judge: Judge | Any,
        prompts: StepJudgePrompts | str | os.PathLike[str] | None = None,
        *,
        width: int = 1024,
        height: int = 1024,
        seed: int = 0,
        max_batch: int = 8,
        redraw_timeout: float | None = 900.0,
        work_dir: str | os.PathLike[str] | None = None,
        cache_size: int = 4096,
        progress: bool = True,
    ) -> None:
        if not isinstance(prompts, StepJudgePrompts):
            prompts = read_step_judge_prompts(prompts)
        self.generator = generator
        self.judge = judge if isinstance(judge, Judge) else Judge(judge)
        self.step_judge = StepJudge(self.judge, prompts)
        self.width, self.height, self.seed = width, height, seed
        self.max_batch = max(1, max_batch)
        self.redraw_timeout = redraw_timeout
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="critic-reward-"))
        self.progress = progress
        self.stats = RewardStats()
        self._cache: OrderedDict[tuple[str, str, str], _Outcome] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[tuple[str, str, str], asyncio.Future[_Outcome]] = {}
        self._inflight_loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: _LoopThread | None = None
        self._warned_unavailable = False

    # -- scoring ---------------------------------------------------------------------------

    async def ascore(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        """The terms and total of each sample, in order."""
        replies = [read_reply(sample.response) for sample in samples]
        keys: list[tuple[str, str, str] | None] = []
        origins: dict[tuple[str, str, str], tuple[_Origin, RewardSample, str]] = {}
        for sample, reply in zip(samples, replies, strict=True):
            if sample.label.success:
                keys.append(None)
                continue
            origin = await asyncio.to_thread(_origin, sample.origin_image, sample.origin_blank)
            prompt = reply.redraw_prompt(sample.previous_prompt)
            key = (origin.digest, prompt, sample.origin_prompt)
            keys.append(key)
            origins.setdefault(key, (origin, sample, prompt))
        outcomes = await self._outcomes(origins)
        results = []
        for sample, reply, key in zip(samples, replies, keys, strict=True):
            results.append(self._result(sample, reply, None if key is None else outcomes[key]))
        self.stats.samples += len(samples)
        return results

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        """:meth:`ascore` from synchronous code (on the reward's own event loop thread)."""
        if self._loop_thread is None:
            self._loop_thread = _LoopThread()
        return self._loop_thread.run(self.ascore(samples))

    def _result(self, sample: RewardSample, reply: CriticReply, outcome: _Outcome | None) -> RewardResult:
        format_score = 1.0 if reply.well_formed else 0.0
        accuracy = accuracy_reward(sample.response, sample.label.success)
        if outcome is None:
            self.stats.success_labels += 1
            return RewardResult(format_score, accuracy, NEUTRAL_GAIN, NEUTRAL_GAIN,
                                overall_reward(format_score, accuracy, NEUTRAL_GAIN, NEUTRAL_GAIN))
        if outcome.redraw_failed:
            return RewardResult(format_score, accuracy, NEUTRAL_GAIN, NEUTRAL_GAIN,
                                overall_reward(format_score, accuracy, NEUTRAL_GAIN, NEUTRAL_GAIN),
                                redrawn=True, redraw_failed=True, error=outcome.error)
        if outcome.semantic is None or outcome.quality is None:
            return RewardResult(format_score, accuracy, None, None, None, redrawn=True, judge_failed=True,
                                error=outcome.error)
        semantic = gain(outcome.semantic, sample.label.semantics)
        quality = gain(outcome.quality, sample.label.quality)
        return RewardResult(format_score, accuracy, semantic, quality,
                            overall_reward(format_score, accuracy, semantic, quality), redrawn=True)

    async def _outcomes(self, wanted: dict[tuple[str, str, str], tuple[_Origin, RewardSample, str]]
                        ) -> dict[tuple[str, str, str], _Outcome]:
        """The judged redraw of each key: remembered, being made by a concurrent call (the gains
        of one batch are asked for by two TRL functions at once), or made now."""
        loop = asyncio.get_running_loop()
        if self._inflight_loop is not loop:
            self._inflight, self._inflight_loop = {}, loop
        found: dict[tuple[str, str, str], _Outcome] = {}
        waiting: dict[tuple[str, str, str], asyncio.Future[_Outcome]] = {}
        mine: dict[tuple[str, str, str], tuple[_Origin, RewardSample, str]] = {}
        for key, entry in wanted.items():
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                self.stats.reused += 1
            elif key in self._inflight:
                waiting[key] = self._inflight[key]
                self.stats.reused += 1
            else:
                self._inflight[key] = waiting[key] = loop.create_future()
                mine[key] = entry
        if mine:
            try:
                made = await self._make(mine)
            except BaseException as exc:
                # Cancelled, or a bug: whoever waits on these keys must not hang.
                for key in mine:
                    future = self._inflight.pop(key, None)
                    if future is not None and not future.done():
                        future.set_result(_Outcome(error=f"not scored: {one_line(exc)}"))
                raise
            for key, outcome in made.items():
                self._remember(key, outcome)
                future = self._inflight.pop(key, None)
                if future is not None and not future.done():
                    future.set_result(outcome)
        for key, future in waiting.items():
            found[key] = await future
        return found

    def _remember(self, key: tuple[str, str, str], outcome: _Outcome) -> None:
        # A judge failure is not remembered: the next batch may ask again.
        if outcome.semantic is None and not outcome.redraw_failed:
            return
        self._cache[key] = outcome
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _make(self, wanted: dict[tuple[str, str, str], tuple[_Origin, RewardSample, str]]
                    ) -> dict[tuple[str, str, str], _Outcome]:
        keys = list(wanted)
        with Bars(enabled=self.progress, transient=True) as bars:
            redraw_bar = bars.add("critic reward: redraws", total=len(keys))
            judge_bar = bars.add("critic reward: judge calls", total=2 * len(keys))
            images = await self._redraw(keys, wanted, redraw_bar)
            outcomes: dict[tuple[str, str, str], _Outcome] = {}

            async def judged(key: tuple[str, str, str]) -> None:
                image = images[key]
                if isinstance(image, str):
                    outcomes[key] = _Outcome(redraw_failed=True, error=image)
                    judge_bar.advance(2)
                    return
                origin, sample, _ = wanted[key]
                outcomes[key] = await self._judge(origin, image, sample.origin_prompt)
                judge_bar.advance(2)

            await asyncio.gather(*(judged(key) for key in keys))
        return outcomes

    async def _redraw(self, keys: list[tuple[str, str, str]],
                      wanted: dict[tuple[str, str, str], tuple[_Origin, RewardSample, str]],
                      bar: Any) -> dict[tuple[str, str, str], Image.Image | str]:
        """Each key's redrawn image, or the reason it failed (a string)."""
        drawn: dict[tuple[str, str, str], Image.Image | str] = {}
        for start in range(0, len(keys), self.max_batch):
            chunk = keys[start : start + self.max_batch]
            jobs = [self._job(wanted[key][0], wanted[key][2]) for key in chunk]
            results = await self._generate(jobs)
            if isinstance(results, str) and len(chunk) > 1:
                # One bad job must not fail the others: each is tried on its own.
                singles = [await self._generate([job]) for job in jobs]
                results = [single if isinstance(single, str) else single[0] for single in singles]
            for index, key in enumerate(chunk):
                result = results if isinstance(results, str) else results[index]
                self.stats.redraws += 1
                if isinstance(result, str):
                    self.stats.redraw_failures += 1
                    self.stats.note(f"redraw failed: {result}")
                drawn[key] = result
                bar.advance()
        return drawn

    def _job(self, origin: _Origin, prompt: str) -> GenerationJob:
        sources = () if origin.blank else (origin.image,)
        return GenerationJob(prompt=prompt, seed=self.seed, width=self.width, height=self.height,
                             source_images=sources, extra={"purpose": "critic-reward"})

    async def _generate(self, jobs: list[GenerationJob]) -> list[Image.Image | str] | str:
        try:
            call = self.generator.agenerate(jobs)
            raw = await (asyncio.wait_for(call, self.redraw_timeout) if self.redraw_timeout else call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "timed out" if isinstance(exc, TimeoutError) else one_line(exc)
        if len(raw) != len(jobs):
            return f"the generator returned {len(raw)} images for {len(jobs)} jobs"
        images: list[Image.Image | str] = []
        for item in raw:
            try:
                image = Image.open(io.BytesIO(item)) if isinstance(item, bytes) else item
                image.load()
                images.append(image.convert("RGB"))
            except Exception as exc:
                images.append(f"unreadable image: {one_line(exc)}")
        return images

    async def _judge(self, origin: _Origin, image: Image.Image, instruction: str) -> _Outcome:
        try:
            before, after = await asyncio.to_thread(self._judge_files, origin, image)
            semantic, quality, error = await self.step_judge.scores(before, after, instruction,
                                                                   item="critic-reward")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # JudgeUnavailable, a broken chat model: counted, never raised
            semantic = quality = None
            error = one_line(exc)
            if not self._warned_unavailable:
                self._warned_unavailable = True
                warnings.warn(f"critic reward: the judge failed ({error}); such samples get no reward",
                              RuntimeWarning, stacklevel=2)
        self.stats.judged += 1
        if semantic is None or quality is None:
            self.stats.judge_failures += 1
            self.stats.note(f"judge failed: {error}")
            return _Outcome(error=error or "the judge gave no score")
        return _Outcome(semantic=semantic, quality=quality)

    def _judge_files(self, origin: _Origin, image: Image.Image) -> tuple[ImageInput, ImageInput]:
        """The image before and the redraw as PNG files (the redraw at the size of the image
        before, as the official scorer resizes it)."""
        if image.size != origin.image.size:
            image = image.resize(origin.image.size, Image.Resampling.BICUBIC)
        return _png_file(self.work_dir, origin.image), _png_file(self.work_dir, image)

    # -- TRL -------------------------------------------------------------------------------

    def trl_reward_funcs(self) -> list[Any]:
        """``[critic_overall]``: the paper's total as one async TRL reward function."""
        return [OverallReward(self)]

    def trl_term_funcs(self) -> list[Any]:
        """The four terms as TRL reward functions; pass ``reward_weights=list(TERM_WEIGHTS)``.
        A judge failure then leaves only the gains out (TRL drops a sample only when every
        function returns None), so :meth:`trl_reward_funcs` is the paper's reward."""
        return [critic_format, critic_accuracy, GainReward(self, "semantic"), GainReward(self, "quality")]

    async def score_trl(self, completions: Sequence[Any], kwargs: Mapping[str, Any]) -> list[RewardResult]:
        return await self.ascore(trl_samples(completions, kwargs))


# ---------------------------------------------------------------------------------------------
# Images


def _as_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, Mapping) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, Mapping) and value.get("path"):
        image = Image.open(value["path"])
    else:
        image = Image.open(os.fspath(value))
    image.load()
    return image


def _origin(value: Any, blank: bool | None) -> _Origin:
    image = _as_image(value).convert("RGB")
    digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    if blank is None:
        blank = image.getextrema() == ((255, 255), (255, 255), (255, 255))
    return _Origin(image, digest, bool(blank))


def _png_file(folder: Path, image: Image.Image) -> ImageInput:
    data = encode_png(image)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{digest}.{threading.get_ident()}.partial"
        temp.write_bytes(data)
        os.replace(temp, path)
    return ImageInput(path, digest)


# ---------------------------------------------------------------------------------------------
# TRL reward functions


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], Mapping) else ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(str(part.get("text") or "") for part in content
                           if isinstance(part, Mapping) and part.get("type") == "text")
    return ""


def trl_samples(completions: Sequence[Any], kwargs: Mapping[str, Any]) -> list[RewardSample]:
    """RewardSamples from TRL's reward arguments: the completions and the dataset columns of the
    GRPO export (``images`` with the image before first, ``origin_prompt``, ``rewritten_prompt``,
    ``success``, ``semantics``, ``quality``, ``origin_blank``)."""
    missing = [name for name in ("origin_prompt", "rewritten_prompt", "success", "semantics", "quality")
               if name not in kwargs]
    if missing:
        raise ConfigurationError(
            f"the critic reward needs the dataset columns {', '.join(missing)}",
            hint="train on the folder `interleave export training grpo` wrote",
        )
    images = kwargs.get("images")
    paths = kwargs.get("origin_image_path")
    blanks = kwargs.get("origin_blank")
    samples = []
    for index, completion in enumerate(completions):
        origin = images[index][0] if images is not None and images[index] else (
            paths[index] if paths is not None else None)
        samples.append(RewardSample(
            response=completion_text(completion),
            label=Label(bool(kwargs["success"][index]), float(kwargs["semantics"][index]),
                        float(kwargs["quality"][index])),
            origin_image=origin,
            origin_prompt=str(kwargs["origin_prompt"][index]),
            previous_prompt=str(kwargs["rewritten_prompt"][index]),
            origin_blank=None if blanks is None else bool(blanks[index]),
        ))
    return samples


def critic_format(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: the format term of each completion."""
    return [format_reward(completion_text(completion)) for completion in completions]


def critic_accuracy(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: the accuracy term against the ``success`` column."""
    labels = kwargs["success"]
    return [accuracy_reward(completion_text(completion), bool(label))
            for completion, label in zip(completions, labels, strict=True)]


def _mean(values: Sequence[float | None]) -> float:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else math.nan


class OverallReward:
    """TRL reward function (async): the paper's total, None where the judge failed; logs each
    term's mean and the failures of the batch as metrics (``critic/...``)."""

    __name__ = "critic_overall"

    def __init__(self, reward: CriticReward) -> None:
        self.reward = reward

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
                       ) -> list[float | None]:
        results = await self.reward.score_trl(completions, kwargs)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for name, values in (("format", [r.format for r in results]),
                                 ("accuracy", [r.accuracy for r in results]),
                                 ("semantic_gain", [r.semantic for r in results]),
                                 ("quality_gain", [r.quality for r in results])):
                log_metric(f"critic/{name}", _mean(values))
            log_metric("critic/redraw_failures", float(sum(r.redraw_failed for r in results)))
            log_metric("critic/judge_failures", float(sum(r.judge_failed for r in results)))
        return [result.overall for result in results]


class GainReward:
    """TRL reward function (async): the semantic or quality gain, None where the judge failed.
    The two share their redraws and judge calls."""

    def __init__(self, reward: CriticReward, term: str) -> None:
        if term not in ("semantic", "quality"):
            raise ValueError(f"unknown gain {term!r}")
        self.reward = reward
        self.term = term
        self.__name__ = f"critic_{term}_gain"

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
                       ) -> list[float | None]:
        results = await self.reward.score_trl(completions, kwargs)
        return [getattr(result, self.term) for result in results]


# ---------------------------------------------------------------------------------------------
# EasyR1


_default: CriticReward | None = None
_default_lock = threading.Lock()


def set_default_reward(reward: CriticReward | None) -> None:
    """The reward :func:`compute_score` uses (None: build it from the environment on first use)."""
    global _default
    with _default_lock:
        _default = reward


def reward_from_env(env: Mapping[str, str] | None = None) -> CriticReward:
    """A CriticReward from ``INTERLEAVE_REWARD_*`` variables: ``JUDGE`` (required: a served name
    with ``JUDGE_URL``, ``provider:name``, or a local model), ``GENERATOR`` (default
    FLUX.2-klein-4B, 4 steps, guidance 1.0) with ``GENERATOR_URL`` for an Images API, ``PROMPTS``
    (a clone of the official repository; default the fetched one), ``SIZE`` (1024x1024),
    ``DEVICE`` (auto)."""
    from interleave_thinker.evaluation.judge import judge_chat_model
    from interleave_thinker.models import profiles
    from interleave_thinker.settings import DEFAULT_GENERATOR, ModelSettings

    env = os.environ if env is None else env
    judge_name = env.get("INTERLEAVE_REWARD_JUDGE")
    if not judge_name:
        raise ConfigurationError(
            "compute_score needs a judge: INTERLEAVE_REWARD_JUDGE is not set",
            hint="set INTERLEAVE_REWARD_JUDGE (and INTERLEAVE_REWARD_JUDGE_URL for a served model), "
            "or call set_default_reward() with a CriticReward",
        )
    size = env.get("INTERLEAVE_REWARD_SIZE", "1024x1024")
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError as exc:
        raise ConfigurationError(f"INTERLEAVE_REWARD_SIZE={size!r} is not WIDTHxHEIGHT") from exc
    device = env.get("INTERLEAVE_REWARD_DEVICE", "auto")
    settings = ModelSettings(
        generator=env.get("INTERLEAVE_REWARD_GENERATOR", DEFAULT_GENERATOR),
        generator_url=env.get("INTERLEAVE_REWARD_GENERATOR_URL") or None,
        device=device, steps=4, guidance=1.0,
    )
    # The profiles' own builder: a diffusers folder or hub id, or an Images API with a URL.
    generator = profiles._generator(settings)
    model = judge_chat_model(judge_name, env.get("INTERLEAVE_REWARD_JUDGE_URL") or None, device=device)
    return CriticReward(generator, model, env.get("INTERLEAVE_REWARD_PROMPTS") or None,
                        width=width, height=height)


def _default_reward() -> CriticReward:
    global _default
    with _default_lock:
        if _default is None:
            _default = reward_from_env()
        return _default


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = FORMAT_WEIGHT,
                  *, reward: CriticReward | None = None) -> list[dict[str, float]]:
    """EasyR1's batch reward function: for each input (``response``, ``ground_truth`` =
    ``{semantics, quality, success}``, ``origin_prompt``, ``origin_image_path``,
    ``previous_prompt``) a dict with ``overall`` and each term, under the official names
    (``format_reward``, ``judge_accuracy_reward``, ``edited_image_reward_semantic``,
    ``edited_image_reward_quality``), plus ``redraw_failed`` and ``judge_failed`` (0/1).

    EasyR1 needs a number for every sample, so a judge failure counts like a failed redraw
    (both gains 0.5) and is flagged in ``judge_failed``. ``format_weight`` is accepted for the
    official signature; the weights are the paper's.
    """
    chosen = reward or _default_reward()
    samples = []
    for item in reward_inputs:
        samples.append(RewardSample(
            response=str(item.get("response", "")),
            label=Label.of(item["ground_truth"]),
            origin_image=item["origin_image_path"],
            origin_prompt=str(item.get("origin_prompt", "")),
            previous_prompt=str(item.get("previous_prompt", "")),
        ))
    scores = []
    for result in chosen.score(samples):
        semantic = NEUTRAL_GAIN if result.semantic is None else result.semantic
        quality = NEUTRAL_GAIN if result.quality is None else result.quality
        scores.append({
            "overall": overall_reward(result.format, result.accuracy, semantic, quality),
            "format_reward": result.format,
            "judge_accuracy_reward": result.accuracy,
            "edited_image_reward_semantic": semantic,
            "edited_image_reward_quality": quality,
            "redraw_failed": float(result.redraw_failed),
            "judge_failed": float(result.judge_failed),
        })
    return scores
