"""Helpers of the training tests: a stand-in for the official clone's judge prompts, a scripted
judge, a reader that applies LLaMA-Factory's rules to sharegpt files, and finished threads.

The judge prompt file has the constant names and placeholder of the official
``train/EasyR1/viescore/vie_prompts.py`` but our own words: no text of the official repository
is in this project.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage
from PIL import Image
from typer.testing import CliRunner

from conftest import ScriptedChatModel, scripted
from interleave_thinker.cli import app
from official_clone import write_clone

SEMANTIC_MARK = "SEMANTIC-CHECK"
QUALITY_MARK = "QUALITY-CHECK"

VIE_PROMPTS = {
    "_context_no_delimit": '(test fixture) You rate pictures made by a model.\n'
                           'Reply with {"score": [...], "reasoning": "..."}.',
    "_prompts_0shot_two_image_edit_rule_ours": "(test fixture) Two pictures follow: before, then after.",
    "_prompts_0shot_tie_rule_SC_ours": f"(test fixture) {SEMANTIC_MARK}: from 0 to 10, how well does the "
                                       "after picture follow: <instruction>",
    "_prompts_0shot_rule_PQ_ours": f"(test fixture) {QUALITY_MARK}: from 0 to 10, naturalness and artifacts.",
}


def write_judge_prompts(root: Path) -> Path:
    """``root`` laid out like the official repository: the critic templates (UEval/system.py)
    and the reward's judge prompts (train/EasyR1/viescore/vie_prompts.py), in our words."""
    write_clone(root)
    folder = root / "train" / "EasyR1" / "viescore"
    folder.mkdir(parents=True, exist_ok=True)
    body = "import os  # parsed, never run\n\n" + "".join(
        f"{name} = {text!r}\n\n" for name, text in VIE_PROMPTS.items()
    )
    (folder / "vie_prompts.py").write_text(body, encoding="utf-8")
    return root


def message_text(messages: list[BaseMessage]) -> str:
    parts = []
    for message in messages:
        content = message.content
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [str(p.get("text", "")) for p in content
                      if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(parts)


def image_count(messages: list[BaseMessage]) -> int:
    return sum(1 for m in messages if isinstance(m.content, list)
               for p in m.content if isinstance(p, dict) and p.get("type") == "image")


def scripted_judge(semantic: str = '{"score": [6, 8], "reasoning": "ok"}',
                   quality: str = '{"score": [9, 7], "reasoning": "ok"}',
                   on_call: Callable[[list[BaseMessage]], None] | None = None,
                   quality_reply: Callable[[], str] | None = None) -> ScriptedChatModel:
    """A judge answering the semantic question with ``semantic`` and the quality one with
    ``quality`` (min 6 and 7 by default; ``quality_reply()`` instead when given)."""

    def reply(messages: list[BaseMessage]) -> str:
        if on_call is not None:
            on_call(messages)
        text = message_text(messages)
        if SEMANTIC_MARK in text:
            assert image_count(messages) == 2
            return semantic
        assert QUALITY_MARK in text and image_count(messages) == 1
        return quality_reply() if quality_reply is not None else quality

    return scripted(reply, name="scripted-judge")


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's rules for a sharegpt dataset


def load_sharegpt(folder: Path, entry: str) -> list[dict[str, Any]]:
    """The records of dataset ``entry`` of ``folder/dataset_info.json``, checked as LLaMA-Factory
    checks them: sharegpt with role/content tags, an optional system turn first, then user and
    assistant turns alternating (user first, assistant last), as many ``<image>`` tokens in the
    text as entries in ``images``, no video or audio tokens, absolute paths of existing images."""
    info = json.loads((folder / "dataset_info.json").read_text())
    spec = info[entry]
    assert spec["formatting"] == "sharegpt"
    assert spec["columns"] == {"messages": "messages", "images": "images"}
    tags = spec["tags"]
    assert (tags["role_tag"], tags["content_tag"], tags["user_tag"], tags["assistant_tag"]) == (
        "role", "content", "user", "assistant")
    data_file = Path(spec["file_name"])
    assert data_file.is_absolute() and data_file.is_file()
    records = json.loads(data_file.read_text(encoding="utf-8"))
    assert isinstance(records, list)
    for record in records:
        assert set(record) == {"messages", "images"}
        messages = record["messages"]
        if messages and messages[0][tags["role_tag"]] == tags.get("system_tag", "system"):
            messages = messages[1:]
        assert messages and len(messages) % 2 == 0
        for index, message in enumerate(messages):
            expected = tags["user_tag"] if index % 2 == 0 else tags["assistant_tag"]
            assert message[tags["role_tag"]] == expected, record
            assert isinstance(message[tags["content_tag"]], str)
        text = "".join(m["content"] for m in record["messages"])
        assert len(re.findall(re.escape("<image>"), text)) == len(record["images"]), record
        assert "<video>" not in text and "<audio>" not in text
        for path in record["images"]:
            assert Path(path).is_absolute() and Path(path).is_file(), path
            with Image.open(path) as image:
                image.verify()
    return records


# ---------------------------------------------------------------------------------------------
# Finished threads


STORY = "A girl plants a seed. It rains. A sprout appears. Is it a sunflower? It blooms."
GUIDE = "Continue the picture: the fox jumps. It lands softly."


def run_test_threads(run_dir: Path, tmp: Path, *, prompts: str | None = None,
                     image_size: tuple[int, int] = (48, 40)) -> dict[str, str]:
    """Two finished threads of the test profile (one narrative with a text step and redraws, one
    guidance with an input image of ``image_size``); returns {thread: request}."""
    runner = CliRunner()
    image = tmp / "input.png"
    Image.new("RGB", image_size, "orange").save(image)
    extra = ["--prompts", prompts] if prompts else []
    env = {"INTERLEAVE_RUN_DIR": str(run_dir)}
    for thread, args in (("story", [STORY]), ("guide", ["--image", str(image), GUIDE])):
        result = runner.invoke(app, ["run", "--profile", "test", "--size", "64x64", "--thread", thread,
                                     *extra, *args], env=env)
        assert result.exit_code == 0, result.stderr
    return {"story": STORY, "guide": GUIDE}
