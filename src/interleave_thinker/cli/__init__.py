"""The ``interleave`` command: run, resume, list, show and export trajectories."""

from __future__ import annotations

import typer

from interleave_thinker.cli.evaluation import eval_app
from interleave_thinker.cli.generation import batch, demo, resume, run
from interleave_thinker.cli.prompts import prompts_app
from interleave_thinker.cli.threads import collect_garbage, list_threads, show
from interleave_thinker.cli.training import export_app

app = typer.Typer(
    name="interleave",
    help="Interleaved text-image generation: a planner writes the steps, a generator draws "
    "each one, a critic checks every image and asks for a redraw when it is wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# In this order in `interleave --help`.
app.command()(run)
app.command()(resume)
app.command()(demo)
app.command()(batch)
app.command("list")(list_threads)
app.command()(show)
# `export THREAD` (a document) and `export training KIND` (training data).
app.add_typer(export_app)
app.command("gc")(collect_garbage)
app.add_typer(prompts_app)
app.add_typer(eval_app)

__all__ = ["app"]
