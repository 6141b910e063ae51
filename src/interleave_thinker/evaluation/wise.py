"""WISE (PKU-YuanGroup/WISE): 1,000 world-knowledge prompts, one image each, two judging protocols.

Facts used (checked against the repository: ``WISE_legacy/gpt_eval.py`` and ``Calculate.py``
for the legacy protocol, ``vllm_eval.py`` and ``calculate_verified.py`` for the verified one):
- items ``{"Prompt", "Explanation", "Category", "Subcategory", "prompt_id"}``; the scorers read
  one image per prompt, ``{prompt_id}.png``, from one folder;
- legacy: the judge scores consistency, realism and aesthetic quality 0-2; WiScore =
  (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2; categories by id: culture 1-400, time
  401-567, space 568-700, biology 701-800, physics 801-900, chemistry 901-1000; overall =
  0.4 culture + 0.167 time + 0.133 space + 0.1 (biology + physics + chemistry);
- verified (the repository's current default): a binary 0/1 score; culture 1-400, time
  401-520, space 521-640, biology 641-760, physics 761-880, chemistry 881-1000; overall =
  0.40 culture + 0.12 (time + space + biology + physics + chemistry);
- both scorers give an overall only when every category has scored images.
The judge messages are read from the ``build_evaluation_messages`` function of the user's clone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.base import (
    Ask,
    BenchItem,
    Benchmark,
    ItemOutput,
    ItemResult,
    Summary,
    load_records,
    mean,
    save_png,
    step_outputs,
)
from interleave_thinker.evaluation.judge import (
    ImageInput,
    JudgeMessage,
    JudgePrompt,
    UnreadableReply,
    image_input,
)
from interleave_thinker.evaluation.sources import Clone, MessageTemplate, render_segments, returned_messages
from interleave_thinker.state import Document
from interleave_thinker.storage.image_store import ImageStore

IMAGES = "images"
CATEGORY_ORDER = ("culture", "time", "space", "biology", "physics", "chemistry")


@dataclass(frozen=True)
class Protocol:
    name: str
    scorer: str
    data_folder: str
    ranges: tuple[tuple[str, int, int], ...]
    weights: dict[str, float]
    judge_max_tokens: int
    metric: str


LEGACY = Protocol(
    name="wise-legacy",
    scorer="WISE_legacy/gpt_eval.py",
    data_folder="WISE_legacy/data",
    ranges=(("culture", 1, 400), ("time", 401, 567), ("space", 568, 700),
            ("biology", 701, 800), ("physics", 801, 900), ("chemistry", 901, 1000)),
    weights={"culture": 0.4, "time": 0.167, "space": 0.133, "biology": 0.1, "physics": 0.1,
             "chemistry": 0.1},
    judge_max_tokens=2000,
    metric="WiScore (0-1): per image (0.7 consistency + 0.2 realism + 0.1 aesthetic quality) / 2, "
    "each judged 0-2; overall = 0.4 culture + 0.167 time + 0.133 space + 0.1 (biology + physics "
    "+ chemistry), over the category means",
)
VERIFIED = Protocol(
    name="wise-verified",
    scorer="vllm_eval.py",
    data_folder="data_verified",
    ranges=(("culture", 1, 400), ("time", 401, 520), ("space", 521, 640),
            ("biology", 641, 760), ("physics", 761, 880), ("chemistry", 881, 1000)),
    weights={"culture": 0.40, "time": 0.12, "space": 0.12, "biology": 0.12, "physics": 0.12,
             "chemistry": 0.12},
    judge_max_tokens=500,
    metric="WISE_Verified WiScore (0-1): a binary 0/1 score per image; overall = 0.40 culture + "
    "0.12 (time + space + biology + physics + chemistry), over the category means",
)

_LEGACY_KEYS = {"consistency": "consistency", "realism": "realism", "aesthetic quality": "aesthetic_quality"}
_LEGACY_SCORE = re.compile(r"\**\s*(consistency|realism|aesthetic quality)\s*\**\s*[:：]?\s*\**\s*(\d)",
                           re.IGNORECASE)
_BARE_LEGACY = re.compile(r"(?m)^\s*([0-2])\s*$")
_BINARY_SCORE = re.compile(r"\**\s*score\s*\**\s*[:：]?\s*\**\s*([01])\b", re.IGNORECASE)
_BARE_BINARY = re.compile(r"(?m)^\s*([01])\s*$")


def parse_legacy(text: str) -> dict[str, int]:
    """The three 0-2 scores of a legacy reply ("Consistency: 2" lines, or three bare numbers)."""
    found: dict[str, int] = {}
    for name, digit in _LEGACY_SCORE.findall(text):
        # As the WISE scorer reads it: a later line naming the same score wins.
        found[_LEGACY_KEYS[name.lower()]] = int(digit)
    if not found:
        numbers = _BARE_LEGACY.findall(text)
        if len(numbers) >= 3:
            found = dict(zip(("consistency", "realism", "aesthetic_quality"), map(int, numbers),
                             strict=False))
    missing = [key for key in _LEGACY_KEYS.values() if key not in found]
    if missing:
        raise UnreadableReply(f"no {', '.join(missing)} score in {text[:200]!r}")
    out_of_range = [key for key, value in found.items() if not 0 <= value <= 2]
    if out_of_range:
        raise UnreadableReply(f"{', '.join(out_of_range)} outside 0-2 in {text[:200]!r}")
    return found


def parse_binary(text: str) -> int:
    """The 0/1 score of a verified reply ("Score: 1", or a single bare 0 or 1 line)."""
    match = _BINARY_SCORE.search(text)
    if match:
        return int(match.group(1))
    numbers = _BARE_BINARY.findall(text)
    if len(numbers) == 1:
        return int(numbers[0])
    raise UnreadableReply(f"no 0/1 score in {text[:200]!r}")


def wiscore(consistency: float, realism: float, aesthetic_quality: float) -> float:
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic_quality) / 2


class Wise(Benchmark):
    """WISE with one of its two protocols (``wise``: legacy, ``wise-verified``)."""

    title = "WISE"
    repository = "https://github.com/PKU-YuanGroup/WISE"

    def __init__(self, protocol: Protocol, name: str) -> None:
        self.spec = protocol
        self.name = name
        self.protocol = protocol.name
        self.metric = protocol.metric
        self.judge_max_tokens = protocol.judge_max_tokens
        if protocol is VERIFIED:
            # What vllm_eval.py sends to its vLLM judge.
            self.judge_extra_body = {"chat_template_kwargs": {"enable_thinking": False}}

    def category(self, prompt_id: Any) -> str:
        if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
            for name, low, high in self.spec.ranges:
                if low <= prompt_id <= high:
                    return name
        return "other"

    # -- generation ------------------------------------------------------------------------------

    def read_items(self, data: Path | None, clone: Path | None) -> list[BenchItem]:
        if data is None:
            if clone is None:
                raise ConfigurationError(
                    f"{self.name}: pass --data (the prompt files) or --bench-repo (a clone of "
                    f"{self.repository}, whose {self.spec.data_folder} is then read)"
                )
            data = Path(clone) / self.spec.data_folder
        if data.is_dir():
            # The legacy folder also holds the rewritten prompts; pass such a file to use it.
            files = [p for p in sorted(data.glob("*.json")) if "rewrite" not in p.stem]
            records = [record for file in files for record in load_records(file)]
            if not files:
                raise ConfigurationError(f"{self.name}: {data} holds no prompt files")
        else:
            records = load_records(data)
        by_id: dict[int, dict[str, Any]] = {}
        for record in records:
            prompt_id = record.get("prompt_id")
            if not isinstance(prompt_id, int) or not isinstance(record.get("Prompt"), str):
                raise ConfigurationError(
                    f"{self.name}: a record of {data} lacks an integer prompt_id or a Prompt",
                    hint="pass WISE's prompt files ({\"Prompt\", \"Explanation\", ..., \"prompt_id\"})",
                )
            if prompt_id in by_id and by_id[prompt_id] != record:
                raise ConfigurationError(f"{self.name}: prompt_id {prompt_id} has two different records")
            by_id[prompt_id] = record
        return [
            BenchItem(str(prompt_id), self.category(prompt_id), record["Prompt"], (), dict(record))
            for prompt_id, record in sorted(by_id.items())
        ]

    def record_output(self, item: BenchItem, document: Document, store: ImageStore, out: Path
                      ) -> dict[str, Any]:
        # The answer is the last image the trajectory kept (a 1-step plan's only image).
        refs = [ref for _, ref in step_outputs(document) if ref is not None]
        if not refs:
            return {"text": "", "images": []}
        relative = f"{IMAGES}/{item.id}.png"
        save_png(store, refs[-1], out / relative)
        return {"text": "", "images": [relative]}

    def official_command(self, out: Path) -> str:
        images = out / IMAGES
        if self.spec is VERIFIED:
            return (f"cd /path/to/WISE && IMAGE_DIR={images} VLLM_API_BASE=http://127.0.0.1:8000/v1 "
                    "JUDGE_MODEL=Qwen3.5-35B-A3B bash eval_qwen.sh")
        return (f"cd /path/to/WISE/WISE_legacy && python gpt_eval.py --json_path data/... "
                f"--image_dir {images} ... (once per prompt file), then python Calculate.py ... "
                "--category all")

    # -- scoring ---------------------------------------------------------------------------------

    def read_output(self, out: Path, item: BenchItem) -> ItemOutput | None:
        path = out / IMAGES / f"{item.id}.png"
        return ItemOutput(images=(path,)) if path.is_file() else None

    def load_prompts(self, clone: Path | None) -> MessageTemplate:
        repo = Clone.at(clone, benchmark=self.name, repository=self.repository)
        template = returned_messages(repo.module(self.spec.scorer), "build_evaluation_messages",
                                     where=str(repo.root / self.spec.scorer), benchmark=self.name)
        unknown = template.fields() - {"Prompt", "Explanation", "Category", "Subcategory", "prompt_id"}
        if unknown or template.image_slots() != 1:
            raise ConfigurationError(
                f"{self.name}: build_evaluation_messages in {repo.root / self.spec.scorer} does not "
                "have the expected shape (one image, fields of the prompt record)",
                hint="the file may come from another version of the repository",
            )
        return template

    async def judge_item(self, item: BenchItem, output: ItemOutput | None, prompts: MessageTemplate,
                         ask: Ask) -> ItemResult:
        if output is None:
            values = self._values(0, 0, 0) if self.spec is LEGACY else {"score": 0, "wiscore": 0.0}
            return ItemResult(item.id, item.category, "missing", values, note="no image: scored 0")
        prompt = _fill(prompts, item.data, image_input(output.images[0]))
        parse = parse_legacy if self.spec is LEGACY else parse_binary
        verdict = await ask("score", prompt, parse)
        if not verdict.ok:
            return ItemResult(item.id, item.category, "failed", {}, [verdict], note="judge call failed")
        if self.spec is LEGACY:
            scores = verdict.value
            values = self._values(scores["consistency"], scores["realism"], scores["aesthetic_quality"])
        else:
            values = {"score": verdict.value, "wiscore": float(verdict.value)}
        return ItemResult(item.id, item.category, "judged", values, [verdict])

    @staticmethod
    def _values(consistency: float, realism: float, aesthetic: float) -> dict[str, Any]:
        return {"consistency": consistency, "realism": realism, "aesthetic_quality": aesthetic,
                "wiscore": wiscore(consistency, realism, aesthetic)}

    def aggregate(self, results: Sequence[ItemResult]) -> Summary:
        by_category: dict[str, list[float]] = defaultdict(list)
        for result in results:
            if result.scored and result.category in self.spec.weights:
                by_category[result.category].append(result.values["wiscore"])
        categories: dict[str, float | None] = {
            name: mean(by_category[name]) for name in CATEGORY_ORDER if by_category[name]
        }
        extra: dict[str, Any] = {"samples": {name: len(by_category[name]) for name in CATEGORY_ORDER}}
        if all(by_category[name] for name in self.spec.weights):
            overall: float | None = sum(
                weight * categories[name] for name, weight in self.spec.weights.items()  # type: ignore[operator]
            )
        else:
            overall = None
            extra["overall_note"] = (
                "no overall: not every category has scored images (the WISE scorers refuse too)"
            )
        if self.spec is LEGACY:
            scored = [r for r in results if r.scored]
            for key in ("consistency", "realism", "aesthetic_quality"):
                extra[f"mean_{key}"] = mean(r.values[key] for r in scored)
        return Summary(overall, categories, extra)

    def headline(self, result: ItemResult) -> float | None:
        return result.values.get("wiscore") if result.scored else None


def _fill(template: MessageTemplate, record: dict[str, Any], image: ImageInput) -> JudgePrompt:
    messages = []
    for role, parts in template.messages:
        content: list[Any] = []
        for kind, segments in parts:
            content.append(image if kind == "image" else render_segments(segments, record))
        messages.append(JudgeMessage(role, tuple(content)))
    return JudgePrompt(tuple(messages))
