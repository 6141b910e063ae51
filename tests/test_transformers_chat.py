"""The in-process transformers chat model on tiny Qwen3-VL models built offline (random and scripted)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xgrammar as xgr
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.unit_tests import ChatModelUnitTests
from PIL import Image

from interleave_thinker.demo.tiny_vlm import build_scripted_vlm, build_tiny_qwen3_vl
from interleave_thinker.models.constrained import IncompleteJSONError
from interleave_thinker.models.transformers_chat import TransformersChatModel
from interleave_thinker.prompts.parsing import OutputParseError, parse_plan, parse_verdict
from interleave_thinker.prompts.schemas import PlanAnswer, VerdictAnswer
from interleave_thinker.prompts.templates import critic_messages, planner_messages
from interleave_thinker.state import ImageRef, Request

# What the released checkpoints print: reasoning, then a Python-literal dict in answer tags.
# The repeated keys exercise the scripted model's distinct-piece vocabulary.
PLANNER_REPLY = (
    "<think>Two steps: draw the cat, then add the hat.</think>\n"
    "<answer>{'execution_plan': ["
    "{'step_number': 2, 'step_name': 'Cat', 'instruction': 'A cat sits.', "
    "'prompt': 'a grey cat sitting on a rug', 'auxiliary_text': None}, "
    "{'step_number': 3, 'step_name': 'Hat', 'instruction': 'The cat wears a hat.', "
    "'prompt': 'give the cat a red hat', 'auxiliary_text': None}]}</answer>"
)
CRITIC_REPLY = (
    "<think>The hat is there and nothing broke.</think>\n"
    '<answer>{"previous_step_success": false, "refine_prompt": "make the hat \\"bigger\\"", '
    '"score": 6}</answer>'
)


def _png_block(color: str, size: tuple[int, int] = (48, 40)) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return {
        "type": "image",
        "base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "mime_type": "image/png",
    }


def _messages(images: int) -> list:
    blocks = [_png_block(color) for color in ("red", "blue")[:images]]
    return [
        SystemMessage("You plan pictures."),
        HumanMessage([*blocks, {"type": "text", "text": "a cat in a hat"}]),
    ]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("vlm") / "random", seed=0)


@pytest.fixture(scope="session")
def planner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_vlm(tmp_path_factory.mktemp("vlm") / "planner", PLANNER_REPLY)


@pytest.fixture(scope="session")
def critic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_vlm(tmp_path_factory.mktemp("vlm") / "critic", CRITIC_REPLY)


def _chat(path: Path, **settings: object) -> TransformersChatModel:
    return TransformersChatModel(model_name=str(path), device="cpu", **settings)


def test_tiny_model_folder_is_small_and_consistent(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["text_config"]["head_dim"] >= 32
    size = sum(path.stat().st_size for path in tiny_dir.iterdir())
    assert size < 1_000_000
    tokenizer = json.loads((tiny_dir / "tokenizer.json").read_text())
    ids = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]


def test_random_model_answers_from_images_and_text(tiny_dir: Path) -> None:
    model = _chat(tiny_dir, max_new_tokens=12)
    one, two = (model.invoke(_messages(count)) for count in (1, 2))
    for reply in (one, two):
        assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
        usage = reply.usage_metadata
        assert usage is not None and 1 <= usage["output_tokens"] <= 12
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        assert reply.response_metadata["finish_reason"] in ("stop", "length")
    # The second image adds its vision tokens to the prompt.
    assert two.usage_metadata["input_tokens"] > one.usage_metadata["input_tokens"]


def test_scripted_planner_and_critic_replay_their_replies(planner_dir: Path, critic_dir: Path) -> None:
    ref = ImageRef(sha256="a" * 64, media_type="image/png", width=48, height=40)
    request = Request(text="Put a hat on the cat.", images=(ref,))
    planner = _chat(planner_dir, max_new_tokens=256)
    reply = planner.invoke(planner_messages(request, [_png_block("red")], max_steps=4))
    assert reply.content == PLANNER_REPLY
    assert reply.response_metadata["finish_reason"] == "stop"
    plan = parse_plan(reply.content, input_images=1, max_steps=4)
    assert [step.name for step in plan.steps] == ["Cat", "Hat"]

    critic = _chat(critic_dir, max_new_tokens=256)
    verdict_messages = critic_messages(
        step_name="Hat",
        instruction="The cat wears a hat.",
        planned_prompt="give the cat a red hat",
        used_prompt="give the cat a red hat",
        previous_image=_png_block("white"),
        candidate_image=_png_block("red"),
    )
    verdict = critic.invoke(verdict_messages)
    assert verdict.content == CRITIC_REPLY
    critique = parse_verdict(verdict.content)
    assert critique.success is False and critique.refine_prompt == 'make the hat "bigger"'


def test_structured_output_on_random_model_is_schema_valid(tiny_dir: Path) -> None:
    # Greedy decoding on random weights, fixed seed and prompt: the bounds (maxLength,
    # maxItems) keep the grammar finite but not short; this prompt completes in < 1000 tokens.
    model = _chat(tiny_dir, max_new_tokens=3000)
    messages = _messages(1)
    verdict = model.with_structured_output(VerdictAnswer).invoke(messages)
    assert isinstance(verdict, VerdictAnswer)
    result = model.with_structured_output(PlanAnswer, include_raw=True).invoke(messages)
    plan = result["parsed"]
    assert isinstance(plan, PlanAnswer) and result["parsing_error"] is None
    # The raw text is strict JSON (no raw control characters) that validates on its own.
    assert PlanAnswer.model_validate(json.loads(result["raw"].content)) == plan


def test_random_model_without_grammar_is_not_json(tiny_dir: Path) -> None:
    reply = _chat(tiny_dir, max_new_tokens=200).invoke(_messages(1)).content
    with pytest.raises(ValueError):
        json.loads(reply)
    with pytest.raises(OutputParseError):
        parse_plan(reply, input_images=1, max_steps=5)


def test_dict_schema_and_response_format_binding(tiny_dir: Path) -> None:
    schema = {
        "title": "Flag",
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 8}},
        "required": ["ok", "note"],
        "additionalProperties": False,
    }
    model = _chat(tiny_dir, max_new_tokens=200)
    parsed = model.with_structured_output(schema).invoke(_messages(1))
    assert isinstance(parsed, dict) and set(parsed) == {"ok", "note"} and len(parsed["note"]) <= 8
    bound = model.bind(
        response_format={"type": "json_schema", "json_schema": {"name": "Flag", "schema": schema}}
    )
    text = bound.invoke(_messages(1)).content
    assert set(json.loads(text)) == {"ok", "note"}


def test_grammar_honours_length_and_item_bounds(tiny_dir: Path) -> None:
    grammars = _chat(tiny_dir).loaded.grammars()
    grammar = grammars.compile(PlanAnswer.model_json_schema())

    def accepts(plan: dict) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return matcher.accept_string(json.dumps(plan, separators=(",", ":"))) and matcher.is_completed()

    step = {"step_number": 1, "step_name": "s", "instruction": "x"}
    assert accepts({"execution_plan": [step]})
    assert accepts({"execution_plan": [{**step, "instruction": "x" * 600}]})
    assert not accepts({"execution_plan": [{**step, "instruction": "x" * 601}]})
    assert accepts({"execution_plan": [step] * 100})
    assert not accepts({"execution_plan": [step] * 101})
    assert not accepts({"execution_plan": []})
    assert not accepts({"execution_plan": [{**step, "step_number": 1001}]})


def test_cut_off_json_raises_a_clear_error(tiny_dir: Path) -> None:
    model = _chat(tiny_dir, max_new_tokens=8)
    with pytest.raises(IncompleteJSONError, match="max_new_tokens=8"):
        model.with_structured_output(PlanAnswer).invoke(_messages(1))


def test_planner_and_critic_share_one_loaded_model(planner_dir: Path) -> None:
    planner = TransformersChatModel(model_name=str(planner_dir), device="auto")
    critic = TransformersChatModel(model_name=str(planner_dir), device="cpu", temperature=0.5)
    assert planner.loaded is critic.loaded
    assert planner.loaded.model is critic.loaded.model
    other = TransformersChatModel(model_name=str(planner_dir), device="cpu", dtype="bfloat16")
    assert other.loaded.model is not planner.loaded.model


async def test_ainvoke_leaves_the_event_loop_free(planner_dir: Path) -> None:
    model = _chat(planner_dir, max_new_tokens=256)
    model.loaded  # load outside the timed part  # noqa: B018
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    replies = await asyncio.gather(*(model.ainvoke(_messages(1)) for _ in range(2)))
    done.set()
    await ticking
    assert [reply.content for reply in replies] == [PLANNER_REPLY, PLANNER_REPLY]
    assert ticks >= 10


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image", "url": "https://example.com/cat.png"},
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
    ],
)
def test_http_image_urls_are_refused(planner_dir: Path, block: dict) -> None:
    with pytest.raises(ValueError, match="never fetches"):
        _chat(planner_dir).invoke([HumanMessage([block, {"type": "text", "text": "hi"}])])


def test_data_url_images_are_accepted(planner_dir: Path) -> None:
    data = _png_block("green")["base64"]
    block = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    reply = _chat(planner_dir, max_new_tokens=256).invoke([HumanMessage([block, "plan"])])
    assert reply.content == PLANNER_REPLY


_RELOAD_SCRIPT = """
import sys
from pathlib import Path
from transformers import AutoModelForImageTextToText, AutoProcessor
from langchain_core.messages import HumanMessage
from interleave_thinker.models.transformers_chat import TransformersChatModel

source, copy = Path(sys.argv[1]), Path(sys.argv[2])
AutoProcessor.from_pretrained(source).save_pretrained(copy)
AutoModelForImageTextToText.from_pretrained(source).save_pretrained(copy)
reply = TransformersChatModel(model_name=str(copy), device="cpu", max_new_tokens=256).invoke(
    [HumanMessage("anything at all")]
)
sys.stdout.write(reply.content)
"""


def test_save_and_reload_offline(planner_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(planner_dir), str(tmp_path / "copy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == PLANNER_REPLY


class TestStandardUnit(ChatModelUnitTests):
    """LangChain's standard chat-model checks (construction, params, structured output)."""

    @property
    def chat_model_class(self) -> type[TransformersChatModel]:
        return TransformersChatModel

    @property
    def chat_model_params(self) -> dict:
        # Nothing loads until the first call, so a folder that does not exist is fine here.
        return {"model_name": "/nonexistent/tiny-vlm", "temperature": 0.0}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def test_stop_strings_cut_the_reply(planner_dir: Path) -> None:
    reply = _chat(planner_dir, max_new_tokens=256).invoke(_messages(1), stop=["</think>"])
    assert reply.content == PLANNER_REPLY.split("</think>")[0]
    assert reply.response_metadata["finish_reason"] == "stop"
    # Generation stopped at the stop string rather than running on to the end of the reply.
    full = _chat(planner_dir, max_new_tokens=256).invoke(_messages(1))
    assert reply.usage_metadata["output_tokens"] < full.usage_metadata["output_tokens"]
