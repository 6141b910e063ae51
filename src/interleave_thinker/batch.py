"""Resumable batch runs: many prompts from a JSONL file, one thread each, run concurrently."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import Callbacks
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from interleave_thinker.checkpoints.faults import file_error, storage_faults
from interleave_thinker.checkpoints.leases import thread_lease
from interleave_thinker.context import Backends, Timeouts
from interleave_thinker.errors import ConfigurationError, ImageError, InterleaveError, one_line
from interleave_thinker.generators.coalescing import CoalescingGenerator
from interleave_thinker.input_files import read_user_file
from interleave_thinker.prompts.packs import PromptPack
from interleave_thinker.runner import choose_models, chosen_image_store, make_settings, run_thread
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import Request, RunOptions, request_text_problem
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.workspace import Workspace, store_input_images

logger = logging.getLogger(__name__)

# A prompt file line longer than this is refused rather than parsed.
MAX_LINE_CHARS = 1_000_000
# The whole file is read at once; a bigger one is most likely not a prompt file.
MAX_PROMPT_FILE_BYTES = 1024**3


class BatchPrompt(BaseModel):
    """One line of a prompt file."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=512)
    text: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)

    @field_validator("text", mode="before")
    @classmethod
    def _acceptable_text(cls, value: object) -> object:
        # The same rules as a request from the CLI or the API, so a bad text is a bad line.
        problem = request_text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            raise ValueError(problem[0])
        return value


@dataclass(frozen=True)
class PromptLine:
    line: int
    prompt: BatchPrompt


@dataclass(frozen=True)
class BadLine:
    line: int
    error: str


@dataclass
class PromptOutcome:
    """One manifest row."""

    prompt_id: str
    line: int
    thread_id: str
    status: str  # done | failed
    document: str | None = None
    error: str | None = None
    generator_calls: int = 0


def read_prompt_file(path: Path) -> tuple[list[PromptLine], list[BadLine]]:
    """Valid prompts and bad lines (with what is wrong), in file order; blank lines are skipped.

    Each line is decoded on its own, so a line that is not UTF-8 is one bad line, not a bad file.
    """
    data = read_user_file(
        path,
        what="prompt file",
        max_bytes=MAX_PROMPT_FILE_BYTES,
        hint="pass a JSON-lines file: one {\"id\": ..., \"text\": ...} object per line",
    )
    prompts: list[PromptLine] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    # Lines end at \n only (with an optional \r): JSON strings may hold other line separators.
    for number, raw_bytes in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        raw_bytes = raw_bytes.removesuffix(b"\r")
        if not raw_bytes.strip():
            continue
        try:
            if len(raw_bytes) > MAX_LINE_CHARS:
                raise ValueError(f"the line is over {MAX_LINE_CHARS:,} bytes")
            raw = _decode_line(raw_bytes)
            prompt = BatchPrompt.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            bad.append(BadLine(number, one_line(exc)))
            continue
        except RecursionError:
            bad.append(BadLine(number, "the JSON is nested too deeply"))
            continue
        if prompt.id in seen:
            bad.append(BadLine(number, f"id {prompt.id!r} was already used on line {seen[prompt.id]}"))
            continue
        seen[prompt.id] = number
        prompts.append(PromptLine(number, prompt))
    return prompts, bad


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"the line is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        ) from exc


def batch_image_paths(
    prompt_file: Path, images: Sequence[str], *, allow_outside: bool = False
) -> list[Path]:
    """The files a prompt line's ``images`` name, read relative to the prompt file's folder.

    Unless ``allow_outside``, each must lie inside that folder once resolved: a prompt file
    from elsewhere must not make the run read any file the user can read (and store it, and
    send it to the models) through ``..``, an absolute path or a symbolic link. The resolved
    path is returned, so a link changed after this check is not followed.
    """
    folder = prompt_file.absolute().parent
    root = folder.resolve()
    paths = []
    for image in images:
        candidate = folder / image
        if allow_outside:
            paths.append(candidate)
            continue
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic link loop
            raise ImageError(f"input image {image!r} cannot be resolved: {one_line(exc)}") from exc
        if not resolved.is_relative_to(root):
            if Path(image).is_absolute():
                how = "is an absolute path"
            elif not Path(os.path.normpath(candidate)).is_relative_to(os.path.normpath(folder)):
                how = "climbs out with '..'"
            else:
                how = f"is a symbolic link (or lies under one) leading to {resolved}"
            raise ImageError(
                f"input image {image!r} is outside the prompt file's folder {root}: it {how}; "
                "move the image into that folder, or pass --allow-outside-images "
                "(allow_outside_images=True) if you trust the prompt file",
            )
        paths.append(resolved)
    return paths


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def thread_id_for(prompt_id: str) -> str:
    """A valid, stable thread id for a prompt id: a readable slug plus a hash of the exact id.

    The hash keeps ids that differ only in characters the slug drops apart.
    """
    slug = _UNSAFE.sub("-", prompt_id).strip("-.")[:80] or "prompt"
    digest = hashlib.sha256(prompt_id.encode()).hexdigest()[:10]
    return f"batch-{slug}-{digest}"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' with 0 <= I < N, as in --shard 0/2."""
    # ASCII digits only, and few of them: int() refuses '²' and numbers of thousands of digits.
    match = _SHARD.fullmatch(text)
    if match is None or not int(match["index"]) < int(match["count"]):
        raise ConfigurationError(
            f"--shard {text[:40]!r} is not I/N with 0 <= I < N", hint="for two machines: 0/2 and 1/2"
        )
    return int(match["index"]), int(match["count"])


_SHARD = re.compile(r"(?P<index>[0-9]{1,9})/(?P<count>[0-9]{1,9})")


def in_shard(prompt_id: str, shard: tuple[int, int]) -> bool:
    """Prompts are split by a hash of their id, so adding lines never moves others between shards."""
    index, count = shard
    return int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % count == index


@dataclass
class BatchReport:
    outcomes: list[PromptOutcome]
    bad_lines: list[BadLine]
    manifest: Path
    index: Path
    backend_calls: int

    @property
    def failed(self) -> int:
        return sum(outcome.status == "failed" for outcome in self.outcomes)


ProgressHandler = Callable[[dict[str, Any]], None]


async def arun_batch(
    prompt_file: str | os.PathLike[str],
    *,
    profile: str | None = None,
    backends: Backends | None = None,
    model_settings: ModelSettings | None = None,
    options: RunOptions | None = None,
    concurrency: int = 4,
    shard: tuple[int, int] = (0, 1),
    max_batch: int = 8,
    max_wait: float = 0.05,
    max_in_flight: int | None = 1,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    on_progress: ProgressHandler | None = None,
    callbacks: Callbacks = None,
    timeouts: Timeouts | None = None,
    allow_outside_images: bool = False,
    prompts: str | PromptPack | None = None,
    image_store: str | None = None,
) -> BatchReport:
    """Run every prompt of the shard; finished threads are skipped, unfinished ones resumed.

    ``timeouts`` bound each call as in ``arun``; a generator call includes the wait for the
    merged batch it joins. A line's ``images`` must stay inside the prompt file's folder
    unless ``allow_outside_images`` (see :func:`batch_image_paths`). ``image_store`` as in
    ``arun``: with ``postgresql://`` the machines of a batch share nothing but the database.
    """
    if concurrency < 1:
        raise ConfigurationError("--concurrency must be at least 1")
    if max_batch < 1:
        raise ConfigurationError("--max-batch must be at least 1")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigurationError(
            "--max-in-flight must be at least 1",
            hint="for no limit: 0 on the command line, None in Python",
        )
    path = Path(prompt_file)
    lines, bad_lines = read_prompt_file(path)
    mine = [item for item in lines if in_shard(item.prompt.id, shard)]
    workspace = Workspace.open(run_dir, checkpointer, chosen_image_store(image_store, model_settings))
    if options is None:
        options = RunOptions(paper=bool(model_settings and model_settings.paper))
    profile_name, backends, pack = choose_models(
        profile, backends, model_settings, prompts=prompts, paper=options.paper
    )
    settings = make_settings(profile_name, backends, options, pack)
    # One backend call at a time by default (one GPU): requests gather while it runs.
    coalescing = CoalescingGenerator(
        backends.generator, max_batch=max_batch, max_wait=max_wait, max_in_flight=max_in_flight
    )
    context = workspace.context(
        Backends(planner=backends.planner, critic=backends.critic, generator=coalescing),
        Timeouts.chosen(timeouts, model_settings),
        prompts=pack,
    )
    notify = on_progress or (lambda _: None)
    notify({"event": "batch", "total": len(mine), "bad_lines": len(bad_lines)})
    limit = asyncio.Semaphore(concurrency)

    url = workspace.checkpointer_url
    finished: dict[int, PromptOutcome] = {}

    async def one(item: PromptLine, graph: Any) -> None:
        thread_id = thread_id_for(item.prompt.id)
        async with limit:
            notify({"event": "started", "prompt_id": item.prompt.id})
            try:
                # One writer per thread: a prompt whose thread another process runs (the same
                # batch started twice) fails with ThreadBusyError and the others go on.
                async with thread_lease(url, workspace.run_dir, thread_id):
                    with storage_faults(thread_id, url, workspace.run_dir):
                        images = batch_image_paths(
                            path, item.prompt.images, allow_outside=allow_outside_images
                        )
                        request = Request(
                            text=item.prompt.text,
                            images=tuple(store_input_images(workspace.image_store, images)),
                        )
                        document = await run_thread(
                            graph, thread_id, request, settings, context, callbacks=callbacks
                        )
                    page = workspace.write_document_page(thread_id, document)
                    # Recorded before the lease is let go: a cancel landing while it is released
                    # must not report a finished thread as stopped.
                    outcome = finished[item.line] = PromptOutcome(
                        item.prompt.id, item.line, thread_id, "done", str(page),
                        generator_calls=document.generator_calls,
                    )
            except (InterleaveError, ValidationError, OSError) as exc:
                # One prompt's failure is recorded and the others go on.
                message = exc.message if isinstance(exc, InterleaveError) else one_line(exc)
                outcome = PromptOutcome(
                    item.prompt.id, item.line, thread_id, "failed", error=" ".join(message.split())
                )
            except Exception as exc:
                # Not one of ours (a bug, a backend's own error): still only this prompt's.
                logger.error("prompt %r failed", item.prompt.id, exc_info=True)
                outcome = PromptOutcome(
                    item.prompt.id, item.line, thread_id, "failed",
                    error=f"{type(exc).__name__}: {one_line(exc)}",
                )
            finished[item.line] = outcome
            notify({"event": "finished", "prompt_id": item.prompt.id, "status": outcome.status})

    stopped = "the batch stopped before this prompt finished; run the batch again to continue it"
    try:
        async with workspace.graph() as graph:
            await asyncio.gather(*(one(item, graph) for item in mine))
    except Exception as exc:
        stopped = f"not run: {exc.message if isinstance(exc, InterleaveError) else one_line(exc)}"
        raise
    finally:
        # Written whatever happened (an interrupted or failed batch included): every prompt
        # has its row, those that did not finish with why.
        outcomes = [
            finished.get(item.line)
            or PromptOutcome(item.prompt.id, item.line, thread_id_for(item.prompt.id), "failed",
                             error=stopped)
            for item in mine
        ]
        manifest, index = _write_results(workspace.run_dir, path, shard, outcomes, bad_lines)
    return BatchReport(outcomes, bad_lines, manifest, index, coalescing.backend_calls)


def _write_results(
    run_dir: Path,
    source: Path,
    shard: tuple[int, int],
    outcomes: list[PromptOutcome],
    bad_lines: list[BadLine],
) -> tuple[Path, Path]:
    """Write the manifest and the index page; a full disk is a StorageError saying so."""
    suffix = "" if shard == (0, 1) else f"-shard-{shard[0]}-of-{shard[1]}"
    folder = run_dir / "batches" / f"{_UNSAFE.sub('-', source.stem)}{suffix}"
    manifest = folder / "manifest.jsonl"
    index = folder / "index.html"
    rows = [asdict(outcome) for outcome in outcomes]
    rows += [{"line": bad.line, "status": "invalid", "error": bad.error} for bad in bad_lines]
    for target, data in (
        (manifest, "".join(json.dumps(row) + "\n" for row in rows)),
        (index, _index_page(source, outcomes, bad_lines, index)),
    ):
        try:
            write_atomically(target, data.encode())
        except OSError as exc:
            failed = file_error(
                exc, None, what=f"the batch results {target}",
                then="run the batch again: finished prompts are skipped, the others continue",
            )
            if failed is None:
                raise
            raise failed from exc
    return manifest, index


def _index_page(source: Path, outcomes: list[PromptOutcome], bad: list[BadLine], index: Path) -> str:
    rows = []
    for outcome in outcomes:
        if outcome.document:
            target = os.path.relpath(outcome.document, index.parent)
            link = f'<a href="{html.escape(target)}">{html.escape(outcome.prompt_id)}</a>'
        else:
            link = html.escape(outcome.prompt_id)
        detail = html.escape(outcome.error or f"{outcome.generator_calls} generator calls")
        rows.append(
            f"<tr><td>{outcome.line}</td><td>{link}</td><td>{html.escape(outcome.status)}</td>"
            f"<td><code>{html.escape(outcome.thread_id)}</code></td><td>{detail}</td></tr>"
        )
    for line in bad:
        rows.append(
            f"<tr><td>{line.line}</td><td></td><td>invalid</td><td></td>"
            f"<td>{html.escape(line.error)}</td></tr>"
        )
    title = html.escape(f"Batch {source.name}")
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        f"<title>{title}</title><style>body{{font:15px system-ui,sans-serif;margin:2rem}}"
        "td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}</style>"
        f"</head><body><h1>{title}</h1><table><tr><th>line</th><th>prompt</th><th>status</th>"
        f"<th>thread</th><th>detail</th></tr>{''.join(rows)}</table></body></html>"
    )

