"""The ``interleave prompts`` commands: fetch the official prompts, and show what a model is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from interleave_thinker.cli.common import err, out, reports_errors
from interleave_thinker.cli.options import ConfigOption, CriticOption, PlannerOption, PromptsOption
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.prompts.official import OFFICIAL_REPOSITORY, fetch_official
from interleave_thinker.prompts.packs import OfficialPack, messages_as_json, resolve_prompt_pack
from interleave_thinker.settings import load_model_settings

prompts_app = typer.Typer(
    name="prompts",
    help="Prompt packs: fetch the official prompts of the released checkpoints, show messages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RoleOption = Annotated[str, typer.Option("--role", help="planner or critic.")]
RequestOption = Annotated[str | None, typer.Option("--request", help="The request (planner).")]
ImageOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--image",
        help="Planner: an input image (repeat). Critic: the previous image, then the candidate.",
    ),
]
PlannedOption = Annotated[
    str | None, typer.Option("--planned-prompt", help="Critic: the step's planned prompt.")
]
UsedOption = Annotated[
    str | None, typer.Option("--used-prompt", help="Critic: the prompt this attempt was drawn with.")
]
MaxStepsOption = Annotated[int | None, typer.Option("--max-steps", help="Planner: the step limit, if any.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the message list as JSON.")]
FromOption = Annotated[
    str,
    typer.Option("--from", help="Git URL or local path of the repository to clone."),
]


@prompts_app.command("fetch-official")
@reports_errors
def fetch(source: FromOption = OFFICIAL_REPOSITORY) -> None:
    """Clone the official InterleaveThinker repository into the cache and use its prompts for
    the InterleaveThinker checkpoints from now on."""
    err.print(f"cloning {source} (its prompt file is read, never run) ...")
    target, texts = fetch_official(source)
    pack = OfficialPack(texts)
    err.print(f"official prompts ready: {pack.identity}, read from {target / 'UEval' / 'system.py'}")
    out.print(str(target))


@prompts_app.command("show")
@reports_errors
def show(
    role: RoleOption = "planner",
    request: RequestOption = None,
    image: ImageOption = None,
    planned_prompt: PlannedOption = None,
    used_prompt: UsedOption = None,
    prompt_pack: PromptsOption = None,
    planner: PlannerOption = None,
    critic: CriticOption = None,
    config: ConfigOption = None,
    max_steps: MaxStepsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the messages the planner or critic gets: roles, text parts and image parts in order."""
    settings = load_model_settings(config, planner=planner, critic=critic, prompts=prompt_pack)
    pack = resolve_prompt_pack(settings.prompts, planner=settings.planner, critic=settings.critic)
    images = [{"type": "image", "image": str(path)} for path in image or []]
    if role == "planner":
        if request is None:
            raise ConfigurationError("--role planner needs --request TEXT", hint="say what to generate")
        messages = pack.planner_messages(request, images, max_steps=max_steps)
    elif role == "critic":
        if len(images) not in (0, 2):
            raise ConfigurationError(
                f"--role critic takes two --image (previous, then candidate), not {len(images)}",
                hint="or none, to see where the images go",
            )
        previous, candidate = images or [
            {"type": "image", "image": "(previous image)"},
            {"type": "image", "image": "(candidate image)"},
        ]
        messages = pack.critic_messages(
            step_name="",
            instruction="",
            planned_prompt=planned_prompt or "",
            used_prompt=used_prompt if used_prompt is not None else planned_prompt or "",
            previous_image=previous,
            candidate_image=candidate,
        )
    else:
        raise ConfigurationError(f"--role must be planner or critic, not {role!r}")
    listing = messages_as_json(messages)
    if as_json:
        # Plain JSON on stdout, byte for byte what the model's chat template receives.
        typer.echo(json.dumps(listing, ensure_ascii=False, indent=2))
        return
    err.print(f"prompt pack: {pack.identity}")
    for message in listing:
        out.print(f"--- {message['role']} ---")
        for part in message["content"]:
            if part["type"] == "text":
                out.print(part["text"])
            else:
                extra = f", max_pixels={part['max_pixels']}" if "max_pixels" in part else ""
                out.print(f"[image: {part.get('image', part.get('file_id', '?'))}{extra}]")
