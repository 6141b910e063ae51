"""Using the compiled graph directly: the runtime context of a run, and the input of a request."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from interleave_thinker.context import Backends, Context, Timeouts
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.prompts.packs import OfficialPack, PromptPack
from interleave_thinker.runner import (
    CUSTOM_PROFILE,
    check_request_text,
    choose_models,
    chosen_image_store,
    make_settings,
    trajectory_input,
)
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import Request, RunOptions, TrajectoryState
from interleave_thinker.workspace import InputImage, Workspace, resolve_input_images

__all__ = ["make_context", "make_input"]


def make_context(
    run_dir: str | os.PathLike[str] | None = None,
    *,
    profile: str | None = None,
    backends: Backends | None = None,
    model_settings: ModelSettings | None = None,
    prompts: str | PromptPack | None = None,
    timeouts: Timeouts | None = None,
    image_store: str | None = None,
) -> Context:
    """The context every node of ``build_graph()`` needs (``graph.invoke(..., context=...)``).

    Models: your ``backends``, else the ``profile`` (default: the real in-process models,
    configured by ``model_settings``), exactly as :func:`~interleave_thinker.run` chooses them;
    ``prompts`` picks the prompt pack the same way. Images, the generation ledger and the
    verdicts live in ``run_dir`` (else ``$INTERLEAVE_RUN_DIR``, else ``./interleave-runs``), or
    in ``image_store`` (a ``file://`` or ``postgresql://`` URL). ``timeouts`` bound each backend
    call (default: those of ``model_settings``, else ``Timeouts()``).
    """
    paper = bool(model_settings and model_settings.paper)
    profile_name, chosen, pack = choose_models(
        profile, backends, model_settings, prompts=prompts, paper=paper
    )
    workspace = Workspace.open(run_dir, None, chosen_image_store(image_store, model_settings))
    context = workspace.context(chosen, Timeouts.chosen(timeouts, model_settings), prompts=pack)
    return dataclasses.replace(context, profile=profile_name)


def make_input(
    text: str,
    *,
    context: Context,
    images: Sequence[InputImage] = (),
    options: RunOptions | None = None,
) -> TrajectoryState:
    """The input that starts a thread of ``build_graph()`` for one request.

    ``images`` are stored in the context's image store (file paths, ``sha256:HEX`` references
    of stored images, ``data:image/...;base64,`` URLs or ``ImageRef`` records); ``options``
    default to ``RunOptions()``. The thread's settings record the context's models, prompt
    pack and profile, so that :func:`~interleave_thinker.resume` can continue the thread.
    """
    if not isinstance(context, Context):
        raise ConfigurationError(
            f"context must be an interleave_thinker.Context, not {type(context).__name__}",
            hint="build it with interleave_thinker.make_context(...)",
        )
    check_request_text(text)
    options = options if options is not None else RunOptions()
    if options.paper and not isinstance(context.prompts, OfficialPack):
        raise ConfigurationError(
            "paper mode needs the official prompts, and this context has "
            f"the {context.prompts.identity!r} pack",
            hint="make the context with prompts='official' (or model_settings with paper=True)",
        )
    request = Request(text=text, images=tuple(resolve_input_images(context.image_store, images)))
    settings = make_settings(
        context.profile or CUSTOM_PROFILE, context.backends, options, context.prompts
    )
    return trajectory_input(request, settings)
