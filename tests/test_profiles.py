"""Profiles and model settings pick the right backend for each of planner, critic and generator."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from interleave_thinker.context import model_identity, model_label
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.generators.diffusers_backend import DiffusersGenerator
from interleave_thinker.generators.openai_images import OpenAIImagesGenerator
from interleave_thinker.graph import is_transient
from interleave_thinker.models.profiles import backends_from_settings, load_profile
from interleave_thinker.models.transformers_chat import TransformersChatModel
from interleave_thinker.settings import ModelSettings


def test_urls_select_served_backends_and_names_select_local_ones(tmp_path) -> None:
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    settings = ModelSettings(
        planner="planner-8b", planner_url="http://127.0.0.1:9/v1",
        critic="/models/critic", generator=str(folder),
    )
    backends = backends_from_settings(settings)
    assert backends.planner._llm_type == "openai-chat"
    # Known by name and kind; the address is in its label and in the thread's specs.
    assert model_identity(backends.planner) == "openai-chat:planner-8b"
    assert model_label(backends.planner) == "openai-chat:planner-8b@http://127.0.0.1:9/v1"
    assert backends.specs is not None and backends.specs.planner.base_url == "http://127.0.0.1:9/v1"
    assert isinstance(backends.critic, TransformersChatModel)
    assert isinstance(backends.generator, DiffusersGenerator)

    served = backends_from_settings(settings.model_copy(update={
        "generator": "Qwen/Qwen-Image", "generator_url": "http://127.0.0.1:9/v1"}))
    assert isinstance(served.generator, OpenAIImagesGenerator)
    assert served.generator.identity.startswith("openai-images:http://127.0.0.1:9/v1")


def test_unknown_provider_needs_langchain_with_a_clear_hint() -> None:
    settings = ModelSettings(planner="google_genai:gemini-2.5-flash", generator="openai:gpt-image-1")
    with pytest.raises(ConfigurationError, match="langchain"):
        backends_from_settings(settings)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="default, demo, test"):
        load_profile("gpu")


def test_transient_errors_include_the_openai_sdks() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    busy = openai.RateLimitError("slow down", response=httpx.Response(429, request=request),
                                 body=None)
    denied = openai.AuthenticationError("bad key", response=httpx.Response(401, request=request),
                                        body=None)
    assert is_transient(busy) and is_transient(ConnectionResetError())
    assert not is_transient(denied) and not is_transient(ValueError("bad plan"))


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [("auto", "auto", ("cpu", "float32")), ("cpu", "bfloat16", ("cpu", "float32")),
     ("cuda", "auto", ("cuda", "auto")), ("cuda:1", "float16", ("cuda:1", "float16"))],
)
def test_demo_models_run_on_the_cpu_unless_a_device_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str, dtype: str, expected: tuple[str, str]
) -> None:
    from interleave_thinker.demo import models as demo_models

    folders = {name: tmp_path / name for name in ("planner", "critic", "generator")}
    monkeypatch.setattr(demo_models, "ensure_demo_models", lambda: folders)
    chosen = demo_models.demo_model_settings(ModelSettings(device=device, dtype=dtype))
    assert (chosen.device, chosen.dtype) == expected
    assert chosen.generator == str(folders["generator"])
