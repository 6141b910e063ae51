"""What every command shares: the stdout/stderr consoles, error reporting, quiet libraries, tracers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from interleave_thinker.checkpoints.faults import storage_error
from interleave_thinker.errors import InterleaveError
from interleave_thinker.prompts.packs import PromptPackWarning
from interleave_thinker.render.safe_text import terminal_text
from interleave_thinker.settings import QUIET_LIBRARIES_ENV, redact_url


class _SafeConsole(Console):
    """A console whose printed strings lose control characters: model text (a step name, a
    critique) cannot drive the terminal with escape sequences."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(terminal_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Progress and errors go to stderr so that stdout stays machine-readable.
err = _SafeConsole(stderr=True, markup=False, highlight=False, soft_wrap=True)
out = _SafeConsole(markup=False, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


class _Interruption:
    """What an interrupted command tells the user to do, and which signal stopped it."""

    hint: str | None = None
    signal: int = signal.SIGINT


def on_interrupt(hint: str | None) -> None:
    """Set the hint Ctrl-C or SIGTERM prints from now on (e.g. the thread's resume command)."""
    _Interruption.hint = hint


def resume_command(thread_id: str, run_dir: Path | None = None, checkpointer: str | None = None) -> str:
    """The command that continues ``thread_id``, with the run directory and checkpointer given."""
    words = ["interleave", "resume", thread_id]
    if run_dir is not None:
        words += ["--run-dir", str(run_dir)]
    command = shlex.join(words)
    if checkpointer is not None:
        shown = redact_url(checkpointer)
        # A URL with a password is not printed: the user has it.
        command += f" --checkpointer {shlex.quote(shown) if shown == checkpointer else 'URL'}"
    return command


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops a command as Ctrl-C does: what asyncio does with SIGINT (cancel the run,
    which then unwinds and lets go of its thread), or a KeyboardInterrupt."""
    _Interruption.signal = signal.SIGTERM
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_sigterm:
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a command called from a worker): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_interruption() -> typer.Exit:
    """The lines an interrupted command prints, and its exit code (128 + the signal)."""
    how = "stopped by SIGTERM" if _Interruption.signal == signal.SIGTERM else "interrupted (Ctrl-C)"
    err.print(f"error: {how}; finished work is saved")
    if _Interruption.hint:
        err.print("hint: " + _Interruption.hint)
    return typer.Exit(128 + int(_Interruption.signal))


def reports_errors(command: F) -> F:
    """Turn our errors into one line plus a hint on stderr and exit code 1; Ctrl-C and SIGTERM
    into the command that continues (see ``on_interrupt``) and exit code 130 or 143."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _Interruption.hint, _Interruption.signal = None, signal.SIGINT
        try:
            with warnings.catch_warnings(), _sigterm_interrupts():
                warnings.showwarning = _show_warning
                return command(*args, **kwargs)
        except (KeyboardInterrupt, asyncio.CancelledError):
            # A cancelled run reaching the command is an interrupted one (asyncio turns the
            # first Ctrl-C into a cancellation).
            raise _report_interruption() from None
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
