"""``interleave export``: a thread's document (``export THREAD``), or training data from many
threads (``export training KIND``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from interleave_thinker.cli.common import err, out, reports_errors
from interleave_thinker.cli.evaluation import JudgeUrlOption
from interleave_thinker.cli.options import CheckpointerOption, ImageStoreOption, RunDirOption
from interleave_thinker.cli.threads import export as export_document_command
from interleave_thinker.errors import ConfigurationError

# The subcommand that `interleave export THREAD ...` (no subcommand named) runs.
_DOCUMENT_COMMAND = "thread"
_TRAINING_COMMAND = "training"


class ExportGroup(TyperGroup):
    """``export training ...`` runs the training export; anything else (``export THREAD
    --format md``) is the document export, as before, without naming its subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [_DOCUMENT_COMMAND, *args]
        return super().parse_args(ctx, args)


export_app = typer.Typer(
    name="export",
    cls=ExportGroup,
    help="Export a finished thread's document (interleave export THREAD --format html|md|json), "
    "or training data from many threads (interleave export training KIND ...). A thread named "
    "'training' is exported with `interleave export thread training`.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app.command(_DOCUMENT_COMMAND)(export_document_command)

KindArgument = Annotated[
    str,
    typer.Argument(
        help="planner-sft, critic-sft (LLaMA-Factory sharegpt), critic-rl (EasyR1 JSONL) or grpo "
        "(a Hugging Face datasets folder for TRL)."
    ),
]
ThreadsArgument = Annotated[list[str] | None, typer.Argument(help="Thread ids (or --all, --manifest).")]


@reports_errors
def export_training(
    kind: KindArgument,
    threads: ThreadsArgument = None,
    out_dir: Annotated[Path, typer.Option("--out", help="The folder to write (created).")] = Path(
        "training-data"
    ),
    all_threads: Annotated[bool, typer.Option("--all", help="Every finished thread.")] = False,
    manifests: Annotated[
        list[Path] | None,
        typer.Option("--manifest",
                     help="A batch manifest.jsonl: its finished prompts' threads (repeatable)."),
    ] = None,
    status: Annotated[
        str,
        typer.Option("--status", help="Steps to take samples from: accepted, forced or both."),
    ] = "accepted,forced",
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only threads updated since a date (2026-05-01) or an age (7d)."),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="The prompt pack the samples are written in: interleave, official, official:PATH; "
            "default: the one each thread ran with.",
        ),
    ] = None,
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link images from a file image store instead of copying.")
    ] = False,
    dataset_name: Annotated[
        str | None,
        typer.Option("--dataset-name",
                     help="The dataset_info.json entry (default sft_planner / sft_critic)."),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            help="critic-rl and grpo: the judge of the labels (a served name with --judge-url, "
            "provider:name, or a local model).",
        ),
    ] = None,
    judge_url: JudgeUrlOption = None,
    judge_prompts: Annotated[
        Path | None,
        typer.Option(
            "--judge-prompts",
            help="Your clone of the official repository, whose judge prompts are read (default: the "
            "clone `interleave prompts fetch-official` made).",
        ),
    ] = None,
    judge_concurrency: Annotated[
        int, typer.Option("--judge-concurrency", min=1, help="Judge calls at once.")
    ] = 8,
    judge_attempts: Annotated[
        int, typer.Option("--judge-attempts", min=1, help="Tries per judge question.")
    ] = 3,
    judge_timeout: Annotated[
        float, typer.Option("--judge-timeout", min=1, help="Seconds one judge request may take.")
    ] = 600.0,
    judge_cache: Annotated[
        Path | None,
        typer.Option("--judge-cache", help="Folder of cached judge answers (default OUT/judge-cache)."),
    ] = None,
    success_from: Annotated[
        str,
        typer.Option(
            "--success-from",
            help="The label's success: critic (the trajectory critic's verdict) or judge (both "
            "scores at least --success-threshold).",
        ),
    ] = "critic",
    success_threshold: Annotated[
        float, typer.Option("--success-threshold", min=0, max=10, help="For --success-from judge.")
    ] = 7.0,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    image_store: ImageStoreOption = None,
) -> None:
    """Write training data from finished threads (LLaMA-Factory SFT, EasyR1 RL, a GRPO dataset).

    planner-sft and critic-sft write sharegpt files and their dataset_info.json entries;
    critic-rl writes EasyR1's JSONL records and grpo a Hugging Face datasets folder, both with
    labels from --judge. Prints the files written.
    """
    from interleave_thinker.training.export import KINDS, LabelOptions, aexport_training
    from interleave_thinker.training.progress import Bars
    from interleave_thinker.training.threads import Selection, parse_since, parse_statuses

    kind = kind.lower()
    if kind not in KINDS:
        raise ConfigurationError(f"unknown training data kind {kind!r}",
                                 hint=f"use one of {', '.join(KINDS)}")
    if success_from not in ("critic", "judge"):
        raise ConfigurationError(f"--success-from {success_from!r}", hint="use critic or judge")
    selection = Selection(
        threads=tuple(threads or ()),
        all=all_threads,
        manifests=tuple(manifests or ()),
        since=parse_since(since),
        statuses=parse_statuses(status),
    )
    labels = None
    if kind in ("critic-rl", "grpo"):
        if not judge:
            raise ConfigurationError(
                f"{kind} records carry labels from a judge: --judge is missing",
                hint="pass --judge MODEL (and --judge-url URL for a served one)",
            )
        labels = LabelOptions(
            judge=_step_judge(judge, judge_url, judge_prompts, judge_concurrency, judge_attempts,
                              judge_timeout, judge_cache or out_dir / "judge-cache"),
            success_from=success_from,  # type: ignore[arg-type]
            success_threshold=success_threshold,
        )
    with Bars() as bars:
        report = asyncio.run(aexport_training(
            kind, selection, out_dir, run_dir=run_dir, checkpointer=checkpointer, image_store=image_store,
            prompts=prompts, link=link, labels=labels, dataset_name=dataset_name, bars=bars,
        ))
    err.print(f"{report.samples} {kind} samples from {report.threads} threads, {report.images} images "
              f"written, prompts {', '.join(report.prompts)}")
    if report.judge:
        err.print(f"judge {report.judge}: {report.judge_calls} calls, {report.judge_failures} samples "
                  "without a readable score (left out)")
    for reason, count in report.skipped.items():
        err.print(f"  {count} {reason}")
    for thread, why in report.left_out_threads.items():
        err.print(f"  thread {thread} left out: {why}")
    for path in report.files:
        out.print(str(path))


def _step_judge(name: str, url: str | None, clone: Path | None, concurrency: int, attempts: int,
                timeout: float, cache: Path) -> Any:
    from interleave_thinker.evaluation.judge import Judge, JudgeCache, judge_chat_model
    from interleave_thinker.training.judging import StepJudge, read_step_judge_prompts

    prompts = read_step_judge_prompts(clone)
    model = judge_chat_model(name, url, timeout=timeout)
    runner = Judge(model, attempts=attempts, concurrency=concurrency, timeout=timeout * 4)
    return StepJudge(runner, prompts, cache=JudgeCache(cache, runner.identity))


export_app.command(_TRAINING_COMMAND)(export_training)
