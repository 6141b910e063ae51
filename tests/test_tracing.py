"""Tracing: named runs carrying thread, step and attempt, and no image bytes anywhere in a trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from PIL import Image
from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.runner import arun
from interleave_thinker.state import RunOptions
from interleave_thinker.tracing import JsonLinesTracer, strip_image_bytes

REQUEST = "A lamp glows. A moth arrives."


def _walk(run):  # type: ignore[no-untyped-def]
    yield run
    for child in run.child_runs:
        yield from _walk(child)


def _noise(path: Path) -> Path:
    # Incompressible pixels: their base64 would be unmistakable in a payload.
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(path)
    return path


async def test_run_tree_names_nodes_and_carries_thread_step_attempt(
    tmp_path: Path, test_backends: Backends
) -> None:
    # "original+chat" records chat messages as they are (blocks included), not as flat text.
    collector = RunCollectorCallbackHandler(_schema_format="original+chat")
    result = await arun(REQUEST, images=[_noise(tmp_path / "in.png")], backends=test_backends,
                        options=RunOptions(width=64, height=64), run_dir=tmp_path,
                        checkpointer="memory://trace", thread_id="traced",
                        callbacks=[collector])
    (root,) = collector.traced_runs
    runs = list(_walk(root))
    names = {run.name for run in runs}
    assert {"planner", "generator", "critic", "compose", "generator_call"} <= names
    critic_calls = [r for r in runs if r.name == "critic" and r.run_type in ("llm", "chat_model")]
    assert critic_calls, "the critic's model calls are traced as runs named 'critic'"
    for run in critic_calls:
        metadata = run.extra["metadata"]
        assert metadata["thread_id"] == "traced"
        assert {"step", "attempt"} <= set(metadata)
    draws = [r for r in runs if r.name == "generator_call"]
    assert sum(len(r.extra["metadata"]["steps"]) for r in draws) == result.document.generator_calls
    # Not one payload in the whole tree carries pixels: images travel as sha256 references.
    payload = json.dumps([[r.inputs, r.outputs] for r in runs], default=str)
    assert "iVBOR" not in payload  # the base64 form of a PNG header
    # The first image step edits the input image, named by its hash in the traced request.
    first_draw = draws[0].inputs["jobs"][0]
    assert first_draw["sources"] == [result.document.request.images[0].sha256]
    # The planner saw the input image as a reference block.
    assert f"sha256:{result.document.request.images[0].sha256}" in payload


def test_trace_file_writes_the_same_tree_from_the_cli(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path / "runs"))
    trace = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(app, ["run", "--profile", "test", "--size", "64x64",
                                      "--trace-file", str(trace), "--thread", "filed", REQUEST])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    by_id = {record["id"]: record for record in records}
    roots = [r for r in records if r["parent_run_id"] is None]
    assert len(roots) == 1 and all(
        r["parent_run_id"] in by_id for r in records if r["parent_run_id"])
    names = {record["name"] for record in records}
    assert {"planner", "generator", "critic", "compose", "generator_call"} <= names
    assert any(r["metadata"].get("thread_id") == "filed" and "step" in r["metadata"]
               for r in records)
    assert "iVBOR" not in trace.read_text()


def test_strip_image_bytes_removes_payloads_and_keeps_references() -> None:
    payload = {
        "messages": [{"content": [
            {"type": "image", "base64": "iVBOR" + "A" * 500, "mime_type": "image/png"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "B" * 500}},
            {"type": "image", "file_id": "sha256:" + "c" * 64},
            {"type": "text", "text": "keep me"},
        ]}]
    }
    text = json.dumps(strip_image_bytes(payload))
    assert "iVBOR" not in text and "BBBB" not in text
    assert "keep me" in text and "sha256:" + "c" * 64 in text
    assert isinstance(JsonLinesTracer, type)
