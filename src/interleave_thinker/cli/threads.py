"""The commands that read and tidy stored threads: list, show, export and gc."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from interleave_thinker.cli.common import err, out, reports_errors
from interleave_thinker.cli.options import CheckpointerOption, ImageStoreOption, RunDirOption
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.inspect import ThreadSummary, alist_threads, aload_document, athread_report
from interleave_thinker.render import export_document
from interleave_thinker.workspace import MISSING_RUN_DIR_HINT, Workspace

ThreadArgument = Annotated[str, typer.Argument(help="Thread id.")]
FormatOption = Annotated[
    str, typer.Option("--format", help="html, md or json.", case_sensitive=False)
]
OutputOption = Annotated[
    Path | None, typer.Option("-o", "--output", help="Output file (default: run directory).")
]
DeleteOption = Annotated[
    bool, typer.Option("--delete", help="Remove what is found (without it: a dry run).")
]
MinAgeOption = Annotated[
    str,
    typer.Option(
        "--min-age",
        help="Keep unused files younger than this (30m, 1h, 2d): a running process may be "
        "about to reference them.",
    ),
]
AllowEmptyOption = Annotated[
    bool,
    typer.Option(
        "--allow-empty",
        help="Remove even when the checkpointer uses none of the images (every thread "
        "deleted); without it gc refuses, as a wrong --checkpointer looks the same.",
    ),
]
VerboseOption = Annotated[bool, typer.Option("-v", "--verbose", help="List every file.")]


@reports_errors
def list_threads(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the threads of the checkpointer, newest first (creates nothing)."""
    missing = Workspace.open(run_dir, checkpointer).missing_checkpoints()
    threads = [] if missing else asyncio.run(alist_threads(run_dir=run_dir, checkpointer=checkpointer))
    if as_json:
        for summary in threads:
            out.print(json.dumps(summary.__dict__))
    if missing:
        err.print(f"no threads: {missing}")
        err.print(f"hint: {MISSING_RUN_DIR_HINT}")
    elif not threads:
        err.print("no threads yet")
    elif not as_json:
        _print_threads(threads)


def _print_threads(threads: list[ThreadSummary]) -> None:
    """One line per thread, its whole id first (ids are what show, resume and export take), and
    its request on the next line, shortened to the terminal's width."""
    id_width = max(len("thread"), *(len(summary.thread_id) for summary in threads))
    status_width = max(len("status"), *(len(summary.status) for summary in threads))
    out.print(f"{'thread':<{id_width}}  {'status':<{status_width}}  steps  calls  updated")
    room = max(20, out.width - 4)
    for summary in threads:
        updated = summary.updated_at[:16].replace("T", " ")
        out.print(
            f"{summary.thread_id:<{id_width}}  {summary.status:<{status_width}}  "
            f"{summary.steps:>5}  {summary.generator_calls:>5}  {updated}"
        )
        request = " ".join(summary.request.split())
        out.print("  " + (request if len(request) <= room else request[: room - 1] + "…"))


@reports_errors
def show(
    thread: ThreadArgument,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Show a thread: plan, every attempt with prompt, seed, image hash and critique, timings."""
    report = asyncio.run(athread_report(thread, run_dir=run_dir, checkpointer=checkpointer))
    if as_json:
        out.print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    out.print(f"thread {report['thread_id']}: {report['status']}, "
              f"{report['generator_calls']} generator calls")
    out.print(f"request: {report['request']['text']}")
    for error in report["errors"]:
        out.print(f"error: {error}")
    for step in report["steps"]:
        out.print(f"\nstep {step['number']}: {step['name']} [{step['status']}]")
        out.print(f"  {step['text']}")
        for attempt in step["attempts"]:
            _print_attempt(attempt)
    if report["document_path"]:
        out.print(f"\ndocument: {report['document_path']}")


def _print_attempt(attempt: dict[str, Any]) -> None:
    """One attempt of `show`: seed, image hash, verdict, timings, prompt and refined prompt."""
    critique = attempt["critique"]
    verdict = (
        "not judged" if critique is None
        else "accepted" if critique["success"] else "rejected"
    )
    out.print(
        f"  attempt {attempt['number']}: seed {attempt['seed']}, image "
        f"{attempt['image']['sha256'][:12]}, {verdict}, "
        f"{attempt['generation_seconds']:.2f}s drawing, "
        f"{attempt['critique_seconds']:.2f}s judging"
    )
    out.print(f"    prompt: {attempt['prompt']}")
    if critique and critique.get("refine_prompt") and not critique["success"]:
        out.print(f"    refined: {critique['refine_prompt']}")


@reports_errors
def export(
    thread: ThreadArgument,
    fmt: FormatOption = "html",
    output: OutputOption = None,
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    image_store: ImageStoreOption = None,
) -> None:
    """Write a finished thread's document as HTML, Markdown or JSON; prints its path."""
    fmt = fmt.lower()
    if fmt not in ("html", "md", "json"):
        raise ConfigurationError(f"unknown format {fmt!r}", hint="use html, md or json")
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    document = asyncio.run(
        aload_document(thread, run_dir=workspace.run_dir, checkpointer=workspace.checkpointer_url)
    )
    target = output or workspace.document_path(thread).with_suffix(f".{fmt}")
    chosen: Literal["html", "md", "json"] = fmt  # type: ignore[assignment]
    path = export_document(
        document, workspace.image_store, thread_id=thread, fmt=chosen, out=target,
        protected=workspace.protected_paths(),
    )
    out.print(str(path))


@reports_errors
def collect_garbage(
    run_dir: RunDirOption = None,
    checkpointer: CheckpointerOption = None,
    image_store: ImageStoreOption = None,
    delete: DeleteOption = False,
    min_age: MinAgeOption = "1h",
    allow_empty: AllowEmptyOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Remove images and ledger records that no thread references (a dry run unless --delete)."""
    from interleave_thinker.gc import acollect_garbage, parse_duration

    report = asyncio.run(
        acollect_garbage(
            run_dir=run_dir,
            checkpointer=checkpointer,
            image_store=image_store,
            delete=delete,
            min_age_s=parse_duration(min_age),
            allow_empty=allow_empty,
        )
    )
    if as_json:
        out.print(json.dumps(report.as_json(), indent=2))
        return
    for line in report.summary(verbose=verbose):
        out.print(line)
