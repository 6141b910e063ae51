"""RISEBench (PhoenixZ810/RISEBench): reasoning-informed single-image edits, judged per dimension.

Facts used (checked against the repository's ``gpt_eval.py`` and ``utils.py``):
- items ``{"index", "category", "instruction", "image", ...}`` with ``reference`` (text),
  ``reference_img`` or ``reference_txt`` and the flags ``consistency_free``, ``reasoning_img``
  and ``reasoning_wo_ins``; image paths are relative to the data folder;
- the scorer reads ``images/{category}/{index}.png`` (or .jpg/.jpeg) under the output folder;
- temporal, causal and spatial items are judged on appearance consistency (unless
  consistency-free), reasoning and visual plausibility, each 1-5; logical items on
  consistency and reasoning, each 0/1, mapped to 1 or 5; the judge ends with "Final Score";
- an item is accurate when every dimension that applies is 5; the headline (the leaderboard's
  Overall %) is the share of accurate items, by category likewise; the weighted score is
  0.3 consistency + 0.5 reasoning + 0.2 plausibility (0.2 plausibility + 0.8 reasoning when
  consistency-free; 0.3 consistency + 0.7 reasoning for logical), halved (at least 1) when
  reasoning is 1;
- images go to the judge as JPEG, at most 768 pixels a side.
The judge prompts are the string constants of the user's clone of ``utils.py``.
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
    flag,
    load_records,
    mean,
    present,
    resolve_path,
    safe_name,
    save_png,
    step_outputs,
)
from interleave_thinker.evaluation.judge import JudgePrompt, UnreadableReply, image_input, user
from interleave_thinker.evaluation.sources import Clone
from interleave_thinker.state import Document
from interleave_thinker.storage.image_store import ImageStore

IMAGES = "images"
PROMPTS_FILE = "utils.py"
DATA_FILE = "data/data_total.json"
JUDGE_IMAGE_SIDE = 768
SUFFIXES = ("png", "jpg", "jpeg")
FIVE_POINT = ("temporal_reasoning", "causal_reasoning", "spatial_reasoning")
LOGICAL = "logical_reasoning"
PROMPT_NAMES = (
    "prompt_consist", "prompt_reasoning", "prompt_reasoning_w_input", "prompt_generation",
    "prompt_spatial_ref", "prompt_spatial_ref_img", "prompt_spatial_ref_w_input",
    "prompt_spatial_qual", "prompt_spatial_cons", "prompt_logical_cons_ans", "prompt_logical_cons",
    "prompt_logical_txt", "prompt_logical_img", "prompt_logical_img_wo_q",
)
# The scorer sends these as they are (no format()); the others get the instruction and reference.
RAW_TEMPLATES = frozenset({"prompt_generation", "prompt_spatial_qual", "prompt_logical_img_wo_q"})
_FINAL = re.compile(r"final scores?\**\s*:?\s*([\d*\s,]*)", re.IGNORECASE)


def parse_final_score(text: str) -> int:
    """The first number after "Final Score" (the scorer's rule)."""
    for match in _FINAL.finditer(text):
        numbers = re.findall(r"\d+", match.group(1))
        if numbers:
            return int(numbers[0])
    raise UnreadableReply(f"no Final Score in {text[-200:]!r}")


def _scale(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        value = parse_final_score(text)
        if not low <= value <= high:
            raise UnreadableReply(f"Final Score {value} is outside {low}-{high}")
        return value

    return parse


def weighted_score(category: str, consistency_free: bool, values: dict[str, Any]) -> float:
    """The scorer's weighted score of one item (1-5)."""
    reasoning = values["reasoning"]
    if category == LOGICAL:
        score = 0.3 * values["consistency"] + 0.7 * reasoning
    elif consistency_free:
        score = 0.2 * values["plausibility"] + 0.8 * reasoning
    else:
        score = 0.3 * values["consistency"] + 0.5 * reasoning + 0.2 * values["plausibility"]
    if reasoning == 1:
        score = max(score * 0.5, 1)
    return score


def accurate(category: str, consistency_free: bool, values: dict[str, Any]) -> int:
    """1 when every dimension that applies to the item is 5."""
    needed = ["reasoning"]
    if not consistency_free:
        needed.append("consistency")
    if category != LOGICAL:
        needed.append("plausibility")
    return int(all(values.get(name) == 5 for name in needed))


@dataclass(frozen=True)
class Job:
    criterion: str
    template: str
    images: tuple[str, ...]  # "input", "reference" or "output", in the order sent


class RiseBench(Benchmark):
    name = "risebench"
    protocol = "risebench"
    title = "RISEBench"
    repository = "https://github.com/PhoenixZ810/RISEBench"
    metric = (
        "RISEBench accuracy (%): the share of items whose every applicable dimension (appearance "
        "consistency, reasoning, visual plausibility) is judged 5; overall and per category"
    )
    judge_max_tokens = 4096

    # -- generation ------------------------------------------------------------------------------

    def read_items(self, data: Path | None, clone: Path | None) -> list[BenchItem]:
        if data is None:
            if clone is None:
                raise ConfigurationError(
                    "risebench: pass --data (data_total.json of the full release or the repository) "
                    "or --bench-repo (a clone, whose data/data_total.json is then read)"
                )
            data = Path(clone) / DATA_FILE
        base = data if data.is_dir() else data.parent
        items, seen = [], set()
        for record in load_records(data):
            index, category = record.get("index"), record.get("category")
            if not present(index) or not isinstance(category, str) or not isinstance(
                record.get("instruction"), str
            ):
                raise ConfigurationError(
                    f"risebench: a record of {data} lacks index, category or instruction",
                    hint="pass RISEBench's data_total.json",
                )
            item_id = str(index)
            if item_id in seen:
                raise ConfigurationError(f"risebench: index {item_id!r} appears twice in {data}")
            seen.add(item_id)
            resolved = dict(record)
            for key in ("image", "reference_img"):
                if present(record.get(key)):
                    resolved[key] = resolve_path(record[key], base)
            for key in ("image", "reference_img"):
                if resolved.get(key) and not Path(resolved[key]).is_relative_to(base.resolve()):
                    raise ConfigurationError(
                        f"risebench: {key} of {item_id} ({record[key]!r}) lies outside {base}",
                        hint="a data file names only images in its own folder",
                    )
            source = resolved.get("image")
            if not source or not Path(source).is_file():
                raise ConfigurationError(
                    f"risebench: the input image of {item_id} ({record.get('image')!r}) is not in {base}",
                    hint="keep data_total.json beside its *_images folders",
                )
            items.append(BenchItem(item_id, category, record["instruction"], (source,), resolved))
        return items

    def record_output(self, item: BenchItem, document: Document, store: ImageStore, out: Path
                      ) -> dict[str, Any]:
        refs = [ref for _, ref in step_outputs(document) if ref is not None]
        if not refs:
            return {"text": "", "images": []}
        relative = f"{IMAGES}/{safe_name(item.category)}/{safe_name(item.id)}.png"
        save_png(store, refs[-1], out / relative)
        return {"text": "", "images": [relative]}

    def official_command(self, out: Path) -> str:
        return (f"cd /path/to/RISEBench && python gpt_eval.py --data data/data_total.json "
                f"--output {out}")

    # -- scoring ---------------------------------------------------------------------------------

    def read_output(self, out: Path, item: BenchItem) -> ItemOutput | None:
        folder = out / IMAGES / safe_name(item.category)
        for suffix in SUFFIXES:
            path = folder / f"{safe_name(item.id)}.{suffix}"
            if path.is_file():
                return ItemOutput(images=(path,))
        return None

    def load_prompts(self, clone: Path | None) -> dict[str, str]:
        repo = Clone.at(clone, benchmark=self.name, repository=self.repository)
        found = repo.constants(PROMPTS_FILE, {name: () for name in PROMPT_NAMES})
        for name, text in found.items():
            if name in RAW_TEMPLATES:
                continue
            try:
                text.format(instruct="", reference="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigurationError(
                    f"risebench: {name} in {repo.root / PROMPTS_FILE} cannot be filled in: {exc}",
                    hint="the file may come from another version of the repository",
                ) from exc
        return found

    def jobs(self, item: BenchItem) -> list[Job]:
        """The judge calls of an item, in the scorer's order, with the images each one sees."""
        data, category = item.data, item.category
        has_reference_img = present(data.get("reference_img"))
        first = "reference" if has_reference_img else "input"
        if category in ("temporal_reasoning", "causal_reasoning"):
            if flag(data.get("reasoning_img")):
                reasoning = Job("reasoning", "prompt_reasoning_w_input", ("input", "output"))
            else:
                reasoning = Job("reasoning", "prompt_reasoning", ("output",))
            consistency = Job("consistency", "prompt_consist", ("input", "output"))
            quality = Job("plausibility", "prompt_generation", ("output",))
        elif category == "spatial_reasoning":
            if has_reference_img:
                reasoning = Job("reasoning", "prompt_spatial_ref_img", ("reference", "output"))
            elif flag(data.get("reasoning_img")):
                reasoning = Job("reasoning", "prompt_spatial_ref_w_input", ("input", "output"))
            else:
                reasoning = Job("reasoning", "prompt_spatial_ref", ("output",))
            # As the scorer does: with a reference image, consistency compares against it.
            consistency = Job("consistency", "prompt_spatial_cons", (first, "output"))
            quality = Job("plausibility", "prompt_spatial_qual", ("output",))
        elif category == LOGICAL:
            if present(data.get("reference_txt")):
                consistency = Job("consistency", "prompt_logical_cons_ans", ("input", "output"))
                reasoning = Job("reasoning", "prompt_logical_txt", ("output",))
            elif has_reference_img:
                consistency = Job("consistency", "prompt_logical_cons", ("reference", "output"))
                without_question = flag(data.get("reasoning_wo_ins"))
                name = "prompt_logical_img_wo_q" if without_question else "prompt_logical_img"
                reasoning = Job("reasoning", name, ("reference", "output"))
            else:
                raise ConfigurationError(
                    f"risebench: logical item {item.id} has no reference_txt or reference_img"
                )
            quality = None
        else:
            raise ConfigurationError(f"risebench: item {item.id} has an unknown category {category!r}")
        jobs = [] if flag(data.get("consistency_free")) else [consistency]
        jobs.append(reasoning)
        if quality is not None:
            jobs.append(quality)
        return jobs

    async def judge_item(self, item: BenchItem, output: ItemOutput | None, prompts: dict[str, str],
                         ask: Ask) -> ItemResult:
        consistency_free = flag(item.data.get("consistency_free"))
        if output is None:
            values = {"consistency": None, "reasoning": None, "plausibility": None, "complete": 0,
                      "score": 1.0}
            return ItemResult(item.id, item.category, "missing", values,
                              note="no output image: not accurate", tags=_tags(item))
        try:
            jobs = self.jobs(item)
        except ConfigurationError as exc:
            return ItemResult(item.id, item.category, "failed", {}, note=exc.message)
        reference = item.data.get("reference")
        if not present(reference):
            reference = item.data.get("reference_txt")
        fields = {"instruct": item.data["instruction"], "reference": reference if present(reference) else ""}
        files = {"input": item.images[0], "reference": item.data.get("reference_img"),
                 "output": output.images[0]}
        logical = item.category == LOGICAL
        parse = _scale(0, 1) if logical else _scale(1, 5)
        verdicts = []
        for job in jobs:
            template = prompts[job.template]
            text = template if job.template in RAW_TEMPLATES else template.format(**fields)
            images = [image_input(files[name], max_side=JUDGE_IMAGE_SIDE, format="JPEG")
                      for name in job.images]
            verdicts.append(await ask(job.criterion, JudgePrompt.of(user(text, *images)), parse))
        failed = [verdict for verdict in verdicts if not verdict.ok]
        if failed:
            return ItemResult(item.id, item.category, "failed", {}, verdicts,
                              note=f"{len(failed)} judge call(s) failed")
        values: dict[str, Any] = {"consistency": None, "reasoning": None, "plausibility": None}
        for verdict in verdicts:
            values[verdict.criterion] = 4 * min(verdict.value, 1) + 1 if logical else verdict.value
        values["complete"] = accurate(item.category, consistency_free, values)
        values["score"] = weighted_score(item.category, consistency_free, values)
        return ItemResult(item.id, item.category, "judged", values, verdicts, tags=_tags(item))

    def aggregate(self, results: Sequence[ItemResult]) -> Summary:
        scored = [result for result in results if result.scored]
        by_category: dict[str, list[ItemResult]] = defaultdict(list)
        for result in scored:
            by_category[result.category].append(result)

        def accuracy(group: Sequence[ItemResult]) -> float | None:
            value = mean(r.values["complete"] for r in group)
            return None if value is None else 100 * value

        categories = {name: accuracy(group) for name, group in sorted(by_category.items())}
        score = mean(r.values["score"] for r in scored)
        extra: dict[str, Any] = {
            "score": score,
            "score_percentage": None if score is None else 25 * (score - 1),
        }
        for dimension in ("reasoning", "consistency", "plausibility"):
            value = mean(r.values[dimension] for r in scored)
            extra[f"mean_{dimension}"] = value
            extra[f"{dimension}_percentage"] = None if value is None else 25 * (value - 1)
        subtasks: dict[str, list[ItemResult]] = defaultdict(list)
        for result in scored:
            if result.tags.get("subtask"):
                subtasks[result.tags["subtask"]].append(result)
        if subtasks:
            extra["subtasks"] = {name: accuracy(group) for name, group in sorted(subtasks.items())}
        return Summary(accuracy(scored), categories, extra)

    def headline(self, result: ItemResult) -> float | None:
        return 100.0 * result.values["complete"] if result.scored else None


def _tags(item: BenchItem) -> dict[str, str]:
    subtask = item.data.get("subtask")
    return {"subtask": str(subtask)} if present(subtask) else {}
