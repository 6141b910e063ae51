"""Generate a benchmark's answers: each item its own resumable thread, written in the benchmark's layout.

Items go through the batch machinery (``batch.arun_batch``): a thread per item whose id is
derived from the benchmark and the item id, so a rerun resumes unfinished items and a finished
one returns its document without calling any model. What each finished thread produced is
recorded under ``DIR/records/`` and the files the benchmark's own scorer reads are (re)written
from all records at the end, so shards that share DIR add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.callbacks import Callbacks

from interleave_thinker.batch import arun_batch, in_shard
from interleave_thinker.context import Backends, Timeouts
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.base import BenchItem, safe_name, write_json
from interleave_thinker.evaluation.benchmarks import get_benchmark
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import RunOptions
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.workspace import Workspace, thread_config

MANIFEST = "eval.json"
ITEMS = "items.jsonl"
RECORDS = "records"
RUNS = "runs"
STAGING = ".eval"

ProgressHandler = Callable[[dict[str, Any]], None]


@dataclass
class EvalRunReport:
    benchmark: str
    out: Path
    items: int
    in_shard: int
    done: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    layout: list[Path] = field(default_factory=list)
    backend_calls: int = 0
    official_command: str = ""


def prompt_id(benchmark: str, item_id: str) -> str:
    """The batch prompt id of an item: its thread id is derived from this, so reruns find it."""
    return f"{benchmark}:{item_id}"


def read_items_file(out: Path) -> list[BenchItem]:
    path = out / ITEMS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(
            f"{out} has no {ITEMS}: it was not written by `interleave eval run`",
            hint="pass --data (and --bench-repo) to read the benchmark's items",
        ) from exc
    return [BenchItem.from_json(json.loads(line)) for line in lines if line.strip()]


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    folder = out / RECORDS
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "id" in record:
            records[str(record["id"])] = record
    return records


def record_path(out: Path, item_id: str) -> Path:
    digest = hashlib.sha256(item_id.encode()).hexdigest()[:10]
    return out / RECORDS / f"{safe_name(item_id)[:80]}-{digest}.json"


def _check_manifest(out: Path, benchmark: str, protocol: str) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return
    if isinstance(existing, dict) and existing.get("benchmark") not in (None, benchmark):
        raise ConfigurationError(
            f"{out} holds {existing['benchmark']} outputs, not {benchmark}",
            hint="give each benchmark (and each protocol) its own --out folder",
        )


async def arun_benchmark(
    benchmark: str,
    *,
    out: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    bench_repo: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    concurrency: int = 4,
    profile: str | None = None,
    backends: Backends | None = None,
    model_settings: ModelSettings | None = None,
    options: RunOptions | None = None,
    max_batch: int = 8,
    max_in_flight: int | None = 1,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    on_progress: ProgressHandler | None = None,
    callbacks: Callbacks = None,
    timeouts: Timeouts | None = None,
    **batch_options: Any,
) -> EvalRunReport:
    """Run every item of the shard (the first ``limit`` items of the benchmark, split by shard)
    and write the benchmark's layout under ``out``. ``run_dir`` defaults to ``out/runs``."""
    bench = get_benchmark(benchmark)
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    out = Path(out)
    clone = Path(bench_repo).expanduser() if bench_repo is not None else None
    items = bench.read_items(Path(data).expanduser() if data is not None else None, clone)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ConfigurationError(f"{benchmark}: the data holds no items")
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {out} exists and is not a folder")
    _check_manifest(out, bench.name, bench.protocol)
    write_json(out / MANIFEST, {
        "benchmark": bench.name, "protocol": bench.protocol,
        "data": str(data) if data is not None else None,
        "bench_repo": str(clone) if clone is not None else None,
        "limit": limit, "items": len(items), "updated": time.time(),
    })
    write_atomically(
        out / ITEMS,
        "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in items).encode("utf-8"),
    )

    by_prompt = {prompt_id(bench.name, item.id): item for item in items}
    prompt_file = out / STAGING / f"eval-{bench.name}.jsonl"
    lines = [
        json.dumps({"id": key, "text": item.text, "images": list(item.images)}, ensure_ascii=False)
        for key, item in by_prompt.items()
    ]
    write_atomically(prompt_file, ("\n".join(lines) + "\n").encode("utf-8"))
    run_dir = Path(run_dir) if run_dir is not None else out / RUNS
    notify = on_progress or (lambda _: None)
    started: dict[str, float] = {}

    def relay(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "batch":
            notify({"event": "run", "benchmark": bench.name, "total": event["total"]})
            return
        item = by_prompt.get(event.get("prompt_id", ""))
        if item is None:
            return
        if kind == "started":
            started[item.id] = time.monotonic()
            notify({"event": "started", "item": item.id})
        elif kind == "finished":
            seconds = time.monotonic() - started.pop(item.id, time.monotonic())
            notify({"event": "finished", "item": item.id, "status": event["status"], "seconds": seconds})

    report = await arun_batch(
        prompt_file, profile=profile, backends=backends, model_settings=model_settings,
        options=options, concurrency=concurrency, shard=shard, max_batch=max_batch,
        max_wait=0.05, max_in_flight=max_in_flight, run_dir=run_dir, checkpointer=checkpointer,
        on_progress=relay, callbacks=callbacks, timeouts=timeouts,
        # The images are the benchmark's own input files, checked when its items were read.
        allow_outside_images=True, **batch_options,
    )

    failed: list[tuple[str, str]] = []
    keys = list(by_prompt)
    for bad in report.bad_lines:
        key = keys[bad.line - 1] if 0 < bad.line <= len(keys) else None
        if key is not None and in_shard(key, shard):
            item = by_prompt[key]
            failed.append((item.id, bad.error))
            write_json(record_path(out, item.id), {"id": item.id, "status": "failed", "error": bad.error})
    # The store the batch used: its ``image_store`` option, else the settings', else the environment.
    image_store = batch_options.get("image_store") or (model_settings.image_store if model_settings else None)
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    store = workspace.image_store
    done = 0
    async with workspace.graph() as graph:
        for outcome in report.outcomes:
            item = by_prompt[outcome.prompt_id]
            if outcome.status != "done":
                failed.append((item.id, outcome.error or "failed"))
                write_json(record_path(out, item.id), {
                    "id": item.id, "status": "failed", "thread": outcome.thread_id,
                    "error": outcome.error,
                })
                continue
            snapshot = await graph.aget_state(thread_config(outcome.thread_id))
            document = snapshot.values["document"]
            written = bench.record_output(item, document, store, out)
            write_json(record_path(out, item.id), {
                "id": item.id, "status": "done", "thread": outcome.thread_id,
                "document": outcome.document, "generator_calls": document.generator_calls, **written,
            })
            done += 1
    layout = bench.write_layout(out, items, read_records(out))
    return EvalRunReport(
        benchmark=bench.name, out=out, items=len(items),
        in_shard=sum(1 for key in keys if in_shard(key, shard)),
        done=done, failed=failed, layout=layout, backend_calls=report.backend_calls,
        official_command=bench.official_command(out.resolve()),
    )
