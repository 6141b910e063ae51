"""The commands that run trajectories: run, resume, demo and batch."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from interleave_thinker.cli.common import (
    callbacks,
    err,
    on_interrupt,
    out,
    quiet_libraries,
    reports_errors,
    resume_command,
)
from interleave_thinker.cli.options import (
    MODEL_SETTINGS_FLAGS,
    NO_FLAGS,
    CheckpointerOption,
    RunDirOption,
    RunFlags,
    ThreadOption,
    TraceFileOption,
    run_flags,
)
from interleave_thinker.cli.progress import BatchProgress, Progress, finish
from interleave_thinker.cli.review import review_answer, review_then_resume
from interleave_thinker.errors import ReviewRequired
from interleave_thinker.runner import aresume, arun
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import RunOptions

if TYPE_CHECKING:
    from interleave_thinker.batch import BatchReport

# Small images keep the demo's tiny FLUX.2-klein fast on a CPU.
DEMO_OPTIONS = RunOptions(width=64, height=64)

ImageOption = Annotated[
    list[Path] | None,
    typer.Option("--image", help="Input image (guidance mode); repeat for several."),
]
ReviewPlanOption = Annotated[
    bool,
    typer.Option(
        "--review-plan",
        help="Pause after planning: edit the plan (in $EDITOR, or a file) before drawing.",
    ),
]
ReviewForcedOption = Annotated[
    bool,
    typer.Option(
        "--review-forced",
        help="Pause before a step is committed as forced and choose the attempt to keep.",
    ),
]
AcceptFinalOption = Annotated[
    bool,
    typer.Option(
        "--accept-final-without-critic",
        help="Keep a step's last allowed attempt without asking the critic (the paper).",
    ),
]
PlanOption = Annotated[
    Path | None, typer.Option("--plan", help="Edited plan (JSON) for a thread under review.")
]
AcceptPlanOption = Annotated[
    bool, typer.Option("--accept-plan", help="Keep the plan of a thread under review.")
]
KeepOption = Annotated[
    list[str] | None,
    typer.Option("--keep", help="STEP=ATTEMPT: the attempt a forced step keeps (repeat)."),
]
AcceptForcedOption = Annotated[
    bool,
    typer.Option("--accept-forced", help="Keep the selection policy's attempts."),
]
PromptsArgument = Annotated[
    Path, typer.Argument(help="JSONL file: {\"id\", \"text\", \"images\"} per line.")
]
ConcurrencyOption = Annotated[int, typer.Option("--concurrency", help="Trajectories running at once.")]
ShardOption = Annotated[
    str, typer.Option("--shard", help="I/N: run the I-th of N shards (one per machine).")
]
MaxBatchOption = Annotated[
    int, typer.Option("--max-batch", help="Most generator jobs merged into one call.")
]
MaxInFlightOption = Annotated[
    int,
    typer.Option(
        "--max-in-flight",
        min=0,
        help="Generator calls running at once; jobs gather into the next batch meanwhile "
        "(1: one GPU; 0: no limit, for a server that takes concurrent calls).",
    ),
]


@reports_errors
@run_flags()
def run(
    text: Annotated[str, typer.Argument(help="What to generate: a story, a guide, a task.")],
    image: ImageOption = None,
    thread: ThreadOption = None,
    flags: RunFlags = NO_FLAGS,
    review_plan: ReviewPlanOption = False,
    review_forced: ReviewForcedOption = False,
    accept_final_without_critic: AcceptFinalOption = False,
) -> None:
    """Plan, draw and check a whole interleaved document; prints the HTML path last."""
    quiet_libraries()
    options = flags.run_options().with_changes(
        accept_final_without_critic=accept_final_without_critic or None,
        review_plan=review_plan or None,
        review_forced=review_forced or None,
    )
    try:
        result = asyncio.run(
            arun(
                text,
                images=image or [],
                profile=flags.profile,
                model_settings=flags.model_settings(),
                options=options,
                thread_id=thread,
                run_dir=flags.run_dir,
                checkpointer=flags.checkpointer,
                image_store=flags.image_store,
                on_event=Progress(flags.run_dir, flags.checkpointer),
                callbacks=flags.callbacks(),
            )
        )
    except ReviewRequired as paused:
        result = review_then_resume(
            paused, flags.run_dir, flags.checkpointer, flags.trace_file, image_store=_image_store(flags)
        )
        if result is None:
            return
    finish(result)


@reports_errors
@run_flags()
def resume(
    thread: Annotated[str, typer.Argument(help="The thread id printed by `interleave run`.")],
    flags: RunFlags = NO_FLAGS,
    plan: PlanOption = None,
    accept_plan: AcceptPlanOption = False,
    keep: KeepOption = None,
    accept_forced: AcceptForcedOption = False,
) -> None:
    """Continue a thread from its last checkpoint (settings given must match the thread's)."""
    quiet_libraries()
    on_interrupt(f"continue with `{resume_command(thread, flags.run_dir, flags.checkpointer)}`")
    changes = flags.resume_changes()
    try:
        result = asyncio.run(
            aresume(
                thread,
                profile=flags.profile,
                model_settings=_resume_model_settings(flags),
                changes=changes,
                review=review_answer(plan, accept_plan, keep, accept_forced),
                run_dir=flags.run_dir,
                checkpointer=flags.checkpointer,
                image_store=flags.image_store,
                on_event=Progress(flags.run_dir, flags.checkpointer),
                callbacks=flags.callbacks(),
            )
        )
    except ReviewRequired as paused:
        result = review_then_resume(
            paused, flags.run_dir, flags.checkpointer, flags.trace_file, image_store=_image_store(flags)
        )
        if result is None:
            return
    finish(result)


def _resume_model_settings(flags: RunFlags) -> ModelSettings:
    """The model settings of a resume, marked set only where a model flag was given: those
    replace what the thread recorded (--critic-url moves the critic); INTERLEAVE_* variables and
    the settings file fill only what it did not record (timeouts, memory shares), so that a
    changed environment never swaps a thread's models."""
    settings = flags.model_settings()
    given = {name for name in MODEL_SETTINGS_FLAGS if getattr(flags, name) is not None}
    return ModelSettings.model_construct(_fields_set=given, **settings.model_dump())


def _image_store(flags: RunFlags) -> str | None:
    """--image-store (or $INTERLEAVE_IMAGE_STORE), else the settings file's ``image_store``."""
    return flags.image_store or flags.model_settings().image_store


@reports_errors
def demo(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    thread: ThreadOption = None,
    trace_file: TraceFileOption = None,
) -> None:
    """Run the real pipeline offline on tiny models (CPU, under a minute); the pictures are noise."""
    from interleave_thinker.demo.models import DEMO_REQUEST, demo_dir

    quiet_libraries()
    err.print(f"demo: tiny models with random or scripted weights, built once in {demo_dir()}")
    err.print(f"request: {DEMO_REQUEST}")
    result = asyncio.run(
        arun(
            DEMO_REQUEST,
            profile="demo",
            options=DEMO_OPTIONS,
            thread_id=thread,
            run_dir=run_dir,
            checkpointer=checkpointer,
            on_event=Progress(run_dir, checkpointer),
            # --trace-file, and LangSmith (images stripped) when LANGSMITH_TRACING is on.
            callbacks=callbacks(trace_file),
        )
    )
    finish(result)


@reports_errors
@run_flags(omit=("max_steps", "max_reasks"))
def batch(
    prompts: PromptsArgument,
    concurrency: ConcurrencyOption = 4,
    shard: ShardOption = "0/1",
    max_batch: MaxBatchOption = 8,
    max_in_flight: MaxInFlightOption = 1,
    allow_outside_images: Annotated[
        bool,
        typer.Option(
            "--allow-outside-images",
            help="Let a line's images lie outside the prompt file's folder (by '..', an absolute "
            "path or a symbolic link); only for a prompt file you trust.",
        ),
    ] = False,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="Submit each prompt as a background run to this agent server (langgraph dev or "
            "Aegra, e.g. http://127.0.0.1:2026); its workers draw, this command waits and writes "
            "the pages, manifest and index. --concurrency is then the runs queued at once.",
        ),
    ] = None,
    flags: RunFlags = NO_FLAGS,
) -> None:
    """Run every prompt of a file as its own thread; rerunning resumes and skips finished ones."""
    from interleave_thinker.batch import arun_batch, parse_shard

    quiet_libraries()
    options = flags.run_options()
    on_interrupt(
        f"rerun the batch (`interleave batch {shlex.quote(str(prompts))}` with the same options): "
        "finished prompts are skipped and unfinished ones resume where they stopped"
    )
    if server is not None:
        _remote_batch(prompts, server, concurrency, shard, allow_outside_images, options, flags)
        return
    with BatchProgress() as progress:
        report = asyncio.run(
            arun_batch(
                prompts,
                profile=flags.profile,
                model_settings=flags.model_settings(),
                options=options,
                concurrency=concurrency,
                shard=parse_shard(shard),
                max_batch=max_batch,
                max_in_flight=max_in_flight or None,
                run_dir=flags.run_dir,
                checkpointer=flags.checkpointer,
                image_store=flags.image_store,
                on_progress=progress.update,
                callbacks=flags.callbacks(),
                allow_outside_images=allow_outside_images,
            )
        )
    _print_batch_report(report, prompts)
    if report.failed or report.bad_lines:
        raise typer.Exit(1)


def _remote_batch(
    prompts: Path,
    server: str,
    concurrency: int,
    shard: str,
    allow_outside_images: bool,
    options: RunOptions,
    flags: RunFlags,
) -> None:
    """``batch --server``: the server's queue spreads the prompts over its workers."""
    from interleave_thinker.errors import ConfigurationError
    from interleave_thinker.remote_batch import arun_remote_batch

    if shard != "0/1":
        raise ConfigurationError(
            "--shard splits a batch between machines without a server; with --server the "
            "server's queue shares the prompts among all its workers",
            hint="drop --shard",
        )
    if flags.checkpointer is not None:
        raise ConfigurationError(
            "--checkpointer has no effect with --server: the server keeps the checkpoints",
            hint="drop --checkpointer",
        )
    with BatchProgress() as progress:
        report = asyncio.run(
            arun_remote_batch(
                prompts,
                server,
                profile=flags.profile,
                options=options,
                concurrency=concurrency,
                run_dir=flags.run_dir,
                image_store=flags.image_store,
                on_progress=progress.update,
                allow_outside_images=allow_outside_images,
            )
        )
    _print_batch_report(report, prompts)
    if report.failed or report.bad_lines:
        raise typer.Exit(1)


def _print_batch_report(report: BatchReport, prompts: Path) -> None:
    """Each invalid line and failed prompt, then the counts on stderr; the index path on stdout."""
    for bad in report.bad_lines:
        err.print(f"error: {prompts}:{bad.line}: {bad.error}")
    for outcome in report.outcomes:
        if outcome.status == "failed":
            err.print(f"error: prompt {outcome.prompt_id!r} (line {outcome.line}): {outcome.error}")
    done = len(report.outcomes) - report.failed
    err.print(
        f"done: {done} finished, {report.failed} failed, {len(report.bad_lines)} invalid lines; "
        f"{report.backend_calls} generator backend calls; manifest {report.manifest}"
    )
    out.print(str(report.index))
