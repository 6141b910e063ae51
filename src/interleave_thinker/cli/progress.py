"""Progress on stderr: one line per graph event, a batch progress bar, and the end-of-run lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interleave_thinker.cli.common import err, on_interrupt, out, resume_command
from interleave_thinker.events import (
    BudgetExhausted,
    DocumentReady,
    ImageReady,
    PlanReady,
    ProgressEvent,
    StepStarted,
    ThreadStarted,
    Verdict,
)
from interleave_thinker.models.profiles import PROFILE_NOTES
from interleave_thinker.runner import RunResult


class Progress:
    """Prints the graph's typed progress events on stderr: the step, attempt, verdict.

    Steps are named by their number in the plan (the number the document shows); once the
    thread is known, Ctrl-C and SIGTERM print the command that resumes it.
    """

    def __init__(self, run_dir: Path | None = None, checkpointer: str | None = None) -> None:
        self.run_dir = run_dir
        self.checkpointer = checkpointer

    def __call__(self, event: ProgressEvent) -> None:
        match event:
            case ThreadStarted(thread_id=thread_id, resumed=resumed):
                err.print(f"{'resuming' if resumed else 'thread'} {thread_id}")
                command = resume_command(thread_id, self.run_dir, self.checkpointer)
                on_interrupt(f"continue with `{command}`")
            case PlanReady(steps=steps):
                err.print(_planned(steps))
                for step in steps:
                    label = "text only" if step.get("prompt") is None else "image"
                    err.print(f"  {step['number']}. {step['name']} ({label})")
            case StepStarted():
                err.print(f"{_where(event)}: drawing")
            case ImageReady(reused=True):
                err.print(f"{_where(event)}: image already drawn before the restart, reused")
            case ImageReady(repeats=int(earlier)):
                err.print(
                    f"{_where(event)}: the same prompt and seed as attempt {earlier}, so its image "
                    "is reused (nothing drawn, no call counted)"
                )
            case Verdict():
                err.print(f"{_where(event)}: {_verdict_words(event)}")
            case BudgetExhausted():
                err.print(_budget_words(event))
            case DocumentReady():
                err.print("document composed")


def _planned(steps: list[dict[str, Any]]) -> str:
    count = f"planned {len(steps)} step{'s' if len(steps) != 1 else ''}"
    first = steps[0]["number"] if steps else 1
    if first > 1:
        # Guidance mode: the user's images are the first steps, and the plan continues.
        inputs = "your input image is step 1"
        if first > 2:
            inputs = f"your input images are steps 1 to {first - 1}"
        return f"{count}, numbered from {first} ({inputs})"
    return count


def _where(event: StepStarted | ImageReady | Verdict) -> str:
    """The step by its plan number; its position is added, labelled, when the two differ."""
    if event.step == event.index:
        return f"step {event.step} of {event.total}, attempt {event.attempt}"
    return (
        f"step {event.step} (position {event.index} of {event.total} in the plan), "
        f"attempt {event.attempt}"
    )


def _verdict_words(event: Verdict) -> str:
    if event.success is None:
        return "final attempt kept without asking the critic (forced)"
    if event.success:
        return "accepted by the critic"
    if event.status == "forced":
        return "rejected; out of attempts, step committed as forced"
    if event.status == "review":
        return "rejected; out of attempts, waiting for a person to choose the attempt to keep"
    if event.next_attempt == "none":
        return (
            "rejected by the critic; no generator call is left for a redraw (--max-calls), so "
            "the step will be committed as forced"
        )
    if event.next_attempt == "repeated":
        return (
            "rejected by the critic without a new prompt; the next attempt repeats the same "
            "request, so the same image is judged again"
        )
    return "rejected by the critic; redrawing with its refined prompt"


def _budget_words(event: BudgetExhausted) -> str:
    if event.calls >= event.max_calls:
        said = f"call budget spent: {event.calls} of {event.max_calls} generator calls (--max-calls)"
    else:
        said = f"the run ends with steps left open after {event.calls} generator calls"
    if event.forced:
        said += f"; forced with a rejected attempt: {_steps(event.forced)}"
    if event.skipped:
        said += f"; skipped, no image: {_steps(event.skipped)}"
    return said


def _steps(numbers: list[int]) -> str:
    return ("step " if len(numbers) == 1 else "steps ") + ", ".join(str(n) for n in numbers)


def finish(result: RunResult) -> None:
    """The profile's note and a summary on stderr; the document's path as stdout's last line."""
    note = PROFILE_NOTES.get(result.document.profile)
    if note:
        err.print(f"note: {note}")
    err.print(f"done: thread {result.thread_id}, {result.document.generator_calls} generator calls")
    # The last line of stdout is the document's path, for scripts.
    out.print(str(result.document_path))


class BatchProgress:
    """A rich progress bar with done / running / failed counts and an ETA, on stderr.

    The bar appears with the batch's first event, so that an error raised before any prompt
    starts (a refused flag, a bad prompt file) is not preceded by an empty bar.
    """

    def __enter__(self) -> BatchProgress:
        self._progress: Any = None
        self._running = self._failed = 0
        return self

    def _start(self) -> None:
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

    def update(self, event: dict[str, Any]) -> None:
        if self._progress is None:
            self._start()
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
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
