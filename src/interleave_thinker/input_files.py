"""Read files a user names (images, prompt files, plans): regular files only, bounded, never blocking."""

from __future__ import annotations

import os
import stat

from interleave_thinker.errors import ConfigurationError, InterleaveError

_CHUNK = 1024 * 1024


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as text that can always be printed: undecodable bytes appear as \\xNN."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def read_user_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    max_bytes: int,
    error: type[InterleaveError] = ConfigurationError,
    hint: str = "",
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, or ``error`` saying what is wrong.

    The file is opened without blocking and checked after opening, so a FIFO, a device such as
    /dev/zero or a directory (or a symlink to one) is refused without being read, and a file
    that grows while it is read is cut off one byte past the limit.
    """
    shown = shown_path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise error(f"{what} {shown} does not exist", hint=hint) from exc
    except PermissionError as exc:
        raise error(f"{what} {shown} cannot be read: permission denied", hint=hint) from exc
    except OSError as exc:
        raise error(f"{what} {shown} cannot be opened: {exc.strerror}", hint=hint) from exc
    except ValueError as exc:
        # os.open refuses a path with a NUL byte before asking the system.
        raise error(f"{what} {shown!r} is not a valid path: {exc}", hint=hint) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{what} {shown} is a directory, not a file", hint=hint)
        if not stat.S_ISREG(info.st_mode):
            raise error(
                f"{what} {shown} is not a regular file (a device, pipe or socket)", hint=hint
            )
        if info.st_size > max_bytes:
            raise error(
                f"{what} {shown} is {info.st_size:,} bytes, over the {max_bytes:,} byte limit",
                hint=hint,
            )
        # Nonblocking reads of a regular file behave as blocking ones; clear the flag anyway.
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise error(f"{what} {shown} is over the {max_bytes:,} byte limit", hint=hint)
        return b"".join(chunks)
    except InterleaveError:
        raise
    except OSError as exc:
        raise error(f"{what} {shown} cannot be read: {exc.strerror}", hint=hint) from exc
    finally:
        os.close(fd)
