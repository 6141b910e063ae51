"""The ``interleave`` command as a user runs it: run, show, list, export, resume and its errors."""

from __future__ import annotations

import base64
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from interleave_thinker.cli import app

SMALL = ["--size", "64x64"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> CliRunner:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    return CliRunner()


def invoke(cli: CliRunner, *args: str) -> tuple[int, str, str]:
    result = cli.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


class _StepImages(HTMLParser):
    """Collects, per <article data-step>, its status and the sha256 of its first image."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "article" and values.get("data-step"):
            self.steps.append({"number": values["data-step"], "status": values["data-status"],
                               "image": None})
        elif tag == "img" and self.steps and self.steps[-1]["image"] is None:
            src = values.get("src") or ""
            if src.startswith("data:"):
                data = base64.b64decode(src.split(",", 1)[1])
                self.steps[-1]["image"] = hashlib.sha256(data).hexdigest()


def test_run_writes_html_whose_steps_match_show_json(cli: CliRunner, run_dir: Path) -> None:
    code, stdout, stderr = invoke(
        cli, "run", "--profile", "test", *SMALL, "--thread", "story",
        "A girl plants a seed. It rains. A sprout appears. Is it a sunflower? It blooms.",
    )
    assert code == 0, stderr
    html_path = Path(stdout.strip().splitlines()[-1])
    assert html_path.is_file() and html_path.is_relative_to(run_dir)
    # Progress goes to stderr: step k of n, attempt, verdict.
    assert "step 1 of 5, attempt 1: drawing" in stderr
    assert "rejected by the critic" in stderr and "accepted by the critic" in stderr
    assert "stand-ins" in stderr

    code, shown, _ = invoke(cli, "show", "story", "--json")
    assert code == 0
    report = json.loads(shown)
    parser = _StepImages()
    parser.feed(html_path.read_text())
    assert [(s["number"], s["status"], s["image"]) for s in parser.steps] == [
        (str(s["number"]), s["status"], s["image"]) for s in report["steps"]
    ]
    assert report["status"] == "done"
    assert [s["status"] for s in report["steps"]] == [
        "accepted", "accepted", "accepted", "text", "accepted"
    ]
    for s in report["steps"]:
        for attempt in s["attempts"]:
            assert {"prompt", "seed", "image", "critique", "generation_seconds"} <= set(attempt)


def test_show_text_list_and_export_formats(cli: CliRunner, tmp_path: Path) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "t1", "A. B.")[0] == 0
    code, listing, _ = invoke(cli, "list", "--json")
    assert code == 0
    assert [json.loads(line)["thread_id"] for line in listing.splitlines()] == ["t1"]
    code, text, _ = invoke(cli, "show", "t1")
    assert code == 0 and "step 1:" in text and "seed" in text
    for fmt in ("html", "md", "json"):
        target = tmp_path / f"out.{fmt}"
        code, stdout, stderr = invoke(cli, "export", "t1", "--format", fmt, "-o", str(target))
        assert code == 0, stderr
        assert stdout.strip() == str(target) and target.stat().st_size > 0
    exported = json.loads((tmp_path / "out.json").read_text())
    assert exported["thread_id"] == "t1"
    assert len(exported["document"]["steps"]) == 2
    assert (tmp_path / "out_files").is_dir()


def test_errors_are_one_line_with_hint_and_nonzero_exit(cli: CliRunner, tmp_path: Path) -> None:
    code, stdout, stderr = invoke(cli, "show", "ghost")
    assert code == 1 and stdout == ""
    assert stderr.splitlines()[0].startswith("error: no thread 'ghost'")
    assert stderr.splitlines()[1].startswith("hint:")

    code, _, stderr = invoke(cli, "run", "--profile", "test", "--image",
                             str(tmp_path / "missing.png"), "x")
    assert code == 1 and "missing.png does not exist" in stderr

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, stderr = invoke(cli, "run", "--profile", "test", "--image", str(broken), "x")
    assert code == 1 and "could not be decoded" in stderr

    code, _, stderr = invoke(cli, "run", "--profile", "test", "--thread", "../etc", "x")
    assert code == 1 and "thread id '../etc' is not allowed" in stderr

    code, _, stderr = invoke(cli, "run", "--profile", "nope", "x")
    assert code == 1 and "unknown profile 'nope'" in stderr

    code, _, stderr = invoke(cli, "run", "--profile", "test", "--max-attempts", "0", "x")
    assert code == 1 and "max_attempts" in stderr

    # Without --profile the real models are loaded; offline and uncached, that is a clear error.
    code, _, stderr = invoke(cli, "run", "x")
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("error: ") and "FLUX.2-klein-4B" in lines[0]
    assert lines[1].startswith("hint: ")


def test_resume_refuses_changed_settings_and_finishes_same_ones(cli: CliRunner) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "r1", "A. B.")[0] == 0
    code, _, stderr = invoke(cli, "resume", "r1", "--max-attempts", "5")
    assert code == 1
    assert "options.budget.max_attempts: thread has 3, this run has 5" in stderr
    code, stdout, _ = invoke(cli, "resume", "r1")
    assert code == 0 and stdout.strip().endswith("document.html")


def test_html_export_escapes_hostile_request_text(cli: CliRunner) -> None:
    hostile = 'Draw <script>alert(1)</script>. Then "><img src=x onerror=alert(2)>'
    code, stdout, _ = invoke(cli, "run", "--profile", "test", *SMALL, hostile)
    assert code == 0
    page = Path(stdout.strip().splitlines()[-1]).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "onerror=alert(2)>" not in page


def test_run_dir_option_beats_environment(cli: CliRunner, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    code, stdout, _ = invoke(cli, "run", "--profile", "test", *SMALL, "--run-dir", str(other),
                             "One picture.")
    assert code == 0 and Path(stdout.strip()).is_relative_to(other)
    assert (other / "checkpoints.sqlite").is_file()


def test_guidance_run_from_the_cli(cli: CliRunner, tmp_path: Path) -> None:
    photo = tmp_path / "desk.jpg"
    Image.new("RGB", (40, 30), "navy").save(photo, format="JPEG")
    code, _, stderr = invoke(cli, "run", "--profile", "test", *SMALL, "--image", str(photo),
                             "--thread", "g", "Tidy the desk. Why tidy it?")
    assert code == 0, stderr
    report = json.loads(invoke(cli, "show", "g", "--json")[1])
    assert [s["number"] for s in report["steps"]] == [2, 3]
    assert report["steps"][0]["sources"] == ["input:1"]
    assert report["steps"][1]["status"] == "text"
    assert report["request"]["images"][0]["media_type"] == "image/jpeg"
