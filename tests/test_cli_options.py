"""The CLI's shared run flags: one definition, offered alike by run, resume and batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.cli.options import NO_FLAGS, RunFlags, run_flags
from interleave_thinker.errors import ConfigurationError

# The flags batch does not take (a plan's size and re-asks are per-thread choices of run).
BATCH_OMITS = {"max_steps", "max_reasks"}


def _options(command: str) -> dict[str, tuple[tuple[str, ...], str | None, object]]:
    """A command's options as typer builds them: name -> (flags, help, environment variable)."""
    group = typer.main.get_command(app)
    return {
        param.name: (tuple(param.opts), getattr(param, "help", None), param.envvar)
        for param in group.commands[command].params  # type: ignore[attr-defined]
        if param.param_type_name == "option" and param.name
    }


def test_run_resume_and_batch_offer_the_same_run_flags() -> None:
    names = [field.name for field in dataclasses.fields(RunFlags)]
    run, resume, batch = _options("run"), _options("resume"), _options("batch")
    for name in names:
        assert run[name] == resume[name], name
        if name not in BATCH_OMITS:
            assert batch[name] == run[name], name
    assert BATCH_OMITS.isdisjoint(batch)
    # In the order RunFlags lists them, one block in each command's help.
    for options, expected in ((run, names), (resume, names),
                              (batch, [name for name in names if name not in BATCH_OMITS])):
        listed = [name for name in options if name in names]
        assert listed == expected
    assert run["size"][0] == ("--size",) and run["run_dir"][2] == "INTERLEAVE_RUN_DIR"


def test_the_flags_reach_the_command_as_one_run_flags(tmp_path: Path) -> None:
    seen: list[RunFlags] = []
    probe = typer.Typer()

    @probe.command()
    @run_flags(omit=("max_steps",))
    def command(name: str, flags: RunFlags = NO_FLAGS, loud: bool = False) -> None:
        seen.append(flags)
        assert name == "x" and loud

    result = CliRunner().invoke(probe, [
        "x", "--loud", "--size", "64x32", "--seed", "3", "--selection", "best",
        "--planner", "p", "--device", "cpu", "--run-dir", str(tmp_path), "--trace-file", "t.jsonl",
    ])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(probe, ["x", "--max-steps", "2"]).exit_code == 2
    [flags] = seen
    assert flags == RunFlags(size="64x32", seed=3, selection="best", planner="p", device="cpu",
                             run_dir=tmp_path, trace_file=Path("t.jsonl"))
    assert flags.option_changes() == {"seed": 3, "selection": "best", "width": 64, "height": 32}


def test_model_flags_become_model_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERLEAVE_CONFIG", raising=False)
    monkeypatch.delenv("INTERLEAVE_PLANNER", raising=False)
    settings = RunFlags(planner="my/planner", critic_url="http://c/v1", model_timeout=5.0).model_settings()
    assert (settings.planner, settings.critic_url, settings.model_timeout) == (
        "my/planner", "http://c/v1", 5.0
    )
    assert RunFlags().option_changes() == {}


def test_bad_run_flags_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="--selection must be 'last' or 'best'"):
        RunFlags(selection="worst").option_changes()
    with pytest.raises(ConfigurationError, match="is not WIDTHxHEIGHT"):
        RunFlags(size="big").option_changes()


def test_run_flags_refuses_unknown_names_and_commands_without_flags() -> None:
    with pytest.raises(ValueError, match="no such run flags"):
        run_flags(omit=("colour",))

    def no_flags(name: str) -> None: ...

    with pytest.raises(TypeError, match="no parameter 'flags'"):
        run_flags()(no_flags)
