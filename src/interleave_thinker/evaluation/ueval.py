"""UEval (zlab-princeton/UEval): 1,000 questions answered with text and images, judged per rubric.

Facts used (checked against the repository's ``ueval_eval.py``):
- items: ``id``, ``prompt``, ``task`` (older copies: ``task_type`` and ``question_type``),
  ``text_rubrics`` and ``image_rubrics`` (strings, or objects with ``criterion``);
- tasks art, life, tech and exercise are "open", space, textbook, diagram and paper "closed"
  (an unknown task counts as open); closed image rubrics are judged without the text answer;
- the scorer reads a JSON list of ``{"id", "text_answer", "image_answer": [paths]}``, paths
  relative to the folder it runs in;
- one judge call per rubric, reply ``{"criteria_met": true | false | "not sure"}``; "not sure"
  counts as not met; an item's rate per rubric kind is met / total; the summary is the mean
  text rate and the mean image rate over the items that have rubrics of that kind.
The judge prompts are the constants of the user's clone of ``ueval_eval.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json_repair

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
    safe_name,
    save_png,
    step_outputs,
    write_json,
)
from interleave_thinker.evaluation.judge import (
    JudgePrompt,
    UnreadableReply,
    Verdict,
    image_input,
    system,
    user,
)
from interleave_thinker.evaluation.sources import Clone
from interleave_thinker.state import Document
from interleave_thinker.storage.image_store import ImageStore

OPEN_TASKS = frozenset({"art", "life", "tech", "exercise"})
CLOSED_TASKS = frozenset({"space", "textbook", "diagram", "paper"})
OUTPUTS_FILE = "outputs.json"
SCORER = "ueval_eval.py"
# The judge prompt constants of ueval_eval.py and the placeholders the scorer fills in them.
PROMPT_CONSTANTS: dict[str, tuple[str, ...]] = {
    "SYSTEM_INSTRUCTION": (),
    "TEXT_TEMPLATE": ("<<question>>", "<<text_answer>>"),
    "TEXT_RUBRIC_TEMPLATE": ("<<rubric_item>>",),
    "IMAGE_TEMPLATE_OPEN": ("<<question>>", "<<text_answer>>"),
    "IMAGE_TEMPLATE_CLOSED": ("<<question>>",),
    "IMAGE_RUBRIC_TEMPLATE": ("<<rubric_item>>",),
}
_FIELDS = ("id", "prompt", "task", "task_type", "question_type", "text_rubrics", "image_rubrics")
NOT_SURE = "not sure"


def question_type(task: str) -> str:
    return "closed" if task.strip().lower() in CLOSED_TASKS else "open"


def rubric_text(rubric: Any) -> str:
    if isinstance(rubric, str):
        return rubric
    if isinstance(rubric, dict):
        return str(rubric.get("criterion", ""))
    return str(rubric)


@dataclass(frozen=True)
class UEvalPrompts:
    system: str
    text: str
    text_rubric: str
    image_open: str
    image_closed: str
    image_rubric: str


def parse_criteria(text: str) -> bool | str:
    """True, False or "not sure" from a reply holding ``{"criteria_met": ...}``."""
    value = _criteria_value(_json_object(text))
    if value is None:
        raise UnreadableReply(f"no readable criteria_met in {text[:200]!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        for loader in (json.loads, json_repair.loads):
            try:
                value = loader(candidate)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    raise UnreadableReply(f"no JSON object in {text[:200]!r}")


def _criteria_value(parsed: dict[str, Any]) -> bool | str | None:
    value = parsed.get("criteria_met")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"true", "yes", "y", "1"}:
            return True
        if lowered in {"false", "no", "n", "0"}:
            return False
        if lowered in {"not sure", "unsure", "unknown"}:
            return NOT_SURE
    return None


class UEval(Benchmark):
    name = "ueval"
    protocol = "ueval"
    title = "UEval"
    repository = "https://github.com/zlab-princeton/UEval"
    metric = (
        "UEval score (0-100): per task, (mean text rubric rate + mean image rubric rate) / 2 x 100; "
        "overall: the mean of the task scores (the leaderboard's Avg). A rubric judged 'not sure' "
        "is not met."
    )

    # -- generation ------------------------------------------------------------------------------

    def read_items(self, data: Path | None, clone: Path | None) -> list[BenchItem]:
        if data is None:
            raise ConfigurationError(
                "ueval: --data is required",
                hint="download the Hugging Face dataset zlab-princeton/UEval and pass its folder",
            )
        items: list[BenchItem] = []
        seen: set[str] = set()
        for record in load_records(data, columns=_FIELDS):
            if "id" not in record or not isinstance(record.get("prompt"), str):
                raise ConfigurationError(f"ueval: a record of {data} has no id or prompt",
                                         hint="pass the UEval test split")
            item_id = str(record["id"])
            if item_id in seen:
                raise ConfigurationError(f"ueval: id {item_id!r} appears twice in {data}")
            seen.add(item_id)
            task = str(record.get("task") or record.get("task_type") or "")
            kind = str(record.get("question_type") or question_type(task))
            data_record = {
                "id": item_id,
                "prompt": record["prompt"],
                "task": task,
                "question_type": kind,
                "text_rubrics": [rubric_text(r) for r in record.get("text_rubrics") or []],
                "image_rubrics": [rubric_text(r) for r in record.get("image_rubrics") or []],
            }
            items.append(BenchItem(item_id, task, record["prompt"], (), data_record))
        return items

    def record_output(self, item: BenchItem, document: Document, store: ImageStore, out: Path
                      ) -> dict[str, Any]:
        # As the official InterleaveThinker loop answers: all steps' texts joined, and the final
        # image of every step that has one.
        steps = step_outputs(document)
        images = []
        for number, (_, ref) in enumerate(steps, start=1):
            if ref is not None:
                relative = f"images/{safe_name(item.id)}/step{number}.png"
                save_png(store, ref, out / relative)
                images.append(relative)
        return {"text": "".join(text for text, _ in steps), "images": images}

    def write_layout(self, out: Path, items: Sequence[BenchItem], records: dict[str, dict[str, Any]]
                     ) -> list[Path]:
        rows = [
            {"id": item.id, "text_answer": records[item.id]["text"],
             "image_answer": records[item.id]["images"]}
            for item in items
            if records.get(item.id, {}).get("status") == "done"
        ]
        path = out / OUTPUTS_FILE
        write_json(path, rows)
        return [path]

    def official_command(self, out: Path) -> str:
        return (f"cd {out} && python /path/to/UEval/{SCORER} --model_output_path {OUTPUTS_FILE} "
                "--output_path ueval_results.json")

    # -- scoring ---------------------------------------------------------------------------------

    def read_output(self, out: Path, item: BenchItem) -> ItemOutput | None:
        answers = self._answers(out)
        entry = answers.get(item.id)
        if entry is None:
            return None
        text, paths = entry
        found, missing = [], []
        for path in paths:
            full = Path(path) if Path(path).is_absolute() else out / path
            (found if full.is_file() else missing).append(full if full.is_file() else path)
        return ItemOutput(text=text, images=tuple(found), missing_images=tuple(missing))

    def _answers(self, out: Path) -> dict[str, tuple[str, list[str]]]:
        path = out / OUTPUTS_FILE
        stamp = (path, path.stat().st_mtime_ns if path.is_file() else None)
        cached = getattr(self, "_answers_cache", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        answers: dict[str, tuple[str, list[str]]] = {}
        if path.is_file():
            for entry in load_records(path):
                if entry.get("id") is None:
                    continue
                images = entry.get("image_answer")
                if isinstance(images, str):
                    images = [images]
                answers[str(entry["id"])] = (
                    str(entry.get("text_answer") or ""),
                    [str(image) for image in images or [] if image],
                )
        self._answers_cache = (stamp, answers)
        return answers

    def load_prompts(self, clone: Path | None) -> UEvalPrompts:
        repo = Clone.at(clone, benchmark=self.name, repository=self.repository)
        found = repo.constants(SCORER, PROMPT_CONSTANTS)
        return UEvalPrompts(
            system=found["SYSTEM_INSTRUCTION"], text=found["TEXT_TEMPLATE"],
            text_rubric=found["TEXT_RUBRIC_TEMPLATE"], image_open=found["IMAGE_TEMPLATE_OPEN"],
            image_closed=found["IMAGE_TEMPLATE_CLOSED"], image_rubric=found["IMAGE_RUBRIC_TEMPLATE"],
        )

    async def judge_item(self, item: BenchItem, output: ItemOutput | None, prompts: UEvalPrompts,
                         ask: Ask) -> ItemResult:
        data = item.data
        question = str(data["prompt"])
        answer = output.text if output is not None else ""
        images = output.images if output is not None else ()
        text_rubrics, image_rubrics = data["text_rubrics"], data["image_rubrics"]
        if output is None:
            # No answer at all: nothing to judge, every rubric is unmet.
            values = {"text": 0.0 if text_rubrics else None, "image": 0.0 if image_rubrics else None,
                      "text_met": 0, "text_total": len(text_rubrics), "image_met": 0,
                      "image_total": len(image_rubrics)}
            return ItemResult(item.id, item.category, "missing", values, note="no answer in the outputs")

        # The scorer's layout: the context template, a blank line, the rubric template.
        text_context = prompts.text.replace("<<question>>", question).replace("<<text_answer>>", answer)
        template = prompts.image_open if data["question_type"] == "open" else prompts.image_closed
        image_context = template.replace("<<question>>", question).replace("<<text_answer>>", answer)
        jobs: list[tuple[str, JudgePrompt]] = []
        for number, rubric in enumerate(text_rubrics, start=1):
            body = text_context + "\n\n" + prompts.text_rubric.replace("<<rubric_item>>", rubric)
            jobs.append((f"text:{number}", JudgePrompt.of(system(prompts.system), user(body))))
        if images:
            for number, rubric in enumerate(image_rubrics, start=1):
                body = image_context + "\n\n" + prompts.image_rubric.replace("<<rubric_item>>", rubric)
                attached = [image_input(path) for path in images]
                prompt = JudgePrompt.of(system(prompts.system), user(body, *attached))
                jobs.append((f"image:{number}", prompt))
        verdicts: list[Verdict] = list(
            await asyncio.gather(*(ask(criterion, prompt, parse_criteria) for criterion, prompt in jobs))
        )
        failed = [verdict for verdict in verdicts if not verdict.ok]
        text_met = sum(v.value is True for v in verdicts if v.criterion.startswith("text:"))
        image_met = sum(v.value is True for v in verdicts if v.criterion.startswith("image:"))
        values = {
            "text": text_met / len(text_rubrics) if text_rubrics else None,
            "image": image_met / len(image_rubrics) if image_rubrics else None,
            "text_met": text_met, "text_total": len(text_rubrics),
            "image_met": image_met, "image_total": len(image_rubrics),
            "not_sure": sum(v.value == NOT_SURE for v in verdicts),
        }
        note = ""
        if image_rubrics and not images:
            note = "no image in the answer: every image rubric is unmet"
        if output.missing_images:
            note = (note + "; " if note else "") + f"{len(output.missing_images)} image file(s) missing"
        if failed:
            return ItemResult(item.id, item.category, "failed", {}, verdicts,
                              note=f"{len(failed)} judge call(s) failed")
        return ItemResult(item.id, item.category, "judged", values, verdicts, note)

    def aggregate(self, results: Sequence[ItemResult]) -> Summary:
        scored = [result for result in results if result.scored]
        text_rates = [r.values["text"] for r in scored if r.values.get("text") is not None]
        image_rates = [r.values["image"] for r in scored if r.values.get("image") is not None]
        by_task: dict[str, list[ItemResult]] = defaultdict(list)
        for result in scored:
            by_task[result.category].append(result)
        categories: dict[str, float | None] = {}
        for task in sorted(by_task):
            rates = [mean(r.values.get("text") for r in by_task[task]),
                     mean(r.values.get("image") for r in by_task[task])]
            task_score = mean(rates)
            categories[task] = None if task_score is None else 100 * task_score
        text_avg, image_avg = mean(text_rates), mean(image_rates)
        extra = {
            "text_avg_rate": text_avg,
            "image_avg_rate": image_avg,
            "overall_avg_rate": mean([text_avg, image_avg]),
            "num_items_with_text": len(text_rates),
            "num_items_with_image": len(image_rates),
            "not_sure": sum(r.values.get("not_sure", 0) for r in scored),
        }
        return Summary(mean(categories.values()), categories, extra)

    def describe_criterion(self, item: BenchItem, criterion: str) -> str:
        kind, _, number = criterion.partition(":")
        rubrics = item.data.get(f"{kind}_rubrics") or []
        if number.isdigit() and 0 < int(number) <= len(rubrics):
            return f"{kind} rubric {number}: {rubrics[int(number) - 1]}"
        return criterion

    def headline(self, result: ItemResult) -> float | None:
        if not result.scored:
            return None
        value = mean([result.values.get("text"), result.values.get("image")])
        return None if value is None else 100 * value

