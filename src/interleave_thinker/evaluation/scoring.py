"""Score a benchmark's outputs with a judge: per-item verdicts, the benchmark's formulas, scores.json.

The outputs are read from the benchmark's own layout in DIR (what ``eval run`` wrote, or what
another system wrote in that layout), the items from ``DIR/items.jsonl`` (or ``--data``). Each
judge call is cached in ``DIR/judge-cache`` per (item, criterion, judge identity); a call that
fails after its tries leaves its item out of the metric, and the summary counts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.base import BenchItem, ItemOutput, ItemResult, write_json
from interleave_thinker.evaluation.benchmarks import get_benchmark
from interleave_thinker.evaluation.judge import (
    Judge,
    JudgeCache,
    JudgePrompt,
    Verdict,
    ask_cached,
)
from interleave_thinker.evaluation.report import score_page
from interleave_thinker.evaluation.run import MANIFEST, read_items_file
from interleave_thinker.storage.atomic import write_atomically

SCORES = "scores.json"
SCORED_ITEMS = "scored-items.jsonl"
REPORT = "report.html"
CACHE = "judge-cache"

ProgressHandler = Callable[[dict[str, Any]], None]


@dataclass
class ScoreReport:
    scores: dict[str, Any]
    path: Path
    items_path: Path
    report: Path
    calls: int
    cached: int


async def ascore_benchmark(
    benchmark: str,
    *,
    out: str | os.PathLike[str],
    judge: Judge,
    bench_repo: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    retry_failed: bool = True,
    on_progress: ProgressHandler | None = None,
) -> ScoreReport:
    """Judge every item of DIR and write ``scores.json``, ``scored-items.jsonl`` and ``report.html``."""
    bench = get_benchmark(benchmark)
    out = Path(out)
    if not out.is_dir():
        raise ConfigurationError(f"--out {out} is not a folder", hint="pass the folder `eval run` wrote")
    manifest = out / MANIFEST
    if manifest.is_file():
        written = json.loads(manifest.read_text(encoding="utf-8")).get("benchmark")
        if written not in (None, bench.name):
            raise ConfigurationError(
                f"{out} holds {written} outputs, not {bench.name}",
                hint=f"score it as {written}: interleave eval score {written} --out {out} ...",
            )
    clone = Path(bench_repo).expanduser() if bench_repo is not None else None
    items = bench.read_items(Path(data).expanduser(), clone) if data is not None else read_items_file(out)
    prompts = bench.load_prompts(clone)
    cache = JudgeCache(out / CACHE, judge.identity)
    notify = on_progress or (lambda _: None)
    notify({"event": "score", "benchmark": bench.name, "total": len(items)})
    calls_before = judge.calls
    previous_hook = judge.on_call
    judge.on_call = lambda: notify({"event": "call"})
    # Items are judged concurrently; the judge bounds its own calls, this bounds memory.
    limit = asyncio.Semaphore(64)
    cached = 0

    async def one(item: BenchItem) -> tuple[BenchItem, ItemOutput | None, ItemResult]:
        nonlocal cached
        async with limit:
            output = bench.read_output(out, item)
            verdicts: list[Verdict] = []

            async def ask(criterion: str, prompt: JudgePrompt, parse: Callable[[str], Any]) -> Verdict:
                verdict = await ask_cached(judge, cache, item.id, criterion, prompt, parse,
                                           retry_failed=retry_failed)
                verdicts.append(verdict)
                return verdict

            result = await bench.judge_item(item, output, prompts, ask)
            hits = sum(verdict.cached for verdict in verdicts)
            cached += hits
            notify({"event": "item", "item": item.id, "status": result.status,
                    "calls": len(verdicts) - hits, "cached": hits, "note": result.note})
            return item, output, result

    try:
        judged = await asyncio.gather(*(one(item) for item in items))
    finally:
        judge.on_call = previous_hook
    results = [result for _, _, result in judged]
    summary = bench.aggregate(results)
    failures = sum(not verdict.ok for result in results for verdict in result.verdicts)
    scores = {
        "benchmark": bench.name,
        "protocol": bench.protocol,
        "judge": judge.identity,
        "metric": bench.metric,
        "overall": summary.overall,
        "categories": summary.categories,
        "items": len(results),
        "judged": sum(result.status == "judged" for result in results),
        "judge_failures": failures,
        "missing": sum(result.status == "missing" for result in results),
        "scored": sum(result.scored for result in results),
        "failed_items": [result.id for result in results if result.status == "failed"],
        "details": summary.extra,
        "judge_calls": judge.calls - calls_before,
        "judge_cached": cached,
        "scored_at": time.time(),
    }
    path = out / SCORES
    write_json(path, scores)
    items_path = out / SCORED_ITEMS
    lines = []
    for result in results:
        record = result.to_json()
        record["headline"] = bench.headline(result)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomically(items_path, "".join(lines).encode("utf-8"))
    report = out / REPORT
    write_atomically(report, score_page(bench, scores, judged, out).encode("utf-8"))
    return ScoreReport(scores, path, items_path, report, scores["judge_calls"], cached)


def read_scores(out: Path) -> tuple[dict[str, Any], list[ItemResult]]:
    """A scored DIR's summary and per-item results (what ``eval compare`` reads)."""
    try:
        scores = json.loads((out / SCORES).read_text(encoding="utf-8"))
        lines = (out / SCORED_ITEMS).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"{out} has no readable {SCORES} and {SCORED_ITEMS}",
            hint=f"score it first: interleave eval score BENCH --out {out} --judge MODEL",
        ) from exc
    return scores, [ItemResult.from_json(json.loads(line)) for line in lines if line.strip()]
