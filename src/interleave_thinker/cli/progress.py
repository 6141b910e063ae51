"""Progress on stderr: one line per graph event, a batch progress bar, and the end-of-run lines."""

from __future__ import annotations

from typing import Any

from interleave_thinker.cli.common import err, out
from interleave_thinker.events import (
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


def finish(result: RunResult) -> None:
    """The profile's note and a summary on stderr; the document's path as stdout's last line."""
    note = PROFILE_NOTES.get(result.document.profile)
    if note:
        err.print(f"note: {note}")
    err.print(f"done: thread {result.thread_id}, {result.document.generator_calls} generator calls")
    # The last line of stdout is the document's path, for scripts.
    out.print(str(result.document_path))


class BatchProgress:
    """A rich progress bar with done / running / failed counts and an ETA, on stderr."""

    def __enter__(self) -> BatchProgress:
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
