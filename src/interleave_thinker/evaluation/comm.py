"""CoMM task 4 (HKUST-LongGroup/CoMM): step-by-step interleaved answers to a question, judged 0-10.

Facts used (checked against the repository's ``eval/eval_metric.py``, ``eval/utils.py``,
``eval/tot_metric/gpt4o_eval.py``, ``eval/cal_gpt4o_score.py`` and the MiniGPT-5 data loader):
- test records ``{"data_id", "title", "step_info", ...}``; the task-4 question is the data
  loader's template with the title in place of ``{SOURCE}``;
- the scorer reads ``{data_id}_task4/results.json`` with ``model_input``, ``model_output``
  ("(1) text <IMAGE> (2) text <IMAGE> ...") and ``prediction_image_list`` (file names in that
  folder); at most 10 output images are judged;
- three judge calls, each with one of the prompt files of
  ``eval/tot_metric/machine_evaluation_prompts`` as the system message: the document with its
  images (image coherence: style, entity, trend and overall consistency; completeness; image
  quality), the document without images (a description of each image), then the descriptions
  paired with the images (text fidelity); images as JPEG of at most 512 pixels a side;
- ``cal_gpt4o_score.py`` averages each of the seven scores over the items, a missing or "NA"
  score counting 0.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json_repair

from interleave_thinker.errors import ConfigurationError, one_line
from interleave_thinker.evaluation.base import (
    Ask,
    BenchItem,
    Benchmark,
    ItemOutput,
    ItemResult,
    Summary,
    load_records,
    mean,
    present,
    safe_name,
    save_png,
    step_outputs,
    write_json,
)
from interleave_thinker.evaluation.judge import (
    ImageInput,
    JudgePrompt,
    UnreadableReply,
    image_input,
    system,
    user,
)
from interleave_thinker.evaluation.sources import Clone
from interleave_thinker.state import Document
from interleave_thinker.storage.image_store import ImageStore

TASK = "task4"
RESULTS = "results.json"
IMAGE_TOKEN = "<IMAGE>"
MAX_IMAGES = 10
JUDGE_IMAGE_SIDE = 512
LOADER = "models/MiniGPT-5/dataloader.py"
LOADER_FUNCTION = "task4_interleaved_generation_for_question"
PROMPT_DIR = "eval/tot_metric/machine_evaluation_prompts"
PROMPT_FILES = {
    "coherence": "document_completeness_image_coherence.json",
    "descriptions": "texts_to_image_descriptions.json",
    "fidelity": "descriptions_gt_images_consistency.json",
}
DIMENSIONS = ("style_consistency", "entity_consistency", "trend_consistency", "overall_consistency",
              "completeness", "image_quality", "text_fidelity")
_DOCUMENT_KEY = "Create an Interleaved Text-Image Document"
_STEP = re.compile(r"\((\d+)\)\s")


def task4_question(clone: Path) -> str:
    """The data loader's task-4 question template (it holds ``{SOURCE}``)."""
    repo = Clone.at(clone, benchmark="comm", repository=CoMM.repository)
    tree = repo.module(LOADER)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == LOADER_FUNCTION:
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "prompts" for t in inner.targets)
                    and isinstance(inner.value, ast.List)
                    and inner.value.elts
                    and isinstance(inner.value.elts[0], ast.Constant)
                    and isinstance(inner.value.elts[0].value, str)
                    and "{SOURCE}" in inner.value.elts[0].value
                ):
                    return inner.value.elts[0].value
    raise ConfigurationError(
        f"comm: {repo.root / LOADER} has no task-4 question template in {LOADER_FUNCTION}",
        hint="the file may come from another version of the repository",
    )


def clean_step_text(text: str) -> str:
    """A step's text that the scorer's parser reads back whole: one line, no brackets or '<' it
    would drop, no "(N)" it would take for the next step."""
    text = " ".join(text.split()).replace("[", "(").replace("]", ")").replace("<", "‹")
    return re.sub(r"\((\d+)\)", r"\1)", text)


def parse_steps(model_output: str) -> list[list[str | None]]:
    """The steps of a model output: each a list of text pieces and None for each image marker."""
    matches = list(_STEP.finditer(model_output))
    steps = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(model_output)
        body = model_output[match.end() : end].strip()
        pieces: list[str | None] = []
        for number, chunk in enumerate(body.split(IMAGE_TOKEN)):
            if number:
                pieces.append(None)
            if chunk.strip():
                pieces.append(chunk.strip())
        steps.append(pieces)
    return steps


def _json(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        raise UnreadableReply(f"no JSON object in {text[:200]!r}")
    for loader in (json.loads, json_repair.loads):
        try:
            value = loader(text[start : end + 1])
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    raise UnreadableReply(f"no JSON object in {text[:200]!r}")


def _score(container: Any, key: str, where: str) -> float:
    if not isinstance(container, dict) or key not in container:
        raise UnreadableReply(f"no {where}")
    value = container[key]
    if value is None or (isinstance(value, str) and value.strip().upper() == "NA"):
        return 0.0  # the CoMM scorer counts a missing or NA score as 0
    if isinstance(value, bool):
        raise UnreadableReply(f"{where} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UnreadableReply(f"{where} is not a number: {value!r}") from None
    if not 0 <= number <= 10:
        raise UnreadableReply(f"{where} {number} is outside 0-10")
    return number


def parse_coherence(text: str) -> dict[str, float]:
    scores = _json(text).get("scores")
    if not isinstance(scores, dict):
        raise UnreadableReply("no scores object")
    coherence = scores.get("Image_Coherence")
    overall = coherence.get("overall_score") if isinstance(coherence, dict) else None
    values = {key: _score(overall, key, f"Image_Coherence.overall_score.{key}") for key in DIMENSIONS[:4]}
    values["completeness"] = _score(scores.get("Completeness"), "Score", "Completeness.Score")
    values["image_quality"] = _score(scores.get("Image_Quality"), "Score", "Image_Quality.Score")
    return values


def parse_descriptions(text: str) -> list[str]:
    tasks = _json(text).get("Tasks")
    document = tasks.get(_DOCUMENT_KEY) if isinstance(tasks, dict) else None
    if not isinstance(document, dict):
        raise UnreadableReply("no image descriptions")
    descriptions = []
    for index in range(len(document)):
        value = document.get(f"Content of Image {index}")
        if value is None:
            raise UnreadableReply(f"no description of image {index}")
        descriptions.append(str(value))
    return descriptions


def parse_fidelity(text: str) -> float:
    return _score(_json(text).get("Consistency"), "overall_score", "Consistency.overall_score")


@dataclass(frozen=True)
class CoMMPrompts:
    coherence: str
    descriptions: str
    fidelity: str


class CoMM(Benchmark):
    name = "comm"
    protocol = "comm-task4"
    title = "CoMM task 4"
    repository = "https://github.com/HKUST-LongGroup/CoMM"
    metric = (
        "CoMM task 4 (0-10): the mean over items of each judged score (style, entity, trend and "
        "overall consistency, completeness, image quality, text fidelity to images); overall = "
        "the mean of those seven"
    )
    # What gpt4o_eval.py sends.
    judge_temperature = 1.0

    # -- generation ------------------------------------------------------------------------------

    def read_items(self, data: Path | None, clone: Path | None) -> list[BenchItem]:
        if data is None:
            raise ConfigurationError(
                "comm: --data is required (the CoMM test records: the .pth file or a JSON export)",
                hint="download CoMM from its Hugging Face or Google Drive link (see its README)",
            )
        records = _load_comm(data)
        template: str | None = None
        items, seen = [], set()
        for record in records:
            data_id = record.get("data_id")
            if not present(data_id):
                raise ConfigurationError(f"comm: a record of {data} has no data_id")
            item_id = str(data_id)
            if item_id in seen:
                raise ConfigurationError(f"comm: data_id {item_id!r} appears twice in {data}")
            seen.add(item_id)
            question = record.get("question") or record.get("model_input")
            if not isinstance(question, str) or not question.strip():
                if template is None:
                    if clone is None:
                        raise ConfigurationError(
                            "comm: the task-4 question is built from the title with the template in "
                            "CoMM's data loader, read from your clone",
                            hint=f"git clone {self.repository} and pass --bench-repo PATH",
                        )
                    template = task4_question(clone)
                question = template.replace("{SOURCE}", str(record.get("title") or ""))
            kept = {key: record[key] for key in ("data_id", "title", "dataset_type") if key in record}
            kept["question"] = question
            items.append(BenchItem(item_id, str(record.get("dataset_type") or ""), question, (), kept))
        return items

    def folder(self, out: Path, item: BenchItem) -> Path:
        return out / f"{safe_name(item.id)}_{TASK}"

    def record_output(self, item: BenchItem, document: Document, store: ImageStore, out: Path
                      ) -> dict[str, Any]:
        folder = self.folder(out, item)
        parts, images = [], []
        for number, (text, ref) in enumerate(step_outputs(document), start=1):
            piece = f"({number}) {clean_step_text(text)}".rstrip()
            if ref is not None:
                name = f"predict_{len(images) + 1}.png"
                save_png(store, ref, folder / name)
                images.append(name)
                piece += f" {IMAGE_TOKEN}"
            parts.append(piece)
        results = {
            "model_input": item.data["question"],
            "model_output": " ".join(parts),
            "input_image_list": [],
            "output_gt_image_list": [],
            "prediction_image_list": images,
        }
        write_json(folder / RESULTS, results)
        return {"text": results["model_output"],
                "images": [f"{folder.name}/{name}" for name in images]}

    def official_command(self, out: Path) -> str:
        return (f"cd /path/to/CoMM/eval && python -u eval_metric.py --predict_results_path {out} "
                "--model_type MODEL --task_type task4 --ground_truth_path /path/to/test.pth && "
                f"python -u cal_gpt4o_score.py --predict_results_path {out} --model_type MODEL "
                "--task_type task4")

    # -- scoring ---------------------------------------------------------------------------------

    def read_output(self, out: Path, item: BenchItem) -> ItemOutput | None:
        folder = self.folder(out, item)
        try:
            results = json.loads((folder / RESULTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(results, dict) or not isinstance(results.get("model_output"), str):
            return None
        names = [str(name) for name in results.get("prediction_image_list") or []]
        images, missing = [], []
        for name in names:
            path = folder / name
            (images if path.is_file() else missing).append(path if path.is_file() else name)
        return ItemOutput(
            text=results["model_output"], images=tuple(images), missing_images=tuple(missing),
            extra={"question": str(results.get("model_input") or item.data["question"])},
        )

    def load_prompts(self, clone: Path | None) -> CoMMPrompts:
        repo = Clone.at(clone, benchmark=self.name, repository=self.repository)
        texts = {key: repo.text(f"{PROMPT_DIR}/{name}") for key, name in PROMPT_FILES.items()}
        return CoMMPrompts(**texts)

    async def judge_item(self, item: BenchItem, output: ItemOutput | None, prompts: CoMMPrompts,
                         ask: Ask) -> ItemResult:
        if output is None:
            return ItemResult(item.id, item.category, "missing", dict.fromkeys(DIMENSIONS, 0.0),
                              note="no results.json: every score 0")
        question = output.extra.get("question", item.data["question"])
        files = iter(output.images)
        with_images: list[str | ImageInput] = ["INPUT:", question, "OUTPUT:"]
        without_images: list[str | ImageInput] = ["INPUT:", question, "OUTPUT:"]
        judged: list[ImageInput] = []
        for number, step in enumerate(parse_steps(output.text), start=1):
            with_images.append(f"({number})")
            without_images.append(f"({number})")
            for piece in step:
                if piece is not None:
                    with_images.append(piece)
                    without_images.append(piece)
                    continue
                path = next(files, None)
                if path is None or len(judged) >= MAX_IMAGES:
                    continue
                image = image_input(path, max_side=JUDGE_IMAGE_SIDE, format="JPEG")
                index = len(judged)
                judged.append(image)
                with_images += [f" <Img_{index}>", image, f"</Img_{index}>"]
                without_images += [f" <Img_{index}>", f"</Img_{index}>"]

        verdicts = [await ask("coherence", JudgePrompt.of(system(prompts.coherence), user(*with_images)),
                              parse_coherence)]
        if verdicts[0].ok:
            verdicts.append(await ask(
                "descriptions", JudgePrompt.of(system(prompts.descriptions), user(*without_images)),
                _descriptions_for(len(judged)),
            ))
        if verdicts[-1].ok and len(verdicts) == 2:
            pairs = _interleave(verdicts[1].value, judged)
            verdicts.append(await ask("fidelity", JudgePrompt.of(system(prompts.fidelity), user(*pairs)),
                                      parse_fidelity))
        failed = [verdict for verdict in verdicts if not verdict.ok]
        if failed:
            return ItemResult(item.id, item.category, "failed", {}, verdicts,
                              note=f"judge call {failed[0].criterion} failed")
        values = {**verdicts[0].value, "text_fidelity": verdicts[2].value}
        note = f"{len(output.missing_images)} image file(s) missing" if output.missing_images else ""
        return ItemResult(item.id, item.category, "judged", values, verdicts, note)

    def aggregate(self, results: Sequence[ItemResult]) -> Summary:
        scored = [result for result in results if result.scored]
        categories = {key: mean(r.values[key] for r in scored) for key in DIMENSIONS}
        overall = mean(categories.values()) if scored else None
        return Summary(overall, categories if scored else {}, {})

    def headline(self, result: ItemResult) -> float | None:
        return mean(result.values.get(key) for key in DIMENSIONS) if result.scored else None


def _descriptions_for(images: int) -> Any:
    def parse(text: str) -> list[str]:
        descriptions = parse_descriptions(text)
        if len(descriptions) < images:
            raise UnreadableReply(f"{len(descriptions)} descriptions for {images} images")
        return descriptions

    return parse


def _interleave(descriptions: Sequence[str], images: Sequence[ImageInput]) -> list[str | ImageInput]:
    """Description i, then image i, for each image; descriptions left over follow."""
    parts: list[str | ImageInput] = []
    for index, description in enumerate(descriptions):
        parts.append(f"<Description_{index}> Description:{description} </Description_{index}> ")
        if index < len(images):
            parts += [f"<Img_{index}>", images[index], f"</Img_{index}>"]
    return parts


def _load_comm(path: Path) -> list[dict[str, Any]]:
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as exc:
            raise ConfigurationError(
                f"comm: {path} is a torch file; reading it needs torch",
                hint="install torch, or export the records to JSON",
            ) from exc
        try:
            # Plain lists and dicts only: nothing in the file is executed.
            records = torch.load(str(path), weights_only=True)
        except Exception as exc:
            raise ConfigurationError(f"comm: cannot read {path}: {one_line(exc)}") from exc
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ConfigurationError(f"comm: {path} does not hold a list of records")
        return records
    return load_records(path)
