"""Run in the vLLM environment by test_vllm_engine_live.py: the in-process vLLM engine backend on
a scripted tiny Qwen3-VL, as the planner and the critic, one engine for both.

Usage: ``$INTERLEAVE_VLLM_PYTHON tests/vllm_engine_entry.py MODEL_DIR SCRATCH OUT_JSON``. It
writes what it observed to OUT_JSON; the test process makes the assertions. One process, one
engine start (about 30 s on 2 cores) for every check.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from PIL import Image

from interleave_thinker.context import Backends, model_identity
from interleave_thinker.generators.stand_in import StandInImageGenerator
from interleave_thinker.models.messages import image_data_block
from interleave_thinker.models.profiles import load_profile
from interleave_thinker.models.vllm_engine import VLLMChatModel, clear_engine_cache, engine_count
from interleave_thinker.nodes.asking import for_output_mode
from interleave_thinker.prompts.parsing import parse_plan, parse_verdict
from interleave_thinker.prompts.schemas import VerdictAnswer
from interleave_thinker.prompts.templates import critic_messages, planner_messages
from interleave_thinker.runner import arun
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import Request, RunOptions
from interleave_thinker.storage.image_store import ImageStore

MAX_STEPS = 6
# What the CPU needs beyond the profile's settings: no compilation, a fixed KV cache.
CPU_ENGINE: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 128 * 2**20,
    "max_images": 2,
    "max_num_seqs": 8,
    "max_new_tokens": 256,
}


def _png(color: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _without_images(messages: list[BaseMessage]) -> list[BaseMessage]:
    system, human = messages
    return [system, HumanMessage([part for part in human.content if part.get("type") != "image"])]


def _models(model_dir: str) -> tuple[VLLMChatModel, VLLMChatModel, dict[str, Any]]:
    """Planner and critic as the default profile builds them for `--engine vllm`."""
    settings = ModelSettings(
        engine="vllm", planner=model_dir, critic=model_dir, vllm_max_model_len=4096,
        # A served generator: nothing to load (diffusers is not in this environment).
        generator="openai:gpt-image-1", generator_url="http://127.0.0.1:9/v1",
    )
    backends = load_profile("default", settings)
    planner = backends.planner.model_copy(update=CPU_ENGINE)
    critic = backends.critic.model_copy(update=CPU_ENGINE)
    seen = {
        "types": [type(backends.planner).__name__, type(backends.critic).__name__],
        "gpu_share": backends.planner.gpu_memory_utilization,
        "max_model_len": backends.planner.max_model_len,
        "identity": model_identity(planner),
    }
    return planner, critic, seen


def main(model_dir: str, scratch: Path, out: Path) -> None:
    seen: dict[str, Any] = {}
    planner, critic, seen["profile"] = _models(model_dir)
    store = ImageStore(scratch / "images")

    # (1) a planner reply with the user's image, through the sync interface (starts the engine)
    ref = store.put(_png("skyblue"), what="input image")
    request = Request(text="Continue: the boat sails into the rain.", images=(ref,))
    messages = planner_messages(request, [image_data_block(store, ref)], max_steps=MAX_STEPS)
    started = time.perf_counter()
    reply = planner.invoke(messages)
    seen["first_call_s"] = time.perf_counter() - started
    plan = parse_plan(reply.text, input_images=1, max_steps=MAX_STEPS)
    seen["planner"] = {
        "text": reply.text,
        "steps": [step.name for step in plan.steps],
        "sources": [list(step.sources) for step in plan.steps],
        "finish_reason": reply.response_metadata["finish_reason"],
    }

    async def critic_checks() -> dict[str, Any]:
        judged = critic_messages(
            step_name="Boat",
            instruction="A paper boat on a pond.",
            planned_prompt="a paper boat on a still pond",
            used_prompt="a paper boat on a still pond",
            previous_image=image_data_block(store, store.put(_png("white"))),
            candidate_image=image_data_block(store, store.put(_png("navy"))),
        )
        # ... and a critic reply with two images, through the async interface
        with_images = await critic.ainvoke(judged)
        text_only = await critic.ainvoke(_without_images(judged))
        verdict = parse_verdict(with_images.text)
        # (2) structured mode as the critic node binds it, and with_structured_output
        bound, structured_messages = for_output_mode(critic, judged, "structured", VerdictAnswer, "verdict")
        structured = await bound.ainvoke(structured_messages)
        answer = await critic.with_structured_output(VerdictAnswer).ainvoke(judged)
        # Eight critic calls at once: all answered, by the one engine.
        together = await asyncio.gather(*(critic.ainvoke(judged) for _ in range(8)))
        return {
            "text": with_images.text,
            "success": verdict.success,
            "refine_prompt": verdict.refine_prompt,
            "image_tokens": with_images.usage_metadata["input_tokens"]
            - text_only.usage_metadata["input_tokens"],
            "structured": structured.text,
            "structured_object": answer.model_dump(),
            "concurrent_same": all(r.text == with_images.text for r in together),
        }

    seen["critic"] = asyncio.run(critic_checks())
    # (3) one engine for both roles
    seen["engines"] = engine_count()
    seen["same_engine"] = planner.engine is critic.engine

    # A whole trajectory through the graph on the engine (a stand-in draws the pictures).
    result = asyncio.run(
        arun(
            "A paper boat on a pond, then rain.",
            backends=Backends(planner=planner, critic=critic, generator=StandInImageGenerator()),
            options=RunOptions(width=64, height=64),
            run_dir=scratch / "runs",
            checkpointer="memory://",
        )
    )
    seen["trajectory"] = {
        "steps": [step.name for step in result.document.steps],
        "statuses": [step.status for step in result.document.steps],
        "document": result.document_path.is_file(),
    }
    clear_engine_cache()
    seen["engines_after_clear"] = engine_count()
    out.write_text(json.dumps(seen, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
