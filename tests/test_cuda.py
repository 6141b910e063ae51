"""The in-process backends on a CUDA GPU, on the tiny offline models: dtype, batching, offload, decoding.

Every test skips without a GPU, so CI (CPU only) reports them as skipped. On a GPU machine:
``pytest -m cuda tests/test_cuda.py``. ``TEST_CUDA_DEVICE`` picks the device (default ``cuda``;
``cuda:1`` for another card, ``cpu`` to dry-run the same checks on the CPU, offload excepted).
The tests are synchronous and drive coroutines with ``asyncio.run``, so they need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402

from interleave_thinker.demo.models import (  # noqa: E402
    DEMO_PLANNER_REPLY,
    DEMO_REQUEST,
    ensure_demo_models,
)
from interleave_thinker.demo.tiny_vlm import build_scripted_vlm, build_tiny_qwen3_vl  # noqa: E402
from interleave_thinker.generators.base import GenerationJob  # noqa: E402
from interleave_thinker.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from interleave_thinker.models.profiles import load_profile  # noqa: E402
from interleave_thinker.models.transformers_chat import TransformersChatModel  # noqa: E402
from interleave_thinker.runner import arun  # noqa: E402
from interleave_thinker.settings import load_model_settings  # noqa: E402
from interleave_thinker.state import RunOptions  # noqa: E402
from test_diffusers_backend import spy_calls  # noqa: E402

DEVICE = os.environ.get("TEST_CUDA_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
# What dtype="auto" must resolve to on DEVICE.
AUTO_DTYPE = "bfloat16" if ON_CUDA else "float32"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch.cuda.is_available() is False "
        "(run `pytest -m cuda tests/test_cuda.py` on a GPU machine)",
    ),
]

WIDTH, HEIGHT = 96, 64
# A scripted reply that is also the only compact JSON the grammar of Tag allows for it.
TAG_REPLY = '{"name":"boat","mood":"calm","done":true}'


class Tag(BaseModel):
    """A small bounded schema: every reply under its grammar is a few dozen tokens at most."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=8)
    mood: Literal["calm", "stormy"]
    done: bool


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The demo profile's tiny models, and a scripted JSON model and a random one, built once."""
    root = tmp_path_factory.mktemp("cuda-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERLEAVE_DEMO_DIR", str(root / "demo"))
        folders = dict(ensure_demo_models())
    folders["json"] = build_scripted_vlm(root / "json", TAG_REPLY)
    folders["random"] = build_tiny_qwen3_vl(root / "random", seed=0)
    yield folders


@pytest.fixture(scope="module")
def klein(models: dict[str, Path]) -> DiffusersGenerator:
    return DiffusersGenerator(model=models["generator"], device=DEVICE, dtype="auto", steps=2)


def job(seed: int, prompt: str = "a paper boat on a pond") -> GenerationJob:
    return GenerationJob(prompt=prompt, seed=seed, width=WIDTH, height=HEIGHT)


def pixels(image: Image.Image | bytes) -> Any:
    assert isinstance(image, Image.Image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image | bytes, b: Image.Image | bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def device_type(module: Any) -> str:
    return next(module.parameters()).device.type


# -- diffusers ----------------------------------------------------------------------------------------


def test_klein_auto_dtype_batches_seeded_jobs_on_the_device(
    klein: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert klein.dtype == AUTO_DTYPE
    assert f"dtype={AUTO_DTYPE}" in klein.identity and f"device={DEVICE.split(':')[0]}" in klein.identity
    pipe = klein.load()
    assert pipe.transformer.dtype == getattr(torch, AUTO_DTYPE)
    assert device_type(pipe.transformer) == device_type(pipe.text_encoder) == torch.device(DEVICE).type

    calls = spy_calls(monkeypatch, pipe)
    first, other, again = asyncio.run(klein.agenerate([job(1), job(2), job(1)]))
    # Three independent jobs of one size: one pipeline call, one seeded generator per image.
    assert len(calls) == 1 and len(calls[0]["generator"]) == 3
    assert all(g.device.type == torch.device(DEVICE).type for g in calls[0]["generator"])
    assert [image.size for image in (first, other, again)] == [(WIDTH, HEIGHT)] * 3
    # Real pictures, not the black or flat frames NaNs in half precision would give.
    assert all(int(np.ptp(pixels(image))) > 0 for image in (first, other, again))
    assert max_diff(first, again) <= 1, "the same seed in one batch must give the same image"
    assert max_diff(first, other) > 10, "different seeds must give different images"

    repeated = asyncio.run(klein.agenerate([job(1), job(2), job(1)]))
    assert [max_diff(a, b) for a, b in zip((first, other, again), repeated, strict=True)] == [0, 0, 0]


@pytest.mark.skipif(not ON_CUDA, reason="cpu_offload needs a GPU (the generator refuses it on the CPU)")
def test_klein_with_model_cpu_offload(models: dict[str, Path], klein: DiffusersGenerator) -> None:
    offloaded = DiffusersGenerator(
        model=models["generator"], device=DEVICE, dtype="auto", steps=2, cpu_offload=True
    )
    assert offloaded.cpu_offload and offloaded.dtype == "bfloat16"
    [image] = asyncio.run(offloaded.agenerate([job(3)]))
    assert image.size == (WIDTH, HEIGHT) and int(np.ptp(pixels(image))) > 0
    pipe = offloaded.load()
    # Model offload parks every model on the CPU between calls (accelerate hooks move them in).
    assert device_type(pipe.transformer) == "cpu"
    [resident] = asyncio.run(klein.agenerate([job(3)]))
    # The same arithmetic on the same GPU, wherever the weights wait between calls.
    assert max_diff(image, resident) <= 2


# -- transformers chat model ------------------------------------------------------------------------


def _messages() -> list:
    return [
        SystemMessage("You describe pictures."),
        HumanMessage(
            [
                {"type": "image", "base64": _png_base64("teal"), "mime_type": "image/png"},
                {"type": "text", "text": "Describe the boat."},
            ]
        ),
    ]


def _png_base64(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _chat(folder: Path, **settings: Any) -> TransformersChatModel:
    return TransformersChatModel(model_name=str(folder), device=DEVICE, dtype="auto", **settings)


def test_scripted_vlm_replays_its_reply_on_the_device(models: dict[str, Path]) -> None:
    planner = _chat(models["planner"], max_new_tokens=512)
    reply = planner.invoke(_messages())
    assert reply.content == DEMO_PLANNER_REPLY
    assert reply.response_metadata["finish_reason"] == "stop"
    loaded = planner.loaded
    assert loaded.device.type == torch.device(DEVICE).type
    assert loaded.model.dtype == getattr(torch, AUTO_DTYPE)


def test_constrained_decoding_on_the_device_is_schema_valid(models: dict[str, Path]) -> None:
    # The scripted model's reply is the one spelling the grammar allows: it passes unchanged.
    scripted = _chat(models["json"], max_new_tokens=128)
    assert scripted.with_structured_output(Tag).invoke(_messages()) == Tag(
        name="boat", mood="calm", done=True
    )

    # Random weights under the grammar (the bitmask applied to logits on the device): still valid.
    random_model = _chat(models["random"], max_new_tokens=128)
    tag = random_model.with_structured_output(Tag).invoke(_messages())
    assert isinstance(tag, Tag) and len(tag.name) <= 8 and tag.mood in ("calm", "stormy")
    schema = Tag.model_json_schema()
    raw = random_model.bind(
        response_format={"type": "json_schema", "json_schema": {"name": "Tag", "schema": schema}}
    ).invoke(_messages())
    assert Tag.model_validate(json.loads(raw.content))
    assert raw.response_metadata["finish_reason"] == "stop"


# -- a whole trajectory -----------------------------------------------------------------------------


def test_whole_run_on_the_demo_models_on_the_device(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The device comes from INTERLEAVE_DEVICE, as for `interleave run`; the demo profile itself
    # always runs on the CPU, so the default profile gets the demo models' folders instead.
    monkeypatch.setenv("INTERLEAVE_DEVICE", DEVICE)
    settings = load_model_settings(
        planner=str(models["planner"]),
        critic=str(models["critic"]),
        generator=str(models["generator"]),
        steps=2,
        max_new_tokens=512,
    )
    assert settings.device == DEVICE and settings.dtype == "auto"
    backends = load_profile("default", settings)
    result = asyncio.run(
        arun(
            DEMO_REQUEST,
            backends=backends,
            profile="default",
            options=RunOptions(width=64, height=64),
            run_dir=tmp_path / "runs",
        )
    )
    steps = result.document.steps
    assert [step.name for step in steps] == ["The boat", "Rain", "The frog"]
    assert all(step.status == "accepted" and step.image is not None for step in steps)
    assert all((step.image.width, step.image.height) == (64, 64) for step in steps)
    assert len({step.image.sha256 for step in steps}) == 3
    assert result.document_path.is_file()
    generator = backends.generator
    assert isinstance(generator, DiffusersGenerator) and generator.dtype == AUTO_DTYPE
    assert device_type(generator.load().transformer) == torch.device(DEVICE).type
    assert backends.planner.loaded.device.type == torch.device(DEVICE).type
