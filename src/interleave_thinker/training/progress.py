"""Progress bars on stderr for exports and for the critic reward's redraws and judge calls.

The training code reports progress through :class:`Bars`, which draws rich bars on stderr (stdout
stays machine-readable) or, with ``enabled=False``, does nothing. A bar's total may grow while
it runs: a reward batch adds its redraws as it finds them.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console


class Bar:
    """One line of a :class:`Bars`: a description, a count and an optional total."""

    def __init__(self, bars: Bars, task: Any) -> None:
        self._bars = bars
        self._task = task

    def advance(self, amount: int = 1) -> None:
        self._bars._call("advance", self._task, amount)

    def total(self, total: int | None) -> None:
        self._bars._call("update", self._task, total=total)

    def grow(self, amount: int = 1) -> None:
        """Raise the total by ``amount`` (work found while running)."""
        self._bars._grow(self._task, amount)

    def note(self, text: str) -> None:
        """Replace the bar's trailing note (``2 failed``)."""
        self._bars._call("update", self._task, note=text)


class Bars:
    """Rich progress bars on stderr, usable from any thread; a no-op when disabled.

    ``with Bars() as bars: bar = bars.add("threads", total=10); bar.advance()``. ``transient``
    bars disappear when done (the reward draws one set per training step).
    """

    def __init__(self, *, enabled: bool = True, transient: bool = False,
                 console: Console | None = None) -> None:
        self.enabled = enabled
        self._transient = transient
        self._console = console
        self._progress: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Bars:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=self._console or Console(stderr=True),
            transient=self._transient,
        )
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None

    def add(self, description: str, total: int | None = None) -> Bar:
        task = None
        if self._progress is not None:
            task = self._progress.add_task(description, total=total, note="")
        return Bar(self, task)

    def _call(self, method: str, task: Any, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None and task is not None:
            with self._lock:
                getattr(self._progress, method)(task, *args, **kwargs)

    def _grow(self, task: Any, amount: int) -> None:
        if self._progress is None or task is None:
            return
        with self._lock:
            current = self._progress.tasks[self._progress.task_ids.index(task)].total or 0
            self._progress.update(task, total=current + amount)
