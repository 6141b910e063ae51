"""Paused reviews: the plan written for editing (in $EDITOR), forced steps listed, answers read."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from interleave_thinker.cli.common import callbacks, err, out
from interleave_thinker.cli.progress import Progress
from interleave_thinker.errors import ConfigurationError, ReviewRequired
from interleave_thinker.input_files import read_user_file, shown_path
from interleave_thinker.runner import RunResult, aresume
from interleave_thinker.workspace import Workspace

# An edited plan is a few KB; the planner's own replies are read up to this size too.
MAX_PLAN_BYTES = 1_000_000


def review_then_resume(
    paused: ReviewRequired, run_dir: Path | None, checkpointer: str | None,
    trace_file: Path | None, *, image_store: str | None = None,
) -> RunResult | None:
    """Write the plan to a file; with an editor and a terminal, edit it and continue at once.

    A forced-step review is listed on stderr with the command that answers it.
    """
    if paused.kind == "review_forced":
        _print_forced_review(paused)
        return None
    workspace = Workspace.open(run_dir, checkpointer, image_store)
    plan_file = workspace.document_path(paused.thread_id).with_name("plan.json")
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(paused.plan, indent=2, ensure_ascii=False) + "\n")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not (editor and sys.stdin.isatty()):
        err.print(f"plan written to {plan_file}; edit it, then continue with")
        err.print(f"  interleave resume {paused.thread_id} --plan {plan_file}")
        err.print(f"or keep it as it is: interleave resume {paused.thread_id} --accept-plan")
        out.print(str(plan_file))
        return None
    subprocess.run([*shlex.split(editor), str(plan_file)], check=True)
    return asyncio.run(
        aresume(
            paused.thread_id,
            review=read_plan(plan_file),
            run_dir=workspace.run_dir,
            checkpointer=workspace.checkpointer_url,
            image_store=workspace.image_store_url,
            on_event=Progress(run_dir, checkpointer),
            callbacks=callbacks(trace_file),
        )
    )


def _print_forced_review(paused: ReviewRequired) -> None:
    """The attempts of each step never accepted, and the command that picks one; the thread id
    on stdout."""
    for step in paused.payload["steps"]:
        err.print(f"step {step['step']} ({step['name']}) was never accepted by the critic:")
        for attempt in step["attempts"]:
            err.print(f"  attempt {attempt['attempt']}: image {attempt['image'][:12]}, "
                      f"prompt: {attempt['prompt']}")
        err.print(f"  the selection policy would keep attempt {step['policy_keeps']}")
    err.print(f"continue with: interleave resume {paused.thread_id} --keep STEP=ATTEMPT "
              "(or --accept-forced)")
    out.print(paused.thread_id)


def review_answer(
    plan: Path | None, accept_plan: bool, keep: list[str] | None, accept_forced: bool
) -> dict[str, Any] | bool | None:
    """What `resume` answers a paused review with, from its flags."""
    if plan is not None:
        return read_plan(plan)
    if keep:
        choices: dict[str, Any] = {}
        for item in keep:
            step, sep, attempt = item.partition("=")
            if not sep:
                raise ConfigurationError(f"--keep {item!r} is not STEP=ATTEMPT", hint="e.g. 2=1")
            choices[step.strip()] = attempt.strip()
        return choices
    return True if accept_plan or accept_forced else None


def read_plan(path: Path) -> dict[str, Any]:
    """An edited plan: a JSON object, read bounded and without blocking."""
    hint = "fix the JSON and resume again"
    # Bounded and non-blocking: a FIFO or /dev/zero given as --plan must not hang the command.
    data = read_user_file(path, what="the edited plan", max_bytes=MAX_PLAN_BYTES, hint=hint)
    try:
        plan = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
            f"at offset {exc.start})",
            hint="save the plan as UTF-8 and resume again",
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(
            f"cannot read the edited plan {shown_path(path)}: {exc}", hint=hint
        ) from exc
    except RecursionError as exc:
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is nested too deeply", hint=hint
        ) from exc
    if not isinstance(plan, dict):
        raise ConfigurationError(
            f"the edited plan {shown_path(path)} is not a JSON object",
            hint='keep the form {"execution_plan": [...]} you were given and resume again',
        )
    return plan
