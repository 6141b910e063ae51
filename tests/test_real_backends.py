"""Whole runs on real tiny backends: transformers planner and critic, diffusers generator, CLI demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.demo.models import DEMO_REQUEST, ensure_demo_models
from interleave_thinker.demo.tiny_vlm import build_scripted_vlm, build_tiny_qwen3_vl
from interleave_thinker.models.profiles import backends_from_settings
from interleave_thinker.runner import arun
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import RunOptions

pytestmark = pytest.mark.slow

REJECTING_CRITIC = (
    "<think>The tiny critic finds the boat too small.</think>\n"
    "<answer>{'previous_step_success': False, 'refine_prompt': 'make the boat larger'}</answer>"
)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("demo-models")
    os.environ["INTERLEAVE_DEMO_DIR"] = str(folder)
    return ensure_demo_models()


def _tiny_settings(demo_models: dict[str, Path], **changes: object) -> ModelSettings:
    base = ModelSettings(
        planner=str(demo_models["planner"]),
        critic=str(demo_models["critic"]),
        generator=str(demo_models["generator"]),
        device="cpu",
        dtype="float32",
        steps=2,
        guidance=1.0,
        max_new_tokens=512,
    )
    return base.model_copy(update=changes)


async def test_graph_run_on_real_tiny_backends(demo_models: dict[str, Path], tmp_path: Path) -> None:
    backends = backends_from_settings(_tiny_settings(demo_models))
    result = await arun(DEMO_REQUEST, backends=backends, options=RunOptions(width=64, height=64),
                        run_dir=tmp_path, checkpointer="memory://")
    steps = result.document.steps
    assert [s.name for s in steps] == ["The boat", "Rain", "The frog"]
    assert all(s.status == "accepted" and s.image is not None for s in steps)
    assert all(s.image.width == 64 and s.image.height == 64 for s in steps)
    assert [s.attempts[0].critique.success for s in steps] == [True, True, True]
    # Each step edited the previous step's image: different pictures along the chain.
    assert len({s.image.sha256 for s in steps}) == 3


async def test_real_critic_rejection_drives_redraws(demo_models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    critic_dir = build_scripted_vlm(tmp_path / "rejecting-critic", REJECTING_CRITIC)
    settings = _tiny_settings(demo_models, critic=str(critic_dir))
    backends: Backends = backends_from_settings(settings)
    options = RunOptions(width=64, height=64).with_changes(max_attempts=2)
    result = await arun(DEMO_REQUEST, backends=backends, options=options, run_dir=tmp_path,
                        checkpointer="memory://")
    first = result.document.steps[0]
    assert first.status == "forced"
    assert [a.prompt for a in first.attempts][1] == "make the boat larger"
    assert first.attempts[0].image != first.attempts[1].image
    assert result.document.generator_calls == 6


def test_interleave_demo_end_to_end(demo_models: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["demo", "--thread", "demo"])
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 60
    page = Path(result.stdout.strip().splitlines()[-1])
    assert page.is_file() and "Demo profile" in page.read_text()
    assert "pictures are noise" in result.stderr
    shown = json.loads(CliRunner().invoke(app, ["show", "demo", "--json"]).stdout)
    assert shown["settings"]["profile"] == "demo"
    assert shown["settings"]["planner"].startswith("transformers:")
    assert shown["settings"]["generator"].startswith("diffusers:")
    assert [s["status"] for s in shown["steps"]] == ["accepted"] * 3


_DRAWING = re.compile(r"step (\d) of \d, attempt (\d): drawing")
_ACCEPTED = re.compile(r"step (\d) of \d, attempt (\d): accepted")


def test_demo_killed_with_sigkill_resumes_without_redrawing(demo_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "INTERLEAVE_RUN_DIR": str(tmp_path / "runs")}
    interleave = Path(sys.executable).with_name("interleave")
    process = subprocess.Popen([str(interleave), "demo", "--thread", "k"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if _ACCEPTED.search(line):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    accepted_before = {m.groups() for m in map(_ACCEPTED.search, seen) if m}
    assert accepted_before

    resumed = subprocess.run([str(interleave), "resume", "k"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    drawn_after = {m.groups() for m in map(_DRAWING.search, resumed.stderr.splitlines()) if m}
    assert not accepted_before & drawn_after, "a finished generator call was repeated"

    clean = CliRunner().invoke(app, ["demo", "--thread", "clean", "--run-dir",
                                     str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.stderr

    def steps(run_dir: Path, thread: str) -> list[tuple]:
        out = tmp_path / f"{thread}.json"
        exported = CliRunner().invoke(app, ["export", thread, "--format", "json", "-o", str(out),
                                            "--run-dir", str(run_dir)])
        assert exported.exit_code == 0, exported.stderr
        doc = json.loads(out.read_text())["document"]
        return [(s["number"], s["status"], s["image"]["sha256"]) for s in doc["steps"]]

    assert steps(tmp_path / "runs", "k") == steps(tmp_path / "clean", "clean")


async def test_structured_mode_on_real_tiny_models(demo_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    plan = {"execution_plan": [
        {"step_number": 1, "step_name": "Boat", "instruction": "A paper boat.",
         "prompt": "a paper boat on a pond", "auxiliary_text": None},
        {"step_number": 2, "step_name": "Rain", "instruction": "Rain falls.",
         "prompt": "add rain", "auxiliary_text": None},
    ]}
    # Compact JSON in schema order: the only spelling the grammar allows, so the scripted
    # planner's reply passes through it unchanged.
    planner_dir = build_scripted_vlm(tmp_path / "json-planner",
                                     json.dumps(plan, separators=(",", ":")))
    critic_dir = tmp_path / "random-critic"
    build_tiny_qwen3_vl(critic_dir)
    settings = _tiny_settings(demo_models, planner=str(planner_dir), critic=str(critic_dir))
    options = RunOptions(width=64, height=64).with_changes(output_mode="structured",
                                                            max_attempts=2)
    result = await arun("boat", backends=backends_from_settings(settings), options=options,
                        run_dir=tmp_path, checkpointer="memory://")
    steps = result.document.steps
    assert [s.name for s in steps] == ["Boat", "Rain"]
    # A random critic under the verdict grammar still gives a verdict the graph can act on.
    for step in steps:
        assert step.status in ("accepted", "forced") and step.image is not None
        assert all(a.critique is not None for a in step.attempts)
