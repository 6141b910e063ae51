"""Every image hash named by any checkpoint version of any thread in a checkpointer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel

from interleave_thinker.checkpoints.savers import list_thread_ids, open_checkpointer, sqlite_path
from interleave_thinker.errors import InterleaveError, StorageError, one_line
from interleave_thinker.gc.report import GarbageCollectionRefused, GcReport
from interleave_thinker.state import SHA256_PATTERN, ImageRef

__all__ = ["collect_hashes", "read_checkpoints"]

# How message content blocks name a stored image (models/messages.py).
_REF_PREFIX = "sha256:"


async def read_checkpoints(url: str, shown: str, report: GcReport) -> tuple[set[str], set[str]]:
    """Every thread id and every image hash named anywhere in the checkpointer at ``url``."""
    if urlsplit(url).scheme == "sqlite" and not sqlite_path(url).is_file():
        # Opening it would create an empty database, which references nothing.
        raise GarbageCollectionRefused(
            f"no checkpoint database at {sqlite_path(url)}; nothing was removed",
            hint="gc needs the checkpointer the runs used: pass the --run-dir that holds "
            "checkpoints.sqlite, or --checkpointer with its URL",
        )
    threads: set[str] = set()
    referenced: set[str] = set()
    try:
        async with open_checkpointer(url) as saver:
            # Every namespace: a subgraph's checkpoints name images too.
            threads.update(await list_thread_ids(saver, subgraphs=True))
            for thread in sorted(threads):
                async for item in saver.alist({"configurable": {"thread_id": thread}}):
                    report.checkpoints += 1
                    collect_hashes(
                        (item.checkpoint, item.metadata, item.pending_writes), referenced
                    )
    except Exception as exc:
        if isinstance(exc, InterleaveError) and not isinstance(exc, StorageError):
            raise
        # A damaged or unreadable database (StorageError) is refused like any unreadable one.
        problem = exc.message if isinstance(exc, StorageError) else one_line(exc)
        raise GarbageCollectionRefused(
            f"cannot read the checkpoints in {shown}: {problem}; nothing was removed",
            hint="check --checkpointer (and --run-dir): gc must read every thread before it "
            "can tell which images are unused",
        ) from exc
    report.threads = len(threads)
    return threads, referenced


def collect_hashes(root: object, found: set[str]) -> None:
    """Add to ``found`` every image hash in ``root``, walking the deserialized values by type.

    ImageRefs are the typed case; a bare hash string or a ``sha256:`` content-block id also
    counts (the LangGraph server's input lists images by hash), and so does any mapping with
    a ``sha256`` key (a record the serializer returned as a plain dict). Erring towards "in
    use" only keeps an image that could have gone.
    """
    # Ids are only unique among live objects: ``seen`` lives as long as ``root`` holds them.
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            digest = item.removeprefix(_REF_PREFIX)
            if SHA256_PATTERN.fullmatch(digest):
                found.add(digest)
            continue
        if item is None or isinstance(item, bytes | bytearray | int | float | complex):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ImageRef):
            found.add(item.sha256)
        elif isinstance(item, BaseModel):
            stack.extend(getattr(item, name, None) for name in type(item).model_fields)
            stack.extend((item.__pydantic_extra__ or {}).values())
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        else:
            stack.extend(_attributes(item))


def _attributes(item: object) -> list[object]:
    """The stored attributes of any other object (dataclasses, Send, exceptions, ...)."""
    values: list[object] = []
    if dataclasses.is_dataclass(item):
        values.extend(getattr(item, f.name, None) for f in dataclasses.fields(item))
    if isinstance(item, BaseException):
        values.extend(item.args)
    values.extend(getattr(item, "__dict__", {}).values())
    for cls in type(item).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            values.append(getattr(item, name, None))
    return values
