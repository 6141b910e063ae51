"""The ``interleave`` command: run, resume, list, show and export trajectories."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from interleave_thinker.errors import ConfigurationError, InterleaveError, ReviewRequired
from interleave_thinker.events import (
    DocumentReady,
    ImageReady,
    PlanReady,
    ProgressEvent,
    StepStarted,
    ThreadStarted,
    Verdict,
)
from interleave_thinker.input_files import read_user_file, shown_path
from interleave_thinker.inspect import alist_threads, aload_document, athread_report
from interleave_thinker.models.profiles import PROFILE_NOTES
from interleave_thinker.render import export_document
from interleave_thinker.render.safe_text import terminal_text
from interleave_thinker.runner import RunResult, aresume, arun
from interleave_thinker.settings import QUIET_LIBRARIES_ENV, load_model_settings
from interleave_thinker.state import RunOptions, SelectionPolicy
from interleave_thinker.workspace import RUN_DIR_ENV, Workspace

# An edited plan is a few KB; the planner's own replies are read up to this size too.
MAX_PLAN_BYTES = 1_000_000
# Small images keep the demo's tiny FLUX.2-klein fast on a CPU.
DEMO_OPTIONS = RunOptions(width=64, height=64)

app = typer.Typer(
    name="interleave",
    help="Interleaved text-image generation: a planner writes the steps, a generator draws "
    "each one, a critic checks every image and asks for a redraw when it is wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _SafeConsole(Console):
    """A console whose printed strings lose control characters: model text (a step name, a
    critique) cannot drive the terminal with escape sequences."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(terminal_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Progress and errors go to stderr so that stdout stays machine-readable.
err = _SafeConsole(stderr=True, markup=False, highlight=False, soft_wrap=True)
out = _SafeConsole(markup=False, highlight=False, soft_wrap=True)

RunDirOption = Annotated[
    Path | None,
    typer.Option("--run-dir", envvar=RUN_DIR_ENV, help="Run directory (default ./interleave-runs)."),
]
CheckpointerOption = Annotated[
    str | None,
    typer.Option(
        "--checkpointer",
        envvar="INTERLEAVE_CHECKPOINTER",
        help="Checkpointer URL: sqlite:///PATH (default: in the run directory), "
        "postgresql://USER:PASSWORD@HOST/DB or memory://.",
    ),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="default (the real models, see --planner/--critic/--generator), demo (tiny "
        "offline models) or test (stand-ins that need no weights).",
    ),
]
PlannerOption = Annotated[
    str | None, typer.Option("--planner", help="Planner model: folder or hub id.")
]
CriticOption = Annotated[str | None, typer.Option("--critic", help="Critic model: folder or hub id.")]
GeneratorOption = Annotated[
    str | None, typer.Option("--generator", help="Diffusers model: folder or hub id.")
]
PlannerUrlOption = Annotated[
    str | None,
    typer.Option("--planner-url", help="OpenAI-compatible server for the planner (e.g. vLLM .../v1)."),
]
CriticUrlOption = Annotated[
    str | None, typer.Option("--critic-url", help="OpenAI-compatible server for the critic.")
]
GeneratorUrlOption = Annotated[
    str | None,
    typer.Option("--generator-url", help="OpenAI-compatible Images API (e.g. vllm-omni .../v1)."),
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
GeneratorTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--generator-timeout",
        help="Seconds one batched generator call may take before it counts as hung and is "
        "retried (default 900; not part of the thread's settings).",
    ),
]
ModelTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--model-timeout",
        help="Seconds one planner or critic reply may take before it counts as hung and is "
        "retried (default 600; not part of the thread's settings).",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (also $INTERLEAVE_CONFIG)."),
]
MaxAttemptsOption = Annotated[
    int | None, typer.Option("--max-attempts", help="Generator calls per step (default 3).")
]
MaxCallsOption = Annotated[
    int | None,
    typer.Option("--max-calls", help="Generator calls per trajectory (default 100)."),
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Run seed (default 0).")]
SelectionOption = Annotated[
    str | None,
    typer.Option(
        "--selection",
        help="Attempt a step keeps when the critic never accepts one: last (paper) or best.",
    ),
]
MaxStepsOption = Annotated[
    int | None, typer.Option("--max-steps", help="Most steps a plan may have (default 12).")
]
MaxReasksOption = Annotated[
    int | None,
    typer.Option("--max-reasks", help="Re-asks for unreadable planner/critic output (default 3)."),
]
OutputModeOption = Annotated[
    str | None,
    typer.Option(
        "--output-mode",
        help="tagged (<think>/<answer>, the released checkpoints) or structured (JSON schema).",
    ),
]
TraceFileOption = Annotated[
    Path | None,
    typer.Option("--trace-file", help="Write the run tree as JSON lines (no LangSmith needed)."),
]
SizeOption = Annotated[
    str | None, typer.Option("--size", help="Image size as WIDTHxHEIGHT (default 1024x1024).")
]

F = TypeVar("F", bound=Callable[..., Any])


def _reports_errors(command: F) -> F:
    """Turn our errors into one line plus a hint on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except InterleaveError as exc:
            # Library messages can span lines; ours stay one line each.
            err.print("error: " + " ".join(exc.message.split()))
            if exc.hint:
                err.print("hint: " + " ".join(exc.hint.split()))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            err.print(f"error: invalid setting {where}: {first['msg']}")
        except KeyboardInterrupt:
            err.print("error: interrupted; finished steps are saved")
            err.print("hint: continue with `interleave resume THREAD` (the id printed at start)")
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def _option_changes(
    *,
    max_attempts: int | None,
    max_calls: int | None,
    seed: int | None,
    selection: str | None,
    size: str | None,
    max_steps: int | None = None,
    max_reasks: int | None = None,
    accept_final: bool | None = None,
    output_mode: str | None = None,
) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "output_mode": output_mode,
        "max_steps": max_steps,
        "max_reasks": max_reasks,
        "max_attempts": max_attempts,
        "max_calls": max_calls,
        "seed": seed,
        "selection": _selection(selection),
        "accept_final_without_critic": accept_final,
    }
    if size is not None:
        changes["width"], changes["height"] = _parse_size(size)
    return {name: value for name, value in changes.items() if value is not None}


def _selection(value: str | None) -> SelectionPolicy | None:
    if value is None:
        return None
    if value not in ("last", "best"):
        raise ConfigurationError(
            f"--selection must be 'last' or 'best', not {value!r}",
            hint="'last' keeps the final attempt (the paper); 'best' the highest critic score",
        )
    return value  # type: ignore[return-value]


def _parse_size(size: str) -> tuple[int, int]:
    # ASCII digits only, and few of them: str.isdigit() accepts '²', which int() refuses, and
    # int() refuses strings of thousands of digits; RunOptions then checks the range.
    match = _SIZE.fullmatch(size)
    numbers = [part.lstrip("0") or "0" for part in match.groups()] if match else []
    if not numbers or any(len(number) > 6 for number in numbers):
        shown = repr(size) if len(repr(size)) <= 50 else repr(size)[:47] + "..."
        raise ConfigurationError(
            f"--size {shown} is not WIDTHxHEIGHT", hint="for example --size 1024x1024"
        )
    return int(numbers[0]), int(numbers[1])


_SIZE = re.compile(r"([0-9]+)[xX]([0-9]+)")


class _Progress:
    """Prints the graph's typed progress events on stderr: step k of n, attempt, verdict."""

    def __call__(self, event: ProgressEvent) -> None:
        match event:
            case ThreadStarted(thread_id=thread_id, resumed=resumed):
                err.print(f"{'resuming' if resumed else 'thread'} {thread_id}")
            case PlanReady(steps=steps):
                err.print(f"planned {len(steps)} steps")
                for step in steps:
                    label = "text only" if step.get("prompt") is None else "image"
                    err.print(f"  {step['number']}. {step['name']} ({label})")
            case StepStarted():
                err.print(f"{_where(event)}: drawing")
            case ImageReady(reused=True):
                err.print(f"{_where(event)}: image already drawn before the restart, reused")
            case Verdict():
                err.print(f"{_where(event)}: {_verdict_words(event)}")
            case DocumentReady():
                err.print("document composed")


def _where(event: StepStarted | ImageReady | Verdict) -> str:
    return f"step {event.index} of {event.total}, attempt {event.attempt}"


def _verdict_words(event: Verdict) -> str:
    if event.success is None:
        return "final attempt kept without asking the critic (forced)"
    if event.success:
        return "accepted by the critic"
    if event.status == "forced":
        return "rejected; out of attempts, step committed as forced"
    if event.status == "review":
        return "rejected; out of attempts, waiting for a person to choose the attempt to keep"
    return "rejected by the critic; redrawing with its refined prompt"


def _quiet_libraries() -> None:
    """Turn off the loading bars of transformers and diffusers: our progress lines are enough.

    Nothing is imported here (diffusers pulls in torch, seconds for a test-profile run): the
    backends read QUIET_LIBRARIES_ENV when they import their library.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(QUIET_LIBRARIES_ENV, "1")
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        if module in sys.modules:
            sys.modules[module].disable_progress_bar()


def _callbacks(trace_file: Path | None) -> list[Any]:
    """The tracers asked for: a JSON-lines file, and LangSmith when LANGSMITH_TRACING is on."""
    from interleave_thinker.tracing import JsonLinesTracer, langsmith_tracer, tracing_enabled

    handlers: list[Any] = []
    if trace_file is not None:
        handlers.append(JsonLinesTracer(trace_file))
    if tracing_enabled():
        # Ours strips image payloads; LangChain then adds no second LangSmith tracer.
        handlers.append(langsmith_tracer())
    return handlers


def _finish(result: RunResult) -> None:
    note = PROFILE_NOTES.get(result.document.profile)
    if note:
        err.print(f"note: {note}")
    err.print(f"done: thread {result.thread_id}, {result.document.generator_calls} generator calls")
    # The last line of stdout is the document's path, for scripts.
    out.print(str(result.document_path))


@app.command()
@_reports_errors
def run(
    text: Annotated[str, typer.Argument(help="What to generate: a story, a guide, a task.")],
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="Input image (guidance mode); repeat for several."),
    ] = None,
    thread: Annotated[str | None, typer.Option("--thread", help="Thread id to use.")] = None,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    profile: ProfileOption = None,
    planner: PlannerOption = None,
    critic: CriticOption = None,
    generator: GeneratorOption = None,
    planner_url: PlannerUrlOption = None,
    critic_url: CriticUrlOption = None,
    generator_url: GeneratorUrlOption = None,
    device: DeviceOption = None,
    config: ConfigOption = None,
    generator_timeout: GeneratorTimeoutOption = None,
    model_timeout: ModelTimeoutOption = None,
    max_attempts: MaxAttemptsOption = None,
    max_calls: MaxCallsOption = None,
    seed: SeedOption = None,
    selection: SelectionOption = None,
    size: SizeOption = None,
    max_steps: MaxStepsOption = None,
    max_reasks: MaxReasksOption = None,
    output_mode: OutputModeOption = None,
    trace_file: TraceFileOption = None,
    review_plan: Annotated[
        bool,
        typer.Option(
            "--review-plan",
            help="Pause after planning: edit the plan (in $EDITOR, or a file) before drawing.",
        ),
    ] = False,
    review_forced: Annotated[
        bool,
        typer.Option(
            "--review-forced",
            help="Pause before a step is committed as forced and choose the attempt to keep.",
        ),
    ] = False,
    accept_final_without_critic: Annotated[
        bool,
        typer.Option(
            "--accept-final-without-critic",
            help="Keep a step's last allowed attempt without asking the critic (the paper).",
        ),
    ] = False,
) -> None:
    """Plan, draw and check a whole interleaved document; prints the HTML path last."""
    _quiet_libraries()
    options = RunOptions().with_changes(
        **_option_changes(
            max_attempts=max_attempts,
            max_calls=max_calls,
            seed=seed,
            selection=selection,
            size=size,
            max_steps=max_steps,
            max_reasks=max_reasks,
            accept_final=accept_final_without_critic or None,
            output_mode=output_mode,
        )
    ).with_changes(review_plan=review_plan or None, review_forced=review_forced or None)
    try:
        result = asyncio.run(
            arun(
                text,
                images=image or [],
                profile=profile,
                model_settings=load_model_settings(
                    config,
                    planner=planner,
                    critic=critic,
                    generator=generator,
                    planner_url=planner_url,
                    critic_url=critic_url,
                    generator_url=generator_url,
                    device=device,
                    generator_timeout=generator_timeout,
                    model_timeout=model_timeout,
                ),
                options=options,
                thread_id=thread,
                run_dir=run_dir,
                checkpointer=checkpointer,
                on_event=_Progress(),
                callbacks=_callbacks(trace_file),
            )
        )
    except ReviewRequired as paused:
        result = _review_then_resume(paused, run_dir, checkpointer, trace_file)
        if result is None:
            return
    _finish(result)


def _review_then_resume(
    paused: ReviewRequired, run_dir: Path | None, checkpointer: str | None,
    trace_file: Path | None,
) -> RunResult | None:
    """Write the plan to a file; with an editor and a terminal, edit it and continue at once.

    A forced-step review is listed on stderr with the command that answers it.
    """
    if paused.kind == "review_forced":
        for step in paused.payload["steps"]:
            err.print(f"step {step['step']} ({step['name']}) was never accepted by the critic:")
            for attempt in step["attempts"]:
                err.print(f"  attempt {attempt['attempt']}: image {attempt['image'][:12]}, "
                          f"prompt: {attempt['prompt']}")
            err.print(f"  the selection policy would keep attempt {step['policy_keeps']}")
        err.print(f"continue with: interleave resume {paused.thread_id} --keep STEP=ATTEMPT "
                  "(or --accept-forced)")
        out.print(paused.thread_id)
        return None
    workspace = Workspace.open(run_dir, checkpointer)
    plan_file = workspace.document_path(paused.thread_id).with_name("plan.json")
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(paused.plan, indent=2, ensure_ascii=False) + "\n")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not (editor and sys.stdin.isatty()):
        err.print(f"plan written to {plan_file}; edit it, then continue with")
        err.print(f"  interleave resume {paused.thread_id} --plan {plan_file}")
        err.print(f"or keep it as it is: interleave resume {paused.thread_id} --accept-plan")
        out.print(str(plan_file))
        return None
    subprocess.run([*shlex.split(editor), str(plan_file)], check=True)
    return asyncio.run(
        aresume(
            paused.thread_id,
            review=_read_plan(plan_file),
            run_dir=workspace.run_dir,
            checkpointer=workspace.checkpointer_url,
            on_event=_Progress(),
            callbacks=_callbacks(trace_file),
        )
    )


def _review_answer(
    plan: Path | None, accept_plan: bool, keep: list[str] | None, accept_forced: bool
) -> dict[str, Any] | bool | None:
    """What `resume` answers a paused review with, from its flags."""
    if plan is not None:
        return _read_plan(plan)
    if keep:
        choices: dict[str, Any] = {}
        for item in keep:
            step, sep, attempt = item.partition("=")
            if not sep:
                raise ConfigurationError(f"--keep {item!r} is not STEP=ATTEMPT", hint="e.g. 2=1")
            choices[step.strip()] = attempt.strip()
        return choices
    return True if accept_plan or accept_forced else None


def _read_plan(path: Path) -> dict[str, Any]:
    hint = "fix the JSON and resume again"
    # Bounded and non-blocking: a FIFO or /dev/zero given as --plan must not hang the command.
    data = read_user_file(path, what="the edited plan", max_bytes=MAX_PLAN_BYTES, hint=hint)
    try:
        plan = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
            f"at offset {exc.start})",
            hint="save the plan as UTF-8 and resume again",
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(
            f"cannot read the edited plan {shown_path(path)}: {exc}", hint=hint
        ) from exc
    except RecursionError as exc:
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is nested too deeply", hint=hint
        ) from exc
    if not isinstance(plan, dict):
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is not a JSON object",
            hint='keep the form {"execution_plan": [...]} you were given and resume again',
        )
    return plan


@app.command()
@_reports_errors
def resume(
    thread: Annotated[str, typer.Argument(help="The thread id printed by `interleave run`.")],
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    profile: ProfileOption = None,
    planner: PlannerOption = None,
    critic: CriticOption = None,
    generator: GeneratorOption = None,
    planner_url: PlannerUrlOption = None,
    critic_url: CriticUrlOption = None,
    generator_url: GeneratorUrlOption = None,
    device: DeviceOption = None,
    config: ConfigOption = None,
    generator_timeout: GeneratorTimeoutOption = None,
    model_timeout: ModelTimeoutOption = None,
    max_attempts: MaxAttemptsOption = None,
    max_calls: MaxCallsOption = None,
    seed: SeedOption = None,
    selection: SelectionOption = None,
    size: SizeOption = None,
    max_steps: MaxStepsOption = None,
    max_reasks: MaxReasksOption = None,
    output_mode: OutputModeOption = None,
    trace_file: TraceFileOption = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="Edited plan (JSON) for a thread under review.")
    ] = None,
    accept_plan: Annotated[
        bool, typer.Option("--accept-plan", help="Keep the plan of a thread under review.")
    ] = False,
    keep: Annotated[
        list[str] | None,
        typer.Option("--keep", help="STEP=ATTEMPT: the attempt a forced step keeps (repeat)."),
    ] = None,
    accept_forced: Annotated[
        bool,
        typer.Option("--accept-forced", help="Keep the selection policy's attempts."),
    ] = False,
) -> None:
    """Continue a thread from its last checkpoint (settings given must match the thread's)."""
    _quiet_libraries()
    changes = _option_changes(
        max_attempts=max_attempts,
        max_calls=max_calls,
        seed=seed,
        selection=selection,
        size=size,
        max_steps=max_steps,
        max_reasks=max_reasks,
        output_mode=output_mode,
    )
    try:
        result = asyncio.run(
            aresume(
                thread,
                profile=profile,
                model_settings=load_model_settings(
                    config,
                    planner=planner,
                    critic=critic,
                    generator=generator,
                    planner_url=planner_url,
                    critic_url=critic_url,
                    generator_url=generator_url,
                    device=device,
                    generator_timeout=generator_timeout,
                    model_timeout=model_timeout,
                ),
                changes=changes,
                review=_review_answer(plan, accept_plan, keep, accept_forced),
                run_dir=run_dir,
                checkpointer=checkpointer,
                on_event=_Progress(),
                callbacks=_callbacks(trace_file),
            )
        )
    except ReviewRequired as paused:
        result = _review_then_resume(paused, run_dir, checkpointer, trace_file)
        if result is None:
            return
    _finish(result)


@app.command()
@_reports_errors
def demo(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    thread: Annotated[str | None, typer.Option("--thread", help="Thread id to use.")] = None,
) -> None:
    """Run the real pipeline offline on tiny models (CPU, under a minute); the pictures are noise."""
    from interleave_thinker.demo.models import DEMO_REQUEST, demo_dir

    _quiet_libraries()
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
            on_event=_Progress(),
        )
    )
    _finish(result)


@app.command()
@_reports_errors
def batch(
    prompts: Annotated[Path, typer.Argument(help="JSONL file: {\"id\", \"text\", \"images\"} per line.")],
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Trajectories running at once.")
    ] = 4,
    shard: Annotated[
        str, typer.Option("--shard", help="I/N: run the I-th of N shards (one per machine).")
    ] = "0/1",
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most generator jobs merged into one call.")
    ] = 8,
    max_in_flight: Annotated[
        int,
        typer.Option(
            "--max-in-flight",
            min=0,
            help="Generator calls running at once; jobs gather into the next batch meanwhile "
            "(1: one GPU; 0: no limit, for a server that takes concurrent calls).",
        ),
    ] = 1,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    profile: ProfileOption = None,
    planner: PlannerOption = None,
    critic: CriticOption = None,
    generator: GeneratorOption = None,
    planner_url: PlannerUrlOption = None,
    critic_url: CriticUrlOption = None,
    generator_url: GeneratorUrlOption = None,
    device: DeviceOption = None,
    config: ConfigOption = None,
    generator_timeout: GeneratorTimeoutOption = None,
    model_timeout: ModelTimeoutOption = None,
    max_attempts: MaxAttemptsOption = None,
    max_calls: MaxCallsOption = None,
    seed: SeedOption = None,
    selection: SelectionOption = None,
    size: SizeOption = None,
    output_mode: OutputModeOption = None,
    trace_file: TraceFileOption = None,
) -> None:
    """Run every prompt of a file as its own thread; rerunning resumes and skips finished ones."""
    from interleave_thinker.batch import arun_batch, parse_shard

    _quiet_libraries()
    options = RunOptions().with_changes(
        **_option_changes(
            max_attempts=max_attempts, max_calls=max_calls, seed=seed, selection=selection,
            size=size, output_mode=output_mode,
        )
    )
    with _BatchProgress() as progress:
        report = asyncio.run(
            arun_batch(
                prompts,
                profile=profile,
                model_settings=load_model_settings(
                    config,
                    planner=planner,
                    critic=critic,
                    generator=generator,
                    planner_url=planner_url,
                    critic_url=critic_url,
                    generator_url=generator_url,
                    device=device,
                    generator_timeout=generator_timeout,
                    model_timeout=model_timeout,
                ),
                options=options,
                concurrency=concurrency,
                shard=parse_shard(shard),
                max_batch=max_batch,
                max_in_flight=max_in_flight or None,
                run_dir=run_dir,
                checkpointer=checkpointer,
                on_progress=progress.update,
                callbacks=_callbacks(trace_file),
            )
        )
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
    if report.failed or report.bad_lines:
        raise typer.Exit(1)


class _BatchProgress:
    """A rich progress bar with done / running / failed counts and an ETA, on stderr."""

    def __enter__(self) -> _BatchProgress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[running]} running, {task.fields[failed]} failed"),
            TimeRemainingColumn(),
            console=err,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("batch", total=None, running=0, failed=0)
        self._running = self._failed = 0
        return self

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "batch":
            self._progress.update(self._task, total=event["total"])
            return
        if kind == "started":
            self._running += 1
        elif kind == "finished":
            self._running -= 1
            self._failed += event["status"] == "failed"
            self._progress.advance(self._task)
        self._progress.update(self._task, running=self._running, failed=self._failed)

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)


@app.command("list")
@_reports_errors
def list_threads(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the threads of the checkpointer, newest first."""
    threads = asyncio.run(alist_threads(run_dir=run_dir, checkpointer=checkpointer))
    if as_json:
        for summary in threads:
            out.print(json.dumps(summary.__dict__))
        return
    if not threads:
        err.print("no threads yet")
        return
    table = Table("thread", "status", "steps", "calls", "updated", "request")
    for summary in threads:
        request = summary.request if len(summary.request) <= 60 else summary.request[:59] + "…"
        table.add_row(
            summary.thread_id,
            summary.status,
            str(summary.steps),
            str(summary.generator_calls),
            summary.updated_at[:19],
            request,
        )
    out.print(table)


@app.command()
@_reports_errors
def show(
    thread: Annotated[str, typer.Argument(help="Thread id.")],
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Show a thread: plan, every attempt with prompt, seed, image hash and critique, timings."""
    report = asyncio.run(athread_report(thread, run_dir=run_dir, checkpointer=checkpointer))
    if as_json:
        out.print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    out.print(f"thread {report['thread_id']}: {report['status']}, "
              f"{report['generator_calls']} generator calls")
    out.print(f"request: {report['request']['text']}")
    for error in report["errors"]:
        out.print(f"error: {error}")
    for step in report["steps"]:
        out.print(f"\nstep {step['number']}: {step['name']} [{step['status']}]")
        out.print(f"  {step['text']}")
        for attempt in step["attempts"]:
            critique = attempt["critique"]
            verdict = (
                "not judged" if critique is None
                else "accepted" if critique["success"] else "rejected"
            )
            out.print(
                f"  attempt {attempt['number']}: seed {attempt['seed']}, image "
                f"{attempt['image']['sha256'][:12]}, {verdict}, "
                f"{attempt['generation_seconds']:.2f}s drawing, "
                f"{attempt['critique_seconds']:.2f}s judging"
            )
            out.print(f"    prompt: {attempt['prompt']}")
            if critique and critique.get("refine_prompt") and not critique["success"]:
                out.print(f"    refined: {critique['refine_prompt']}")
    if report["document_path"]:
        out.print(f"\ndocument: {report['document_path']}")


@app.command()
@_reports_errors
def export(
    thread: Annotated[str, typer.Argument(help="Thread id.")],
    fmt: Annotated[
        str, typer.Option("--format", help="html, md or json.", case_sensitive=False)
    ] = "html",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (default: run directory).")
    ] = None,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
) -> None:
    """Write a finished thread's document as HTML, Markdown or JSON; prints its path."""
    fmt = fmt.lower()
    if fmt not in ("html", "md", "json"):
        raise ConfigurationError(f"unknown format {fmt!r}", hint="use html, md or json")
    workspace = Workspace.open(run_dir, checkpointer)
    document = asyncio.run(
        aload_document(thread, run_dir=workspace.run_dir, checkpointer=workspace.checkpointer_url)
    )
    target = output or workspace.document_path(thread).with_suffix(f".{fmt}")
    chosen: Literal["html", "md", "json"] = fmt  # type: ignore[assignment]
    path = export_document(
        document, workspace.image_store, thread_id=thread, fmt=chosen, out=target,
        protected=workspace.protected_paths(),
    )
    out.print(str(path))


@app.command("gc")
@_reports_errors
def collect_garbage(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    delete: Annotated[
        bool, typer.Option("--delete", help="Remove what is found (without it: a dry run).")
    ] = False,
    min_age: Annotated[
        str,
        typer.Option(
            "--min-age",
            help="Keep unused files younger than this (30m, 1h, 2d): a running process may be "
            "about to reference them.",
        ),
    ] = "1h",
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Remove even when the checkpointer uses none of the images (every thread "
            "deleted); without it gc refuses, as a wrong --checkpointer looks the same.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List every file.")] = False,
) -> None:
    """Remove images and ledger records that no thread references (a dry run unless --delete)."""
    from interleave_thinker.gc import acollect_garbage, parse_duration

    report = asyncio.run(
        acollect_garbage(
            run_dir=run_dir,
            checkpointer=checkpointer,
            delete=delete,
            min_age_s=parse_duration(min_age),
            allow_empty=allow_empty,
        )
    )
    if as_json:
        out.print(json.dumps(report.as_json(), indent=2))
        return
    for line in report.summary(verbose=verbose):
        out.print(line)


if __name__ == "__main__":
    app()
