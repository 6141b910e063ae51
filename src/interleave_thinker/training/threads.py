"""Which finished threads a training export reads: by id, all of them, a batch manifest, a date."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from interleave_thinker.checkpoints.faults import check_state, storage_faults
from interleave_thinker.checkpoints.savers import list_thread_ids
from interleave_thinker.errors import ConfigurationError, DamagedCheckpointError, UnknownThreadError
from interleave_thinker.state import Document, Plan, Request, RunSettings, Step, StepStatus
from interleave_thinker.workspace import MISSING_RUN_DIR_HINT, Workspace, thread_config, validate_thread_id

# Step statuses a sample may come from: a step the critic accepted, or one that ran out of tries.
SAMPLE_STATUSES: tuple[StepStatus, ...] = ("accepted", "forced")
DEFAULT_STATUSES = frozenset(SAMPLE_STATUSES)
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Trajectory:
    """A finished thread: what was asked, the settings, the plan and every attempt (document)."""

    thread_id: str
    updated_at: str
    request: Request
    settings: RunSettings
    plan: Plan
    document: Document

    def step(self, number: int) -> Step:
        return self.plan.step(number)


@dataclass(frozen=True)
class Selection:
    """The threads to export: ``threads`` and the done rows of ``manifests``, or ``all`` of them;
    only those updated at or after ``since``; samples only from steps whose status is in
    ``statuses``."""

    threads: tuple[str, ...] = ()
    all: bool = False
    manifests: tuple[Path, ...] = ()
    since: datetime | None = None
    statuses: frozenset[str] = DEFAULT_STATUSES


@dataclass
class ReadReport:
    """The trajectories read, and each thread left out with the reason."""

    trajectories: list[Trajectory] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def parse_statuses(text: str | None) -> frozenset[str]:
    """``accepted,forced`` as a set, each name checked."""
    if text is None:
        return DEFAULT_STATUSES
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(SAMPLE_STATUSES))
    if not names or unknown:
        raise ConfigurationError(
            f"--status {text!r} names {', '.join(unknown) or 'nothing'}",
            hint="give a comma-separated list of accepted and forced",
        )
    return frozenset(names)


def parse_since(text: str | None, *, now: float | None = None) -> datetime | None:
    """A date (2026-05-01), a date and time (2026-05-01T12:00, UTC unless an offset is given), or
    an age (7d, 12h, 30m): threads updated at or after it are exported."""
    if text is None or not text.strip():
        return None
    match = _DURATION.fullmatch(text)
    if match is not None:
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return datetime.fromtimestamp((time.time() if now is None else now) - seconds, UTC)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigurationError(
            f"--since {text!r} is neither a date nor an age",
            hint="write a date (2026-05-01), a date and time (2026-05-01T12:00) or an age (7d, 12h)",
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def manifest_threads(path: Path) -> list[str]:
    """The threads of a batch manifest's rows whose prompt finished (status ``done``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"cannot read the batch manifest {path}: {exc}",
            hint="pass the manifest.jsonl that `interleave batch` wrote under <run-dir>/batches/",
        ) from exc
    threads = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigurationError(f"{path} line {number} is not JSON: {exc}",
                                     hint="pass a manifest.jsonl written by `interleave batch`") from exc
        if isinstance(row, dict) and row.get("status") == "done" and isinstance(row.get("thread_id"), str):
            threads.append(row["thread_id"])
    return threads


def _updated(snapshot_time: str | None) -> datetime | None:
    if not snapshot_time:
        return None
    try:
        moment = datetime.fromisoformat(snapshot_time)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def aread_trajectories(
    selection: Selection,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpointer: str | None = None,
    image_store: str | None = None,
    on_thread: Callable[[str, int], None] | None = None,
) -> ReadReport:
    """The finished threads ``selection`` names, in the order named (``all``: sorted by id).

    A thread named explicitly that does not exist is an error; one that has not finished, is
    older than ``since`` or whose checkpoint is damaged is left out with the reason.
    ``on_thread(thread, total)`` is called once per thread looked at.
    """
    if not (selection.threads or selection.all or selection.manifests):
        raise ConfigurationError(
            "no threads to export", hint="name threads, or pass --all or --manifest PATH"
        )
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    missing = workspace.missing_checkpoints()
    if missing is not None:
        raise UnknownThreadError(f"no threads to export: {missing}", hint=MISSING_RUN_DIR_HINT)
    report = ReadReport()
    async with workspace.graph() as graph:
        if selection.all:
            assert graph.checkpointer is not None and not isinstance(graph.checkpointer, bool)
            with storage_faults(None, workspace.checkpointer_url):
                wanted: Sequence[str] = sorted(await list_thread_ids(graph.checkpointer))
            explicit: set[str] = set()
        else:
            named = list(selection.threads)
            for manifest in selection.manifests:
                named += manifest_threads(manifest)
            wanted = list(dict.fromkeys(validate_thread_id(thread) for thread in named))
            explicit = set(selection.threads)
        for thread in wanted:
            if on_thread is not None:
                on_thread(thread, len(wanted))
            try:
                with storage_faults(thread, workspace.checkpointer_url):
                    snapshot = await graph.aget_state(thread_config(thread))
                values = check_state(thread, snapshot.values)
            except DamagedCheckpointError as exc:
                report.left_out[thread] = f"damaged checkpoint ({exc.message})"
                continue
            if not values:
                if thread in explicit:
                    raise UnknownThreadError(
                        f"no thread {thread!r} to export",
                        hint="`interleave list` shows the threads; check --run-dir and --checkpointer",
                    )
                report.left_out[thread] = "no such thread"
                continue
            document, plan = values.get("document"), values.get("plan")
            if document is None or plan is None:
                report.left_out[thread] = "not finished"
                continue
            updated = _updated(snapshot.created_at)
            if selection.since is not None and (updated is None or updated < selection.since):
                report.left_out[thread] = "older than --since"
                continue
            report.trajectories.append(
                Trajectory(thread, snapshot.created_at or "", values["request"], values["settings"], plan,
                           document)
            )
    return report
