"""The flags shared by commands, defined once: where threads live, the models and the run options."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from interleave_thinker.cli.common import callbacks
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.settings import ModelSettings, load_model_settings
from interleave_thinker.state import RunOptions, SelectionPolicy
from interleave_thinker.workspace import RUN_DIR_ENV

RunDirOption = Annotated[
    Path | None,
    typer.Option("--run-dir", envvar=RUN_DIR_ENV, help="Run directory (default ./interleave-runs)."),
]
CheckpointerOption = Annotated[
    str | None,
    typer.Option(
        "--checkpointer",
        envvar="INTERLEAVE_CHECKPOINTER",
        help="Checkpointer URL: sqlite:///PATH (default: in the run directory), "
        "postgresql://USER:PASSWORD@HOST/DB or memory://.",
    ),
]
ImageStoreOption = Annotated[
    str | None,
    typer.Option(
        "--image-store",
        envvar="INTERLEAVE_IMAGE_STORE",
        help="Where images, generation ledger and verdicts live: file:// (the run directory, "
        "default), file:///PATH or postgresql://USER:PASSWORD@HOST/DB (shared by every machine).",
    ),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="default (the real models, see --planner/--critic/--generator), demo (tiny "
        "offline models) or test (stand-ins that need no weights).",
    ),
]
PlannerOption = Annotated[
    str | None, typer.Option("--planner", help="Planner model: folder or hub id.")
]
CriticOption = Annotated[str | None, typer.Option("--critic", help="Critic model: folder or hub id.")]
GeneratorOption = Annotated[
    str | None, typer.Option("--generator", help="Diffusers model: folder or hub id.")
]
PlannerUrlOption = Annotated[
    str | None,
    typer.Option("--planner-url", help="OpenAI-compatible server for the planner (e.g. vLLM .../v1)."),
]
CriticUrlOption = Annotated[
    str | None, typer.Option("--critic-url", help="OpenAI-compatible server for the critic.")
]
GeneratorUrlOption = Annotated[
    str | None,
    typer.Option("--generator-url", help="OpenAI-compatible Images API (e.g. vllm-omni .../v1)."),
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
GeneratorTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--generator-timeout",
        help="Seconds one batched generator call may take before it counts as hung and is "
        "retried (default 900; not part of the thread's settings).",
    ),
]
ModelTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--model-timeout",
        help="Seconds one planner or critic reply may take before it counts as hung and is "
        "retried (default 600; not part of the thread's settings).",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (also $INTERLEAVE_CONFIG)."),
]
MaxAttemptsOption = Annotated[
    int | None, typer.Option("--max-attempts", help="Generator calls per step (default 3).")
]
MaxCallsOption = Annotated[
    int | None,
    typer.Option("--max-calls", help="Generator calls per trajectory (default 100)."),
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Run seed (default 0).")]
SelectionOption = Annotated[
    str | None,
    typer.Option(
        "--selection",
        help="Attempt a step keeps when the critic never accepts one: last (paper) or best.",
    ),
]
SizeOption = Annotated[
    str | None, typer.Option("--size", help="Image size as WIDTHxHEIGHT (default 1024x1024).")
]
MaxStepsOption = Annotated[
    int | None, typer.Option("--max-steps", help="Most steps a plan may have (default: no limit).")
]
MaxReasksOption = Annotated[
    int | None,
    typer.Option("--max-reasks", help="Re-asks for unreadable planner/critic output (default 3)."),
]
OutputModeOption = Annotated[
    str | None,
    typer.Option(
        "--output-mode",
        help="tagged (<think>/<answer>, the released checkpoints) or structured (JSON schema).",
    ),
]
PromptsOption = Annotated[
    str | None,
    typer.Option(
        "--prompts",
        envvar="INTERLEAVE_PROMPTS",
        help="Prompt pack: interleave (ours), official (fetched with `interleave prompts "
        "fetch-official`), official:PATH (your clone of the official repository) or auto "
        "(default: official for InterleaveThinker checkpoints when fetched).",
    ),
]
PaperOption = Annotated[
    bool | None,
    typer.Option(
        "--paper",
        help="The paper's loop: official prompts, its models, 3 tries with the last kept "
        "unjudged, UEval seeds (see README, Reproducing the paper).",
    ),
]
SeedSchemeOption = Annotated[
    str | None,
    typer.Option("--seed-scheme", help="hash (default), ueval or demo: how call seeds are derived."),
]
TemperatureOption = Annotated[
    float | None,
    typer.Option("--temperature", help="Planner/critic sampling temperature (default: the model's own)."),
]
TopPOption = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling (default: the model's).")]
TopKOption = Annotated[int | None, typer.Option("--top-k", help="Top-k sampling (default: the model's).")]
DoSampleOption = Annotated[
    bool | None,
    typer.Option("--do-sample/--greedy", help="Sample or decode greedily (default: the model's own)."),
]
MaxNewTokensOption = Annotated[
    int | None,
    typer.Option("--max-new-tokens", help="Reply length limit (default 2048; 4096 with official prompts)."),
]
EngineOption = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="In-process planner/critic engine: transformers (default, portable) or vllm "
        "(batches concurrent requests; recommended on a GPU; needs the vllm extra).",
    ),
]
TraceFileOption = Annotated[
    Path | None,
    typer.Option("--trace-file", help="Write the run tree as JSON lines (no LangSmith needed)."),
]
ThreadOption = Annotated[str | None, typer.Option("--thread", help="Thread id to use.")]

# The model settings' fields each model flag sets (profile is passed apart from the settings).
MODEL_SETTINGS_FLAGS = (
    "planner", "critic", "generator", "planner_url", "critic_url", "generator_url", "device",
    "generator_timeout", "model_timeout", "temperature", "top_p", "top_k", "do_sample",
    "max_new_tokens", "engine",
)
# The run options each run flag sets (size sets width and height).
RUN_OPTION_FLAGS = (
    "output_mode", "max_steps", "max_reasks", "max_attempts", "max_calls", "seed", "selection",
    "seed_scheme",
)


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags of the commands that run trajectories (run, resume, batch), in help order.

    A new flag is added here only: its field's type is the typer option, and ``run_flags``
    offers every field to each command that takes a ``flags: RunFlags`` parameter.
    """

    run_dir: RunDirOption = None
    checkpointer: CheckpointerOption = None
    image_store: ImageStoreOption = None
    profile: ProfileOption = None
    planner: PlannerOption = None
    critic: CriticOption = None
    generator: GeneratorOption = None
    planner_url: PlannerUrlOption = None
    critic_url: CriticUrlOption = None
    generator_url: GeneratorUrlOption = None
    device: DeviceOption = None
    config: ConfigOption = None
    generator_timeout: GeneratorTimeoutOption = None
    model_timeout: ModelTimeoutOption = None
    max_attempts: MaxAttemptsOption = None
    max_calls: MaxCallsOption = None
    seed: SeedOption = None
    selection: SelectionOption = None
    size: SizeOption = None
    max_steps: MaxStepsOption = None
    max_reasks: MaxReasksOption = None
    output_mode: OutputModeOption = None
    prompt_pack: PromptsOption = None
    paper: PaperOption = None
    seed_scheme: SeedSchemeOption = None
    temperature: TemperatureOption = None
    top_p: TopPOption = None
    top_k: TopKOption = None
    do_sample: DoSampleOption = None
    max_new_tokens: MaxNewTokensOption = None
    engine: EngineOption = None
    trace_file: TraceFileOption = None

    def model_settings(self) -> ModelSettings:
        """The settings file (--config), the environment and the model flags given."""
        return load_model_settings(
            self.config,
            paper=self.paper or None,
            prompts=self.prompt_pack,
            **{name: getattr(self, name) for name in MODEL_SETTINGS_FLAGS},
        )

    def run_options(self) -> RunOptions:
        """The run options of a new thread: the paper's loop when --paper (or ``paper = true``
        in the settings) is set, then every run flag given."""
        paper = self.paper or self.model_settings().paper
        return RunOptions(paper=paper).with_changes(**self.option_changes())

    def resume_changes(self) -> dict[str, Any]:
        """What a resume compares against the thread's options (--paper included)."""
        return self.option_changes() | ({"paper": True} if self.paper else {})

    def option_changes(self) -> dict[str, Any]:
        """The run options the flags change, for ``RunOptions.with_changes`` (None: not given)."""
        changes = {name: getattr(self, name) for name in RUN_OPTION_FLAGS}
        changes["selection"] = _selection(self.selection)
        if self.size is not None:
            changes["width"], changes["height"] = parse_size(self.size)
        return {name: value for name, value in changes.items() if value is not None}

    def callbacks(self) -> list[Any]:
        """The tracers the flags ask for (--trace-file, and LangSmith from the environment)."""
        return callbacks(self.trace_file)


# A command's `flags` parameter needs a default once an earlier parameter has one.
NO_FLAGS = RunFlags()

F = TypeVar("F", bound=Callable[..., Any])


def run_flags(*, omit: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command the RunFlags (less ``omit``) through its parameter ``flags: RunFlags``.

    Typer sees each flag as an option of its own, in the place of ``flags``; the command
    receives them gathered into one RunFlags, the omitted ones left None.
    """
    hints = get_type_hints(RunFlags, include_extras=True)
    offered = [field.name for field in dataclasses.fields(RunFlags) if field.name not in omit]
    unknown = set(omit) - set(hints)
    if unknown:
        raise ValueError(f"no such run flags: {sorted(unknown)}")
    flag_parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=hints[name])
        for name in offered
    ]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            parameters.extend(flag_parameters if parameter.name == "flags" else [parameter])
        if len(parameters) == len(signature.parameters):
            raise TypeError(f"{command.__name__} has no parameter 'flags'")

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = RunFlags(**{name: kwargs.pop(name) for name in offered if name in kwargs})
            return command(*args, flags=flags, **kwargs)

        # What typer reads: the signature and the type hints, with the flags spelled out.
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            parameter.name: parameter.annotation for parameter in parameters
        } | {"return": signature.return_annotation}
        return wrapper  # type: ignore[return-value]

    return decorate


def _selection(value: str | None) -> SelectionPolicy | None:
    if value is None:
        return None
    if value not in ("last", "best"):
        raise ConfigurationError(
            f"--selection must be 'last' or 'best', not {value!r}",
            hint="'last' keeps the final attempt (the paper); 'best' the highest critic score",
        )
    return value  # type: ignore[return-value]


def parse_size(size: str) -> tuple[int, int]:
    """WIDTHxHEIGHT as two integers; RunOptions then checks their range."""
    # ASCII digits only, and few of them: str.isdigit() accepts '²', which int() refuses, and
    # int() refuses strings of thousands of digits.
    match = _SIZE.fullmatch(size)
    numbers = [part.lstrip("0") or "0" for part in match.groups()] if match else []
    if not numbers or any(len(number) > 6 for number in numbers):
        shown = repr(size) if len(repr(size)) <= 50 else repr(size)[:47] + "..."
        raise ConfigurationError(
            f"--size {shown} is not WIDTHxHEIGHT", hint="for example --size 1024x1024"
        )
    return int(numbers[0]), int(numbers[1])


_SIZE = re.compile(r"([0-9]+)[xX]([0-9]+)")
