"""A batch file's image paths stay inside its folder unless --allow-outside-images is given."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator
from interleave_thinker.batch import arun_batch, batch_image_paths
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.errors import ImageError
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.state import RunOptions

TINY = RunOptions(width=32, height=32)


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/batch/ holds the prompt file and inside.png (and sub/nested.png, a link to it);
    tmp/secret.png lies outside it, reached by '..', its absolute path and a symbolic link."""
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    (folder / "inside.png").write_bytes(_png("teal"))
    (folder / "sub" / "nested.png").write_bytes(_png("navy"))
    (folder / "inner-link.png").symlink_to("sub/nested.png")
    (tmp_path / "secret.png").write_bytes(_png("red"))
    (folder / "escape.png").symlink_to(tmp_path / "secret.png")
    (folder / "linked-dir").symlink_to(tmp_path)
    lines = [
        {"id": "inside", "text": "A.", "images": ["inside.png"]},
        {"id": "nested", "text": "A.", "images": ["sub/nested.png", "./sub/../inside.png"]},
        {"id": "inner-link", "text": "A.", "images": ["inner-link.png"]},
        {"id": "dotdot", "text": "A.", "images": ["../secret.png"]},
        {"id": "absolute", "text": "A.", "images": [str(tmp_path / "secret.png")]},
        {"id": "symlink", "text": "A.", "images": ["escape.png"]},
        {"id": "under-link", "text": "A.", "images": ["linked-dir/secret.png"]},
    ]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


INSIDE = ("inside", "nested", "inner-link")
ESCAPES = {
    "dotdot": "climbs out with '..'",
    "absolute": "is an absolute path",
    "symlink": "is a symbolic link (or lies under one)",
    "under-link": "is a symbolic link (or lies under one)",
}


def _backends() -> Backends:
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=RecordingGenerator())


async def test_images_outside_the_folder_are_refused_per_line(layout: Path, tmp_path: Path) -> None:
    report = await arun_batch(layout / "prompts.jsonl", backends=_backends(), options=TINY,
                              run_dir=tmp_path / "runs")
    outcomes = {outcome.prompt_id: outcome for outcome in report.outcomes}
    assert all(outcomes[name].status == "done" for name in INSIDE), outcomes
    for name, how in ESCAPES.items():
        outcome = outcomes[name]
        assert outcome.status == "failed", outcome
        error = outcome.error or ""
        assert "is outside the prompt file's folder" in error and how in error, error
        assert str(layout.resolve()) in error and "--allow-outside-images" in error
    # Nothing outside was read: the red image is in no stored input.
    stored = {path.read_bytes() for path in (tmp_path / "runs" / "images").rglob("*.png")}
    assert _png("red") not in stored and _png("teal") in stored


async def test_allow_outside_images_lets_them_through(layout: Path, tmp_path: Path) -> None:
    report = await arun_batch(layout / "prompts.jsonl", backends=_backends(), options=TINY,
                              run_dir=tmp_path / "runs", allow_outside_images=True)
    assert [o.status for o in report.outcomes] == ["done"] * 7, report.outcomes


def test_the_cli_flag(layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("INTERLEAVE_CONFIG", raising=False)
    prompts = layout / "prompts.jsonl"
    args = ["batch", str(prompts), "--profile", "test", "--size", "32x32"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1, refused.output
    for line in refused.stderr.splitlines():
        if "'dotdot' (line 4)" in line:
            assert "'../secret.png' is outside the prompt file's folder" in line
            break
    else:
        pytest.fail(refused.stderr)
    assert "3 finished, 4 failed" in refused.stderr
    allowed = CliRunner().invoke(app, [*args, "--allow-outside-images"])
    assert allowed.exit_code == 0, allowed.stderr
    assert "7 finished, 0 failed" in allowed.stderr


def test_paths_are_resolved_relative_to_the_prompt_file(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder is the prompt file's, not the working directory's.
    monkeypatch.chdir(layout / "sub")
    prompts = Path(os.path.relpath(layout / "prompts.jsonl"))
    assert batch_image_paths(prompts, ["inside.png", "inner-link.png"]) == [
        (layout / "inside.png").resolve(), (layout / "sub" / "nested.png").resolve()
    ]
    with pytest.raises(ImageError, match="climbs out"):
        batch_image_paths(prompts, ["sub/../../secret.png"])
    # With the flag the paths are taken as written (joined to the folder).
    [outside] = batch_image_paths(prompts, ["../secret.png"], allow_outside=True)
    assert outside.resolve() == (layout.parent / "secret.png").resolve()
