"""What every command shares: the stdout/stderr consoles, error reporting, quiet libraries, tracers."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from interleave_thinker.checkpoints.faults import storage_error
from interleave_thinker.errors import InterleaveError
from interleave_thinker.prompts.packs import PromptPackWarning
from interleave_thinker.render.safe_text import terminal_text
from interleave_thinker.settings import QUIET_LIBRARIES_ENV


class _SafeConsole(Console):
    """A console whose printed strings lose control characters: model text (a step name, a
    critique) cannot drive the terminal with escape sequences."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(terminal_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Progress and errors go to stderr so that stdout stays machine-readable.
err = _SafeConsole(stderr=True, markup=False, highlight=False, soft_wrap=True)
out = _SafeConsole(markup=False, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn our errors into one line plus a hint on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
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
        except Exception as exc:
            # A storage fault that no boundary translated (a full disk, a lost database
            # connection) is still one line and a hint; anything else is a bug: a traceback.
            fault = storage_error(exc)
            if fault is None:
                raise
            err.print("error: " + " ".join(fault.message.split()))
            err.print("hint: " + " ".join(fault.hint.split()))
        except KeyboardInterrupt:
            err.print("error: interrupted; finished steps are saved")
            err.print("hint: continue with `interleave resume THREAD` (the id printed at start)")
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


_library_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Our warnings as one ``warning:`` line on stderr; other libraries' as Python prints them."""
    if issubclass(category, PromptPackWarning):
        err.print("warning: " + " ".join(str(message).split()))
    else:
        _library_showwarning(message, category, *args, **kwargs)


def quiet_libraries() -> None:
    """Turn off the loading bars of transformers and diffusers: our progress lines are enough.

    Nothing is imported here (diffusers pulls in torch, seconds for a test-profile run): the
    backends read QUIET_LIBRARIES_ENV when they import their library.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(QUIET_LIBRARIES_ENV, "1")
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        if module in sys.modules:
            sys.modules[module].disable_progress_bar()


def callbacks(trace_file: Path | None) -> list[Any]:
    """The tracers asked for: a JSON-lines file, and LangSmith when LANGSMITH_TRACING is on."""
    from interleave_thinker.tracing import JsonLinesTracer, langsmith_tracer, tracing_enabled

    handlers: list[Any] = []
    if trace_file is not None:
        handlers.append(JsonLinesTracer(trace_file))
    if tracing_enabled():
        # Ours strips image payloads; LangChain then adds no second LangSmith tracer.
        handlers.append(langsmith_tracer())
    return handlers
