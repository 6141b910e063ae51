"""The ``interleave eval`` commands: generate a benchmark's answers, judge them, compare two runs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from interleave_thinker.cli.common import callbacks, err, out, quiet_libraries, reports_errors
from interleave_thinker.cli.generation import (
    ConcurrencyOption,
    MaxBatchOption,
    MaxInFlightOption,
    ShardOption,
)
from interleave_thinker.cli.options import NO_FLAGS, RunFlags, TraceFileOption, run_flags
from interleave_thinker.render.safe_text import terminal_text

eval_app = typer.Typer(
    name="eval",
    help="Benchmarks (UEval, WISE, RISEBench, CoMM): generate answers as resumable threads, "
    "judge them with any chat model, compare two runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BenchArgument = Annotated[
    str, typer.Argument(help="ueval, wise (legacy protocol), wise-verified, risebench or comm.")
]
OutOption = Annotated[
    Path, typer.Option("--out", help="The run's folder: the benchmark's layout, scores and report.")
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="The benchmark's published items: a Hugging Face dataset folder, a JSON/JSONL file "
        "or the repository's data files (WISE and RISEBench default to those of --bench-repo).",
    ),
]
BenchRepoOption = Annotated[
    Path | None,
    typer.Option(
        "--bench-repo",
        help="Your clone of the benchmark's repository: its judge prompts are read from it "
        "(as text, never run).",
    ),
]
LimitOption = Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N items.")]
JudgeOption = Annotated[
    str,
    typer.Option(
        "--judge",
        help="Judge model: the served name (with --judge-url), provider:name (openai:gpt-4.1, "
        "google_genai:gemini-2.5-pro) or a local folder/hub id run in this process.",
    ),
]
JudgeUrlOption = Annotated[
    str | None, typer.Option("--judge-url", help="OpenAI-compatible server of the judge (vLLM .../v1).")
]


@reports_errors
@run_flags()
def run_benchmark(
    bench: BenchArgument,
    out_dir: OutOption,
    data: DataOption = None,
    bench_repo: BenchRepoOption = None,
    limit: LimitOption = None,
    shard: ShardOption = "0/1",
    concurrency: ConcurrencyOption = 4,
    max_batch: MaxBatchOption = 8,
    max_in_flight: MaxInFlightOption = 1,
    flags: RunFlags = NO_FLAGS,
) -> None:
    """Generate the benchmark's answers, each item its own thread, in the layout its scorer reads.

    A rerun resumes unfinished items; a finished item costs nothing. Threads live in OUT/runs
    unless --run-dir or --checkpointer say otherwise.
    """
    from interleave_thinker.batch import parse_shard
    from interleave_thinker.evaluation.run import arun_benchmark

    quiet_libraries()
    with _RunProgress() as progress:
        report = asyncio.run(
            arun_benchmark(
                bench, out=out_dir, data=data, bench_repo=bench_repo, limit=limit,
                shard=parse_shard(shard), concurrency=concurrency, profile=flags.profile,
                model_settings=flags.model_settings(), options=flags.run_options(),
                max_batch=max_batch, max_in_flight=max_in_flight or None, run_dir=flags.run_dir,
                checkpointer=flags.checkpointer, on_progress=progress.update,
                callbacks=flags.callbacks(), image_store=flags.image_store,
            )
        )
    for item, error in report.failed:
        err.print(f"error: item {item}: {error}")
    err.print(
        f"done: {report.done} of {report.in_shard} items of this shard ({report.items} in all), "
        f"{len(report.failed)} failed; {report.backend_calls} generator backend calls"
    )
    for path in report.layout:
        err.print(f"wrote {path}")
    if report.official_command:
        err.print(f"official scorer: {report.official_command}")
    out.print(str(report.out))
    if report.failed:
        raise typer.Exit(1)


@reports_errors
def score_benchmark(
    bench: BenchArgument,
    out_dir: OutOption,
    judge: JudgeOption,
    judge_url: JudgeUrlOption = None,
    bench_repo: BenchRepoOption = None,
    data: DataOption = None,
    judge_concurrency: Annotated[
        int, typer.Option("--judge-concurrency", min=1, help="Judge calls at once.")
    ] = 8,
    judge_attempts: Annotated[
        int,
        typer.Option("--judge-attempts", min=1,
                     help="Tries per criterion (a failed call or an unreadable reply is asked again)."),
    ] = 3,
    judge_timeout: Annotated[
        float, typer.Option("--judge-timeout", min=1, help="Seconds one judge request may take.")
    ] = 600.0,
    judge_temperature: Annotated[
        float | None,
        typer.Option("--judge-temperature", help="Default: what the benchmark's own scorer uses."),
    ] = None,
    judge_max_tokens: Annotated[
        int | None,
        typer.Option("--judge-max-tokens", min=1, help="Default: what the benchmark's own scorer uses."),
    ] = None,
    retry_failures: Annotated[
        bool,
        typer.Option("--retry-failures/--keep-failures",
                     help="Ask again the criteria whose judge call failed last time."),
    ] = True,
    trace_file: TraceFileOption = None,
) -> None:
    """Judge every item of OUT and write OUT/scores.json, scored-items.jsonl and report.html.

    Each verdict is cached per (item, criterion, judge) in OUT/judge-cache, so a rescore asks
    only what has no answer yet. A judge call that fails after its tries leaves its item out of
    the metric (never scored 0); the summary counts it.
    """
    from interleave_thinker.evaluation.benchmarks import get_benchmark
    from interleave_thinker.evaluation.judge import Judge, judge_chat_model
    from interleave_thinker.evaluation.scoring import ascore_benchmark

    quiet_libraries()
    spec = get_benchmark(bench)
    model = judge_chat_model(
        judge, judge_url,
        temperature=spec.judge_temperature if judge_temperature is None else judge_temperature,
        max_tokens=judge_max_tokens or spec.judge_max_tokens,
        timeout=judge_timeout,
        extra_body=spec.judge_extra_body,
    )
    judge_runner = Judge(
        model, attempts=judge_attempts, concurrency=judge_concurrency,
        timeout=judge_timeout * 4, callbacks=callbacks(trace_file),
    )
    with _ScoreProgress() as progress:
        report = asyncio.run(
            ascore_benchmark(
                bench, out=out_dir, judge=judge_runner, bench_repo=bench_repo, data=data,
                retry_failed=retry_failures, on_progress=progress.update,
            )
        )
    scores = report.scores
    err.print(f"{scores['benchmark']} ({scores['protocol']}), judge {scores['judge']}")
    err.print(f"overall: {_shown(scores['overall'])}")
    for name, value in scores["categories"].items():
        err.print(f"  {name}: {_shown(value)}")
    note = scores["details"].get("overall_note") if isinstance(scores["details"], dict) else None
    if note:
        err.print(f"note: {note}")
    err.print(
        f"{scores['items']} items: {scores['judged']} judged, {scores['missing']} without output, "
        f"{len(scores['failed_items'])} left out after {scores['judge_failures']} failed judge "
        f"call(s); {report.calls} judge calls made, {report.cached} answered from the cache"
    )
    err.print(f"report: {report.report}")
    out.print(str(report.path))


@reports_errors
def compare(
    dir_a: Annotated[Path, typer.Argument(help="The baseline run's folder (scored).")],
    dir_b: Annotated[Path, typer.Argument(help="The run compared with it (scored).")],
    resamples: Annotated[int, typer.Option("--resamples", min=1, help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    top: Annotated[int, typer.Option("--top", min=0, help="Items that changed most, listed.")] = 10,
    html: Annotated[
        Path | None, typer.Option("--html", help="Where the HTML page goes (default DIR_B/compare-A.html).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """B against A: overall and per-category deltas with bootstrap intervals, and the items
    that changed most; a table on stdout and an HTML page."""
    from rich.table import Table

    from interleave_thinker.evaluation.compare import compare_runs
    from interleave_thinker.evaluation.report import compare_page
    from interleave_thinker.storage.atomic import write_atomically

    comparison = compare_runs(dir_a, dir_b, resamples=resamples, seed=seed, top=top)
    page = html or dir_b / f"compare-{comparison.name_a}.html"
    write_atomically(page, compare_page(comparison).encode("utf-8"))
    for note in comparison.notes:
        err.print(f"note: {note}")
    if as_json:
        out.print(json.dumps(comparison.to_json(), indent=2, ensure_ascii=False))
    else:
        table = Table(title=terminal_text(f"{comparison.benchmark}: B - A"), title_justify="left")
        for column in ("", "A", "B", "B - A", "95% CI", "items"):
            table.add_column(column, justify="left" if not column else "right")
        for row in comparison.rows:
            interval = "–" if row.low is None or row.high is None else f"[{row.low:+.4f}, {row.high:+.4f}]"
            delta = "–" if row.delta is None else f"{row.delta:+.4f}"
            table.add_row(terminal_text(row.name), _shown(row.a), _shown(row.b), delta, interval,
                          str(row.paired))
        out.print(table)
        if comparison.changed:
            changed = Table(title="items that changed most", title_justify="left")
            for column in ("item", "category", "A", "B", "B - A"):
                changed.add_column(column)
            for change in comparison.changed:
                changed.add_row(terminal_text(change.id), terminal_text(change.category),
                                _shown(change.a), _shown(change.b), f"{change.delta:+.4f}")
            out.print(changed)
        err.print(comparison.method)
    err.print(f"html: {page}")


def _shown(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


class _Rate:
    """Things per minute since a start, for the progress line."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def per_minute(self, count: int) -> str:
        minutes = (time.monotonic() - self.start) / 60
        return f"{count / minutes:.1f}/min" if minutes > 0 and count else "–"


class _RunProgress:
    """Items done of the shard, running, failed, rate and ETA; one line per finished item."""

    def __enter__(self) -> _RunProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[running]} running, {task.fields[failed]} failed, {task.fields[rate]}"),
            TimeRemainingColumn(), console=err,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("items", total=None, running=0, failed=0, rate="–")
        self._running = self._failed = self._done = 0
        self._rate = _Rate()
        return self

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run":
            self._progress.update(self._task, total=event["total"], description=event["benchmark"])
            return
        if kind == "started":
            self._running += 1
        elif kind == "finished":
            self._running -= 1
            self._done += 1
            self._failed += event["status"] == "failed"
            self._progress.console.print(terminal_text(
                f"item {event['item']}: {event['status']} in {event['seconds']:.1f} s"
            ), markup=False, highlight=False)
            self._progress.advance(self._task)
        self._progress.update(self._task, running=self._running, failed=self._failed,
                              rate=self._rate.per_minute(self._done))

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)


class _ScoreProgress:
    """Items judged, judge calls made and their rate, failures and ETA; one line per item."""

    def __enter__(self) -> _ScoreProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[calls]} judge calls ({task.fields[rate]}), "
                       "{task.fields[failed]} items left out"),
            TimeRemainingColumn(), console=err,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("judging", total=None, calls=0, rate="–", failed=0)
        self._calls = self._failed = 0
        self._rate = _Rate()
        return self

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "score":
            self._progress.update(self._task, total=event["total"], description=event["benchmark"])
            return
        if kind == "call":
            self._calls += 1
        elif kind == "item":
            self._failed += event["status"] == "failed"
            note = f" ({event['note']})" if event.get("note") else ""
            self._progress.console.print(terminal_text(
                f"item {event['item']}: {event['status']}, {event['calls']} judge calls, "
                f"{event['cached']} cached{note}"
            ), markup=False, highlight=False)
            self._progress.advance(self._task)
        self._progress.update(self._task, calls=self._calls, failed=self._failed,
                              rate=self._rate.per_minute(self._calls))

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)


eval_app.command("run")(run_benchmark)
eval_app.command("score")(score_benchmark)
eval_app.command("compare")(compare)

__all__ = ["eval_app"]
