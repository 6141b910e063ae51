"""Training sets from finished trajectories: LLaMA-Factory SFT files, EasyR1 RL records, a GRPO dataset.

``aexport_training(kind, selection, out, ...)`` writes, under ``out``:

- ``planner-sft``: ``planner_sft.json`` (sharegpt: ``{"messages": [...], "images": [...]}``, one
  record per finished thread) and the ``sft_planner`` entry of ``dataset_info.json``;
- ``critic-sft``: ``critic_sft.json`` (one record per judged attempt) and ``sft_critic``;
- ``critic-rl``: ``critic_rl.jsonl``, EasyR1's records (``origin_prompt``, ``rewritten_prompt``,
  ``origin_image_path``, ``edited_image_path``, ``evaluation``), labels from a judge;
- ``grpo``: a Hugging Face ``datasets`` folder (``save_to_disk``) with conversational prompts in
  the critic layout, an ``images`` column and the label columns, for TRL's GRPOTrainer.

Every image is copied (or hard-linked with ``link``) to ``out/images`` and named by absolute
path. The user turns come from the prompt pack code the graph runs (see ``training.samples``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from PIL import Image

from interleave_thinker.errors import ConfigurationError, ImageError
from interleave_thinker.evaluation.judge import ImageInput
from interleave_thinker.input_files import shown_path
from interleave_thinker.models.messages import REF_PREFIX
from interleave_thinker.state import MEDIA_SUFFIXES, ImageRef
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.storage.image_store import CheckedImage, ImageStore, encode_png
from interleave_thinker.training.judging import StepJudge
from interleave_thinker.training.progress import Bar, Bars
from interleave_thinker.training.samples import (
    CriticSample,
    PackChooser,
    critic_samples,
    planner_sample,
)
from interleave_thinker.training.threads import ReadReport, Selection, aread_trajectories
from interleave_thinker.workspace import Workspace

Kind = Literal["planner-sft", "critic-sft", "critic-rl", "grpo"]
KINDS: tuple[str, ...] = ("planner-sft", "critic-sft", "critic-rl", "grpo")
# File name and dataset_info.json entry of each SFT kind (the names the official configs use).
SFT_FILES = {
    "planner-sft": ("planner_sft.json", "sft_planner"),
    "critic-sft": ("critic_sft.json", "sft_critic"),
}
RL_FILE = "critic_rl.jsonl"
DATASET_INFO = "dataset_info.json"
# LLaMA-Factory counts these tokens in the text against the images (and videos, audios).
MEDIA_TOKENS = ("<image>", "<video>", "<audio>")
SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}
_ROLES: dict[type[BaseMessage], str] = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


@dataclass
class ExportReport:
    """What an export wrote and what it left out, and why."""

    kind: str
    out: Path
    files: list[Path] = field(default_factory=list)
    threads: int = 0
    samples: int = 0
    images: int = 0
    prompts: list[str] = field(default_factory=list)
    left_out_threads: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    judge: str | None = None
    judge_calls: int = 0
    judge_failures: int = 0

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["files"] = [str(path) for path in self.files]
        return data


@dataclass(frozen=True)
class LabelOptions:
    """How RL labels are made: the judge's scores, and where ``success`` comes from (the critic's
    recorded verdict, or the judge: both scores at least ``success_threshold``)."""

    judge: StepJudge
    success_from: Literal["critic", "judge"] = "critic"
    success_threshold: float = 7.0


class _Unusable(Exception):
    """A sample LLaMA-Factory would refuse; the message is the reason it is skipped."""


# ---------------------------------------------------------------------------------------------
# Images under out/images


class ImageFiles:
    """Copies (or hard links) images from the image store to ``root``, each once, by hash."""

    def __init__(self, root: Path, store: Any, *, link: bool = False, bar: Bar | None = None) -> None:
        self.root = root
        self.store = store
        self.link = link
        self.bar = bar
        self.written = 0
        self._done: dict[str, Path] = {}

    def path(self, ref: ImageRef, *, data: bytes | None = None, max_pixels: int | None = None) -> Path:
        """The absolute path of ``ref`` under ``root`` (written if needed); ``data`` gives the
        bytes of an image not in the store (the white canvas); ``max_pixels`` a shrunk copy."""
        key = f"{ref.sha256}:{max_pixels or 0}"
        if key in self._done:
            return self._done[key]
        shrink = max_pixels is not None and ref.width * ref.height > max_pixels
        suffix = ".png" if shrink else MEDIA_SUFFIXES[ref.media_type]
        name = f"{ref.sha256}-max{max_pixels}px{suffix}" if shrink else f"{ref.sha256}{suffix}"
        target = (self.root / ref.sha256[:2] / name).absolute()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if shrink:
                assert max_pixels is not None
                original = data if data is not None else self.store.read(ref)
                write_atomically(target, _shrunk(original, max_pixels))
            elif data is not None:
                write_atomically(target, data)
            elif not (self.link and self._linked(ref, target)):
                write_atomically(target, self.store.read(ref))
            self.written += 1
        if self.bar is not None:
            self.bar.advance()
        self._done[key] = target
        return target

    def _linked(self, ref: ImageRef, target: Path) -> bool:
        """A hard link to the store's file, when the store keeps files and the link can be made."""
        if not isinstance(self.store, ImageStore):
            return False
        source = self.store.path_for(ref)
        if not self.store.contains(ref):
            return False
        try:
            os.link(source, target)
        except OSError:
            return False
        return True


def _shrunk(data: bytes, max_pixels: int) -> bytes:
    """A PNG of the image scaled down (aspect kept) to at most ``max_pixels`` pixels."""
    import io

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        scale = (max_pixels / (image.width * image.height)) ** 0.5
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return encode_png(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------------
# Message conversions


def _image_block_ref(block: dict, refs: dict[str, ImageRef]) -> ImageRef:
    file_id = block.get("file_id")
    if not (isinstance(file_id, str) and file_id.startswith(REF_PREFIX)):
        raise _Unusable("an image part does not name a stored image")
    sha = file_id.removeprefix(REF_PREFIX)
    if sha not in refs:
        raise _Unusable(f"image {sha[:12]} is not one of the sample's images")
    return refs[sha]


def _parts(message: BaseMessage) -> list[str | dict]:
    content = message.content
    if isinstance(content, str):
        return [content]
    return [part if isinstance(part, str) else dict(part) for part in content]


def _role(message: BaseMessage) -> str:
    for kind, role in _ROLES.items():
        if isinstance(message, kind):
            return role
    raise _Unusable(f"a {type(message).__name__} has no sharegpt role")


def sharegpt_record(
    messages: Sequence[BaseMessage], reply: str, image_path: Callable[[dict], Path]
) -> dict[str, Any]:
    """``{"messages": [{"role", "content"}], "images": [paths]}``: each image part becomes an
    ``<image>`` token where it stood, its file the next entry of ``images``."""
    turns: list[dict[str, str]] = []
    images: list[str] = []
    for message in messages:
        pieces = []
        for part in _parts(message):
            if isinstance(part, str):
                text = part
            elif part.get("type") == "text":
                text = str(part.get("text", ""))
            elif part.get("type") == "image":
                pieces.append("<image>")
                images.append(str(image_path(part)))
                continue
            else:
                raise _Unusable(f"a {part.get('type')!r} part cannot go into a sharegpt record")
            _check_media_tokens(text)
            pieces.append(text)
        turns.append({"role": _role(message), "content": "".join(pieces)})
    _check_media_tokens(reply)
    turns.append({"role": "assistant", "content": reply})
    return {"messages": turns, "images": images}


def _check_media_tokens(text: str) -> None:
    for token in MEDIA_TOKENS:
        if token in text:
            raise _Unusable(f"text holds a literal {token} (LLaMA-Factory would count it as media)")


def trl_prompt(messages: Sequence[BaseMessage], image_path: Callable[[dict], Path]
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """TRL's conversational prompt (``{"type": "image"}`` placeholders filled, in order, from the
    ``images`` column) and the image paths."""
    turns: list[dict[str, Any]] = []
    images: list[str] = []
    for message in messages:
        content: list[dict[str, Any]] = []
        for part in _parts(message):
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            elif part.get("type") == "text":
                content.append({"type": "text", "text": str(part.get("text", ""))})
            elif part.get("type") == "image":
                content.append({"type": "image", "text": None})
                images.append(str(image_path(part)))
            else:
                raise _Unusable(f"a {part.get('type')!r} part cannot go into a TRL prompt")
        turns.append({"role": _role(message), "content": content})
    return turns, images


# ---------------------------------------------------------------------------------------------
# Export


def _check_out(out: Path, workspace: Workspace, kind: str) -> Path:
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {shown_path(out)} is a file", hint="pass a folder (it is created)")
    resolved = out.resolve()
    for path in workspace.protected_paths():
        guarded = path.resolve()
        if resolved == guarded or resolved.is_relative_to(guarded):
            raise ConfigurationError(
                f"--out {shown_path(out)} is inside the run's own data ({shown_path(path)})",
                hint="export to a folder outside the run directory's images, ledgers and checkpoints",
            )
    if kind == "grpo" and _is_llamafactory_folder(out):
        raise ConfigurationError(
            f"--out {shown_path(out)} holds LLaMA-Factory's {DATASET_INFO}; a datasets folder writes "
            "its own file of that name",
            hint="export grpo to a folder of its own",
        )
    if kind != "grpo" and (out / "state.json").is_file() and not _is_llamafactory_folder(out):
        raise ConfigurationError(
            f"--out {shown_path(out)} is a Hugging Face datasets folder",
            hint="export the SFT and RL files to another folder",
        )
    return resolved


def _is_llamafactory_folder(out: Path) -> bool:
    try:
        data = json.loads((out / DATASET_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(
        isinstance(entry, dict) and "formatting" in entry for entry in data.values()
    )


async def aexport_training(
    kind: str,
    selection: Selection,
    out: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    image_store: str | None = None,
    prompts: str | None = None,
    link: bool = False,
    labels: LabelOptions | None = None,
    dataset_name: str | None = None,
    bars: Bars | None = None,
) -> ExportReport:
    """Export the trajectories ``selection`` names as training data of ``kind`` under ``out``."""
    if kind not in KINDS:
        raise ConfigurationError(f"unknown training data kind {kind!r}",
                                 hint=f"use one of {', '.join(KINDS)}")
    if kind in ("critic-rl", "grpo") and labels is None:
        raise ConfigurationError(
            f"{kind} records carry labels from a judge, and no judge was given",
            hint="pass --judge MODEL (and --judge-url URL for a served one)",
        )
    bars = bars or Bars(enabled=False)
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    root = _check_out(Path(out), workspace, kind)
    chooser = PackChooser(prompts)
    threads_bar = bars.add("threads")

    def on_thread(_: str, total: int) -> None:
        threads_bar.total(total)
        threads_bar.advance()

    read: ReadReport = await aread_trajectories(
        selection, run_dir=workspace.run_dir, checkpointer=workspace.checkpointer_url,
        image_store=workspace.image_store_url, on_thread=on_thread,
    )
    report = ExportReport(kind=kind, out=root, left_out_threads=dict(read.left_out))
    files = ImageFiles(root / "images", workspace.image_store, link=link, bar=bars.add("images"))
    packs: set[str] = set()
    if kind == "planner-sft":
        records = []
        for trajectory in read.trajectories:
            statuses = {item.status for item in trajectory.document.steps if item.status != "text"}
            if not statuses <= selection.statuses:
                report.left_out_threads[trajectory.thread_id] = (
                    f"has {', '.join(sorted(statuses - selection.statuses))} steps (--status)"
                )
                continue
            pack = chooser.pack_for(trajectory)
            packs.add(pack.identity)
            sample = planner_sample(trajectory, pack)
            refs = {ref.sha256: ref for ref in trajectory.request.images}
            record = await asyncio.to_thread(_sharegpt_or_skip, report, sample.messages, sample.reply,
                                             lambda part, refs=refs: _file(files, part, refs, {}))
            if record is not None:
                records.append(record)
                report.threads += 1
        report.samples = len(records)

        def write() -> list[Path]:
            return _write_sharegpt(root, kind, records, dataset_name)
    else:
        samples: list[CriticSample] = []
        threads = set()
        for trajectory in read.trajectories:
            pack = chooser.pack_for(trajectory)
            packs.add(pack.identity)
            for sample in critic_samples(trajectory, pack, selection.statuses, report.skipped):
                samples.append(sample)
                threads.add(sample.thread_id)
        if kind == "critic-sft":
            records = []
            for sample in samples:
                record = await asyncio.to_thread(
                    _sharegpt_or_skip, report, sample.messages, sample.reply, _sample_files(files, sample)
                )
                if record is not None:
                    records.append(record)
            report.samples = len(records)

            def write() -> list[Path]:
                return _write_sharegpt(root, kind, records, dataset_name)
        else:
            assert labels is not None
            report.judge = labels.judge.judge.identity
            calls_before = labels.judge.judge.calls
            labelled = await _labelled(samples, files, labels, report, bars)
            report.judge_calls = labels.judge.judge.calls - calls_before
            report.samples = len(labelled)

            def write() -> list[Path]:
                if kind == "critic-rl":
                    return [_write_rl(root, labelled)]
                return [_write_grpo(root, labelled, files)]
        report.threads = len(threads)
    report.prompts = sorted(packs)
    if report.samples == 0:
        raise ConfigurationError(
            f"no {kind} samples in the {len(read.trajectories)} finished thread(s) selected"
            + (f" ({_skips(report)})" if report.skipped or report.left_out_threads else ""),
            hint="check the threads, --status and --since (critic samples need judged attempts)",
        )
    report.files += await asyncio.to_thread(write)
    report.images = files.written
    summary = root / f"export-{kind}.json"
    text = json.dumps({**report.as_json(), "created": time.time()}, indent=2) + "\n"
    write_atomically(summary, text.encode())
    return report


def _skips(report: ExportReport) -> str:
    reasons = [f"{count} {reason}" for reason, count in report.skipped.items()]
    reasons += [f"thread {thread}: {why}" for thread, why in list(report.left_out_threads.items())[:3]]
    return "; ".join(reasons)


def _file(files: ImageFiles, part: dict, refs: dict[str, ImageRef], canvases: dict[str, CheckedImage | None]
          ) -> Path:
    ref = _image_block_ref(part, refs)
    canvas = canvases.get(ref.sha256)
    max_pixels = part.get("max_pixels")
    return files.path(ref, data=canvas.data if canvas else None,
                      max_pixels=max_pixels if isinstance(max_pixels, int) else None)


def _sample_files(files: ImageFiles, sample: CriticSample) -> Callable[[dict], Path]:
    """The file of each image part of a critic sample's messages (previous, candidate)."""
    refs = {sample.previous.sha256: sample.previous, sample.attempt.image.sha256: sample.attempt.image}
    canvases = {sample.previous.sha256: sample.canvas} if sample.canvas else {}
    return lambda part: _file(files, part, refs, canvases)


def _sharegpt_or_skip(report: ExportReport, messages: Sequence[BaseMessage], reply: str,
                      image_path: Callable[[dict], Path]) -> dict[str, Any] | None:
    try:
        return sharegpt_record(messages, reply, image_path)
    except _Unusable as exc:
        report.skip(f"samples skipped: {exc}")
        return None
    except ImageError as exc:
        report.skip(f"samples skipped: an image is missing or damaged ({exc.message})")
        return None


def _write_json_array(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """A JSON array written record by record to a temporary file, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    try:
        with temp.open("w", encoding="utf-8") as handle:
            handle.write("[\n")
            for index, record in enumerate(records):
                handle.write(("" if index == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
            handle.write("\n]\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _write_sharegpt(root: Path, kind: str, records: list[dict[str, Any]], name: str | None) -> list[Path]:
    file_name, entry = SFT_FILES[kind]
    data_file = root / file_name
    _write_json_array(data_file, records)
    info_path = root / DATASET_INFO
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            info = {}
    except (OSError, ValueError):
        info = {}
    info[name or entry] = {
        "file_name": str(data_file),
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": dict(SHAREGPT_TAGS),
    }
    write_atomically(info_path, (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode())
    return [data_file, info_path]


@dataclass(frozen=True)
class _Labelled:
    sample: CriticSample
    before: Path
    after: Path
    semantics: float
    quality: float
    success: bool


async def _labelled(samples: list[CriticSample], files: ImageFiles, labels: LabelOptions,
                    report: ExportReport, bars: Bars) -> list[_Labelled]:
    """Each sample with its judge labels, in order; samples the judge could not score are left
    out and counted (never scored 0)."""
    judge_bar = bars.add("judge", total=2 * len(samples))

    def materialise() -> list[tuple[CriticSample, Path, Path]]:
        ready = []
        for sample in samples:
            try:
                before = files.path(sample.previous, data=sample.canvas.data if sample.canvas else None)
                after = files.path(sample.attempt.image)
            except ImageError as exc:
                report.skip(f"samples skipped: an image is missing or damaged ({exc.message})")
                judge_bar.advance(2)
                continue
            ready.append((sample, before, after))
        return ready

    async def label(sample: CriticSample, before: Path, after: Path) -> _Labelled | None:
        item = f"{sample.thread_id}/step-{sample.step.number}/attempt-{sample.attempt.number}"
        semantic, quality, _ = await labels.judge.scores(
            ImageInput(before, sample.previous.sha256), ImageInput(after, sample.attempt.image.sha256),
            sample.planned_prompt, item=item,
        )
        judge_bar.advance(2)
        if semantic is None or quality is None:
            report.judge_failures += 1
            report.skip("samples left out: the judge gave no readable score")
            return None
        if labels.success_from == "judge":
            success = semantic >= labels.success_threshold and quality >= labels.success_threshold
        else:
            success = sample.critique.success
        return _Labelled(sample, before, after, semantic, quality, success)

    ready = await asyncio.to_thread(materialise)
    results = await asyncio.gather(*(label(*entry) for entry in ready))
    return [result for result in results if result is not None]


def _rl_record(item: _Labelled) -> dict[str, Any]:
    sample = item.sample
    return {
        "origin_prompt": sample.planned_prompt,
        "rewritten_prompt": sample.attempt.prompt,
        "origin_image_path": str(item.before),
        "edited_image_path": str(item.after),
        "evaluation": {"semantics": item.semantics, "quality": item.quality, "success": item.success},
        "thread_id": sample.thread_id,
        "step": sample.step.number,
        "attempt": sample.attempt.number,
    }


def _write_rl(root: Path, labelled: list[_Labelled]) -> Path:
    path = root / RL_FILE
    lines = "".join(json.dumps(_rl_record(item), ensure_ascii=False) + "\n" for item in labelled)
    write_atomically(path, lines.encode("utf-8"))
    return path


GRPO_LABEL_COLUMNS = ("success", "semantics", "quality")


def grpo_features() -> Any:
    """The GRPO dataset's columns and types."""
    from datasets import Features, Image, List, Value

    text_part = {"type": Value("string"), "text": Value("string")}
    return Features({
        "prompt": List({"role": Value("string"), "content": List(text_part)}),
        "images": List(Image()),
        "origin_prompt": Value("string"),
        "rewritten_prompt": Value("string"),
        "origin_image_path": Value("string"),
        "edited_image_path": Value("string"),
        "origin_blank": Value("bool"),
        "success": Value("bool"),
        "semantics": Value("float64"),
        "quality": Value("float64"),
        "thread_id": Value("string"),
        "step": Value("int64"),
        "attempt": Value("int64"),
    })


def _write_grpo(root: Path, labelled: list[_Labelled], files: ImageFiles) -> Path:
    try:
        from datasets import Dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "the grpo export writes a Hugging Face datasets folder, and datasets is not installed",
            hint="pip install 'interleave-thinker[train]'",
        ) from exc
    rows = []
    for item in labelled:
        sample = item.sample
        prompt, images = trl_prompt(sample.messages, _sample_files(files, sample))
        record = _rl_record(item)
        rows.append({
            "prompt": prompt,
            "images": images,
            "origin_prompt": record["origin_prompt"],
            "rewritten_prompt": record["rewritten_prompt"],
            "origin_image_path": record["origin_image_path"],
            "edited_image_path": record["edited_image_path"],
            "origin_blank": sample.canvas is not None,
            "success": item.success,
            "semantics": float(item.semantics),
            "quality": float(item.quality),
            "thread_id": sample.thread_id,
            "step": sample.step.number,
            "attempt": sample.attempt.number,
        })
    dataset = Dataset.from_list(rows, features=grpo_features())
    # save_to_disk writes beside out/images; an earlier dataset's shards are replaced.
    for stale in root.glob("data-*.arrow"):
        stale.unlink()
    dataset.save_to_disk(str(root))
    return root

