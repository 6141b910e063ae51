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


class ThreadBusyError(InterleaveError):
    """Another process (or another task of this one) is running the thread: one writer per thread.

    Made by ``held_by``; ``holder`` describes who holds the thread's lease (host, pid, since when).
    """

    thread_id: str | None = None
    holder: str | None = None

    @classmethod
    def held_by(cls, thread_id: str, holder: str) -> ThreadBusyError:
        error = cls(
            f"thread {thread_id} is already being run by {holder}",
            hint=f"wait for that run to end (or stop it), then `interleave resume {thread_id}` "
            "continues the thread; two writers on one thread would draw its images twice",
        )
        error.thread_id, error.holder = thread_id, holder
        return error


class StorageError(InterleaveError):
    """The checkpoint database or the run directory failed (full disk, I/O error, lost
    connection, damaged file). What was saved before the failure is kept: resume once fixed."""


class DamagedCheckpointError(StorageError):
    """A checkpoint's records do not validate: a damaged file or row, or another version's format.

    Made by ``found``; ``thread_id`` is None while the thread is not known yet (inside the
    serializer), and ``of_thread`` names it once the run that read the checkpoint knows it.
    """

    detail: str = ""
    thread_id: str | None = None

    @classmethod
    def found(cls, detail: str, *, thread_id: str | None = None) -> DamagedCheckpointError:
        where = f"the checkpoint of thread {thread_id}" if thread_id else "a checkpoint"
        error = cls(
            f"{where} is damaged: {detail}",
            hint="its records do not validate (a damaged database file or row, or one written by "
            "an incompatible version): restore the database from a backup, or start the request "
            "again as a new thread; images already drawn are kept in the run directory",
        )
        error.detail, error.thread_id = detail, thread_id
        return error

    def of_thread(self, thread_id: str) -> DamagedCheckpointError:
        """The same error, naming the thread."""
        if self.thread_id or not self.detail:
            return self
        return DamagedCheckpointError.found(self.detail, thread_id=thread_id)
