"""The project's exceptions: each carries a one-line message and a hint for what to do."""

from __future__ import annotations

from pydantic import ValidationError


class InterleaveError(Exception):
    """Base of every error the CLI reports as one line plus a hint."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException) -> str:
    """``exc``'s message as one line, to quote a cause inside another error message.

    A pydantic ``ValidationError`` gives its first error as ``field: message`` (plus how many
    more there are); any other exception the first line of its text (later lines of library
    errors are tracebacks, URLs or dumps), or its type name when the text is empty. Runs of
    whitespace become one space.
    """
    if isinstance(exc, ValidationError) and exc.error_count():
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"])
        text = errors[0]["msg"].removeprefix("Value error, ")
        if where:
            text = f"{where}: {text}"
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more)"
    else:
        text = (str(exc).strip().splitlines() or [""])[0]
    return " ".join(text.split()) or type(exc).__name__


class ImageError(InterleaveError):
    """An image file is missing, damaged, too large or of an unsupported format."""


class UnknownThreadError(InterleaveError):
    """No thread with this id exists in the checkpointer."""


class SettingsMismatchError(InterleaveError):
    """A thread was resumed with a request or settings other than the ones it started with."""


class ModelOutputError(InterleaveError):
    """The planner or critic kept printing output that could not be parsed."""


class ConfigurationError(InterleaveError):
    """A setting, profile, URL or identifier is invalid."""


class GeneratorError(InterleaveError):
    """The image generator failed permanently (retrying will not help)."""


class TransientGeneratorError(InterleaveError):
    """The image generator failed in a way that a retry may fix (timeouts, overload).

    The graph retries it with backoff; when the retries run out it stops the run like any error.
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(
            message,
            hint=hint or "once the generator answers again, continue with `interleave resume THREAD`",
        )


class TransientModelError(InterleaveError):
    """The planner or critic model could not be reached or was overloaded; a retry may fix it."""


class ModelCallError(InterleaveError):
    """A planner or critic call failed in a way a retry will not fix (refused key, unknown model,
    a request the server rejects)."""


class ModelTimeoutError(InterleaveError):
    """A planner, critic or generator call ran past its time limit (retried like a transient error)."""


class ReviewRequired(InterleaveError):
    """The run paused for a person: to review the plan, or to pick the attempt a forced step keeps.

    ``kind`` is ``review_plan`` or ``review_forced``; ``payload`` is what to show the person.
    """

    def __init__(self, thread_id: str, kind: str, payload: dict) -> None:
        if kind == "review_plan":
            message = f"thread {thread_id} is waiting for its plan to be reviewed"
            hint = (
                f"edit the plan and continue with `interleave resume {thread_id} --plan FILE`, "
                f"or accept it with `interleave resume {thread_id} --accept-plan`"
            )
        else:
            message = f"thread {thread_id} is waiting for a choice of attempt for forced steps"
            hint = (
                f"`interleave show {thread_id}` lists the attempts; continue with "
                f"`interleave resume {thread_id} --keep STEP=ATTEMPT` or --accept-forced"
            )
        super().__init__(message, hint=hint)
        self.thread_id = thread_id
        self.kind = kind
        self.payload = payload

    @property
    def plan(self) -> dict:
        return self.payload["plan"]
