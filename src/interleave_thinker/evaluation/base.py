"""What every benchmark shares: its items, a model's outputs, judged results and their summary.

A benchmark module (``ueval``, ``wise``, ``risebench``, ``comm``) subclasses ``Benchmark``: it
reads the benchmark's published items, turns each into a request, writes what a finished
thread produced in exactly the layout the benchmark's own scorer reads, reads that layout back,
asks the judge with the benchmark's own prompts and aggregates the verdicts by its formulas.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from interleave_thinker.errors import ConfigurationError, one_line
from interleave_thinker.evaluation.judge import JudgePrompt, Verdict
from interleave_thinker.state import Document, ImageRef
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.storage.image_store import ImageStore

# One benchmark file or record this large is not a benchmark file.
MAX_DATA_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class BenchItem:
    """One benchmark item: its id, its category, the request it becomes and its own record.

    ``images`` are absolute paths of the request's input images; ``data`` is the benchmark's
    record as JSON (with any image paths it names resolved to absolute paths).
    """

    id: str
    category: str
    text: str
    images: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "text": self.text,
                "images": list(self.images), "data": self.data}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BenchItem:
        return cls(str(raw["id"]), str(raw.get("category", "")), str(raw["text"]),
                   tuple(raw.get("images") or ()), dict(raw.get("data") or {}))


@dataclass(frozen=True)
class ItemOutput:
    """What the model answered for one item, read from the benchmark's layout: text and image files."""

    text: str = ""
    images: tuple[Path, ...] = ()
    missing_images: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemResult:
    """One item scored: ``judged`` (every verdict read), ``missing`` (no output: scored as the
    benchmark's minimum without the judge) or ``failed`` (a judge call failed: left out of the
    metric, never scored as 0)."""

    id: str
    category: str
    status: str
    values: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    note: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.status in ("judged", "missing")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "status": self.status, "values": self.values,
                "note": self.note, "tags": self.tags,
                "verdicts": [verdict.record() for verdict in self.verdicts]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ItemResult:
        return cls(str(raw["id"]), str(raw.get("category", "")), str(raw["status"]),
                   dict(raw.get("values") or {}), [], str(raw.get("note", "")), dict(raw.get("tags") or {}))


@dataclass
class Summary:
    """The benchmark's headline, its categories and anything else its own scorer prints."""

    overall: float | None
    categories: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)


# ask(criterion, prompt, parse) -> the verdict (cached or asked); never raises for a failed call.
Ask = Callable[[str, JudgePrompt, Callable[[str], Any]], Awaitable[Verdict]]


class Benchmark:
    """A benchmark: subclasses fill in the reading, the layout, the judging and the formulas."""

    name: str = ""
    protocol: str = ""
    title: str = ""
    repository: str = ""
    metric: str = ""
    # The judge's sampling as the benchmark's own scorer sets it; --judge-* flags override.
    judge_temperature: float = 0.0
    judge_max_tokens: int | None = None
    judge_extra_body: dict[str, Any] | None = None

    # -- generation ------------------------------------------------------------------------------

    def read_items(self, data: Path | None, clone: Path | None) -> list[BenchItem]:
        raise NotImplementedError

    def record_output(self, item: BenchItem, document: Document, store: ImageStore, out: Path
                      ) -> dict[str, Any]:
        """Write the item's answer files under ``out``; returns ``{"text", "images"}`` (relative)."""
        raise NotImplementedError

    def write_layout(self, out: Path, items: Sequence[BenchItem], records: dict[str, dict[str, Any]]
                     ) -> list[Path]:
        """Write the files the benchmark's own scorer reads from the per-item records."""
        return []

    def official_command(self, out: Path) -> str:
        return ""

    # -- scoring ---------------------------------------------------------------------------------

    def read_output(self, out: Path, item: BenchItem) -> ItemOutput | None:
        raise NotImplementedError

    def load_prompts(self, clone: Path | None) -> Any:
        raise NotImplementedError

    async def judge_item(self, item: BenchItem, output: ItemOutput | None, prompts: Any, ask: Ask
                         ) -> ItemResult:
        raise NotImplementedError

    def aggregate(self, results: Sequence[ItemResult]) -> Summary:
        raise NotImplementedError

    def describe_criterion(self, item: BenchItem, criterion: str) -> str:
        """What a criterion of an item asks, for the report."""
        return criterion

    def headline(self, result: ItemResult) -> float | None:
        """One number per item, on the overall metric's scale, to rank what changed most."""
        raise NotImplementedError


# -- reading published data ----------------------------------------------------------------------


def load_records(path: Path, *, columns: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Records of a benchmark file: JSON (a list, or one object), JSON lines, Parquet, or a Hugging
    Face dataset folder (``save_to_disk`` output or a hub snapshot with Parquet files).

    ``columns`` keeps only those fields of a dataset (image columns are not decoded).
    """
    if path.is_dir():
        if _is_hf_folder(path):
            return _hf_records(path, columns)
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise ConfigurationError(
                f"{path} holds no JSON files and is not a Hugging Face dataset folder",
                hint="pass the benchmark's data file or the folder that holds it",
            )
        return [record for file in files for record in load_records(file, columns=columns)]
    if not path.is_file():
        raise ConfigurationError(f"benchmark data {path} does not exist", hint="check --data")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise ConfigurationError(f"benchmark data {path} is too large to be a benchmark file")
    if path.suffix == ".parquet":
        return _hf_records(path, columns)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read benchmark data {path}: {one_line(exc)}") from exc
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_json_object(line, f"{path}:{number}"))
        return records
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"benchmark data {path} is not JSON: {one_line(exc)}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise ConfigurationError(f"benchmark data {path} is not a list of records")
    return data


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{where} is not JSON: {one_line(exc)}") from exc
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where} is not a JSON object")
    return value


def _is_hf_folder(path: Path) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return any((path / marker).is_file() for marker in markers) or any(path.rglob("*.parquet"))


def _hf_records(path: Path, columns: Iterable[str] | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigurationError(
            f"{path} is a Hugging Face dataset, which is read with the datasets library",
            hint="pip install 'interleave-thinker[eval]'",
        ) from exc
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        if path.is_dir() and not any(path.rglob("*.parquet")):
            loaded: Any = datasets.load_from_disk(str(path))
        else:
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            tests = [name for name in files if Path(name).name.startswith("test")]
            loaded = datasets.load_dataset("parquet", data_files={"test": tests or files}, split="test")
    except Exception as exc:
        raise ConfigurationError(f"cannot read the dataset {path}: {one_line(exc)}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = "test" if "test" in loaded else next(iter(loaded))
        loaded = loaded[split]
    if columns is not None:
        wanted = [name for name in columns if name in loaded.column_names]
        loaded = loaded.select_columns(wanted)
    return [dict(record) for record in loaded]


def resolve_path(value: Any, base: Path) -> str | None:
    """An image path of a record as an absolute path (relative ones are relative to ``base``)."""
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value)
    return str(path if path.is_absolute() else (base / path).resolve())


def present(value: Any) -> bool:
    """A field counts when it is set: not missing, None, NaN or empty text (as pandas' notna)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def flag(value: Any) -> bool:
    """A true/false field: True, 1 or 'true' (pandas would read NaN for an absent one)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return present(value) and bool(value)


# -- what a finished thread produced -------------------------------------------------------------


def step_outputs(document: Document) -> list[tuple[str, ImageRef | None]]:
    """Each step's text and its final image (None for a text-only or skipped step), in order."""
    return [(step.text, step.image) for step in document.steps]


def save_png(store: ImageStore, ref: ImageRef, path: Path) -> None:
    """The stored image as a PNG file at ``path`` (re-encoded when stored in another format)."""
    data = store.read(ref)
    if ref.media_type != "image/png":
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
    write_atomically(path, data)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """``text`` usable as one path component (benchmark ids are mostly already)."""
    name = _UNSAFE.sub("_", text).strip("._")
    return name or "item"


def write_json(path: Path, value: Any) -> None:
    write_atomically(path, (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def mean(values: Iterable[float | None]) -> float | None:
    kept = [value for value in values if value is not None]
    return sum(kept) / len(kept) if kept else None
