"""The in-process vLLM backend without vLLM: the error when it is missing, the settings and flag
plumbing, the engine cache's keying, the sampling rules, and the engine's loop thread driven by a
fake engine (concurrency, cancellation, retries). The live tests are in test_vllm_engine_live.py.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_tests.unit_tests import ChatModelUnitTests
from PIL import Image
from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.cli.options import RunFlags
from interleave_thinker.context import model_identity
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models import vllm_engine
from interleave_thinker.models.profiles import load_profile
from interleave_thinker.models.vllm_engine import (
    VLLM_INSTALL_HINT,
    EngineSettings,
    SharedEngine,
    VLLMChatModel,
    clear_engine_cache,
    engine_count,
    get_engine,
    require_vllm,
    sampling_overrides,
)
from interleave_thinker.settings import ModelSettings, load_model_settings

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm absent, whatever this environment has."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        vllm_engine.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )


@pytest.fixture
def vllm_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models can be built (nothing starts an engine until a call)."""
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: None)


def _settings(**fields: Any) -> ModelSettings:
    # A named pipeline class: the diffusers generator then looks nothing up.
    return ModelSettings(generator_pipeline="Flux2KleinPipeline", **fields)


@pytest.fixture(autouse=True)
def _no_engines_left() -> Iterator[None]:
    yield
    clear_engine_cache()


# -- without vllm: a clear error ------------------------------------------------------------------


def test_the_main_environment_has_no_vllm() -> None:
    # The premise of this file: vllm lives in its own environment (scripts/setup_vllm_cpu.sh).
    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigurationError) as caught:
        require_vllm()
    assert caught.value.hint == VLLM_INSTALL_HINT


def test_the_vllm_engine_setting_without_vllm_fails_at_profile_load_with_the_install_hint(
    no_vllm: None,
) -> None:
    settings = ModelSettings(engine="vllm", planner="/models/planner", critic="/models/critic")
    with pytest.raises(ConfigurationError, match="needs the vllm package") as caught:
        load_profile("default", settings)
    assert "interleave-thinker[vllm]" in caught.value.hint
    assert "setup_vllm_cpu.sh" in caught.value.hint


def test_the_engine_flag_without_vllm_is_one_line_and_a_hint(
    no_vllm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERLEAVE_CONFIG", raising=False)
    result = CliRunner().invoke(
        app, ["run", "--engine", "vllm", "--run-dir", str(tmp_path / "runs"), "A paper boat."]
    )
    assert result.exit_code == 1
    assert "needs the vllm package" in result.stderr
    assert "hint: pip install 'interleave-thinker[vllm]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_importing_the_module_does_not_import_vllm() -> None:
    import sys

    assert "vllm_engine" in vllm_engine.__name__
    if not HAS_VLLM:
        assert "vllm" not in sys.modules


# -- settings, flag and profile plumbing ---------------------------------------------------------


def test_engine_defaults_to_transformers_and_rejects_other_names() -> None:
    assert ModelSettings().engine == "transformers"
    assert load_model_settings(engine="vllm").engine == "vllm"
    with pytest.raises(ConfigurationError, match="invalid model setting engine"):
        load_model_settings(engine="tensorrt")


def test_engine_comes_from_the_flag_the_environment_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERLEAVE_CONFIG", raising=False)
    assert RunFlags(engine="vllm").model_settings().engine == "vllm"
    config = tmp_path / "settings.toml"
    config.write_text('engine = "vllm"\nvllm_gpu_memory = 0.5\nvllm_max_model_len = 8192\n')
    loaded = RunFlags(config=config).model_settings()
    assert (loaded.engine, loaded.vllm_gpu_memory, loaded.vllm_max_model_len) == ("vllm", 0.5, 8192)
    # The flag wins over the file.
    assert RunFlags(config=config, engine="transformers").model_settings().engine == "transformers"
    monkeypatch.setenv("INTERLEAVE_ENGINE", "vllm")
    assert RunFlags().model_settings().engine == "vllm"


def test_engine_flag_is_offered_by_run_resume_and_batch() -> None:
    for command in ("run", "resume", "batch"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--engine" in result.stdout, command


def test_vllm_gpu_memory_is_a_share() -> None:
    with pytest.raises(ConfigurationError, match="vllm_gpu_memory"):
        load_model_settings(vllm_gpu_memory=1.5)


def test_profile_builds_vllm_models_with_the_settings(vllm_present: None) -> None:
    settings = _settings(
        engine="vllm", planner="/models/planner", critic="/models/critic", dtype="bf16",
        temperature=0.7, top_p=0.9, top_k=20, do_sample=True, max_new_tokens=1024,
        vllm_max_model_len=8192,
    )
    backends = load_profile("default", settings)
    planner, critic = backends.planner, backends.critic
    assert isinstance(planner, VLLMChatModel) and isinstance(critic, VLLMChatModel)
    assert (planner.model_name, critic.model_name) == ("/models/planner", "/models/critic")
    assert (planner.temperature, planner.top_p, planner.top_k, planner.do_sample) == (0.7, 0.9, 20, True)
    assert planner.max_new_tokens == 1024
    assert planner.max_model_len == critic.max_model_len == 8192
    # Two sets of weights: the GPU share is split between their two engines.
    assert planner.gpu_memory_utilization == critic.gpu_memory_utilization == 0.3
    assert planner.engine_settings.dtype == "bfloat16"
    assert model_identity(planner) == "vllm:/models/planner"
    assert engine_count() == 0  # nothing started


def test_profile_gives_one_engine_the_whole_share_when_planner_and_critic_are_the_same(
    vllm_present: None,
) -> None:
    backends = load_profile(
        "default", _settings(engine="vllm", planner="/models/both", critic="/models/both")
    )
    planner, critic = backends.planner, backends.critic
    assert planner.gpu_memory_utilization == critic.gpu_memory_utilization == 0.6
    assert planner.engine_settings == critic.engine_settings
    # Left unset, decoding is the checkpoint's; the reply length the profile's default.
    assert (planner.temperature, planner.top_p, planner.top_k, planner.do_sample) == (None,) * 4
    assert planner.max_new_tokens == 2048


def test_a_served_critic_leaves_the_whole_share_to_the_planner(vllm_present: None) -> None:
    pytest.importorskip("langchain_openai")
    backends = load_profile(
        "default",
        _settings(engine="vllm", planner="/models/planner", critic="c", critic_url="http://h:8000/v1"),
    )
    assert isinstance(backends.planner, VLLMChatModel)
    assert not isinstance(backends.critic, VLLMChatModel)
    assert backends.planner.gpu_memory_utilization == 0.6


def test_transformers_stays_the_default_engine() -> None:
    pytest.importorskip("transformers")
    from interleave_thinker.models.transformers_chat import TransformersChatModel

    backends = load_profile("default", _settings(planner="/models/p", critic="/models/c"))
    assert isinstance(backends.planner, TransformersChatModel)


# -- engine settings and the engine cache ------------------------------------------------------------


def _model(name: str = "/models/qwen", **fields: Any) -> VLLMChatModel:
    return VLLMChatModel(model_name=name, **fields)


def test_per_request_choices_do_not_change_the_engine_key() -> None:
    base = _model()
    same = [
        _model(max_new_tokens=64),
        _model(temperature=0.9, top_p=0.5, top_k=3, do_sample=True, seed=4),
        _model(dtype="AUTO"),
    ]
    assert all(model.engine_settings == base.engine_settings for model in same)
    assert len({model.engine_settings for model in [base, *same]}) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "/models/other"},
        {"dtype": "float16"},
        {"gpu_memory_utilization": 0.3},
        {"max_model_len": 4096},
        {"max_num_seqs": 8},
        {"enforce_eager": True},
        {"kv_cache_memory_bytes": 2**27},
        {"max_images": 2},
        {"engine_kwargs": {"tensor_parallel_size": 2}},
    ],
)
def test_engine_settings_change_the_engine_key(fields: dict[str, Any]) -> None:
    assert _model(**fields).engine_settings != _model().engine_settings


def test_engine_kwargs_key_ignores_their_order() -> None:
    one = _model(engine_kwargs={"a": 1, "b": {"x": 2}})
    two = _model(engine_kwargs={"b": {"x": 2}, "a": 1})
    assert one.engine_settings == two.engine_settings


def test_unknown_dtype_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown dtype"):
        _ = _model(dtype="int3").engine_settings


def test_engine_args_carry_the_settings() -> None:
    args = _model(
        dtype="bf16", gpu_memory_utilization=0.45, max_model_len=8192, enforce_eager=True,
        kv_cache_memory_bytes=2**27, max_images=2, max_num_seqs=4,
        engine_kwargs={"tensor_parallel_size": 2},
    ).engine_settings.engine_args()
    assert args == {
        "model": "/models/qwen",
        "dtype": "bfloat16",
        "generation_config": "auto",
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "disable_log_stats": True,
        "gpu_memory_utilization": 0.45,
        "max_model_len": 8192,
        "max_num_seqs": 4,
        "kv_cache_memory_bytes": 2**27,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 2, "video": 0},
        "tensor_parallel_size": 2,
    }
    # Left unset, vLLM's own defaults apply.
    assert set(_model().engine_settings.engine_args()) == {
        "model", "dtype", "generation_config", "structured_outputs_config", "disable_log_stats"
    }


# -- sampling from the checkpoint's generation config -------------------------------------------------

QWEN_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_greedy_unless_something_asks_for_sampling() -> None:
    assert sampling_overrides({}) == {"temperature": 0.0}
    assert sampling_overrides({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    # transformers' rule: a temperature alone does not turn sampling on.
    assert sampling_overrides({}, temperature=0.6) == {"temperature": 0.0}


def test_the_checkpoint_sampling_settings_apply_when_nothing_is_set() -> None:
    assert sampling_overrides(QWEN_CONFIG) == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05
    }


def test_set_fields_override_the_checkpoint() -> None:
    assert sampling_overrides(QWEN_CONFIG, temperature=1.1, top_k=5) == {
        "temperature": 1.1, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.05
    }
    # Greedy by either switch; the repetition penalty stays, as in transformers.
    assert sampling_overrides(QWEN_CONFIG, temperature=0) == {"temperature": 0.0, "repetition_penalty": 1.05}
    assert sampling_overrides(QWEN_CONFIG, do_sample=False) == {
        "temperature": 0.0, "repetition_penalty": 1.05
    }


def test_sampling_without_a_config_takes_transformers_defaults() -> None:
    assert sampling_overrides({}, do_sample=True) == {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
    assert sampling_overrides({"min_p": 0.05}, do_sample=True)["min_p"] == 0.05


# -- the engine's loop thread, driven by a fake engine ---------------------------------------------------


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


class _FakeAsyncLLM:
    """Stands in for vLLM's AsyncLLM: replies after a delay, counts requests in flight."""

    def __init__(self, *, reply: str = "ok", delay: float = 0.05, finish: list[str] | None = None) -> None:
        self.reply, self.delay = reply, delay
        self.finish = list(finish or [])
        self.in_flight = 0
        self.most_in_flight = 0
        self.prompts: list[Any] = []
        self.params: list[Any] = []
        self.aborted = 0
        self.shut_down = False
        self.loop_threads: set[int] = set()
        self.model_config = type("ModelConfig", (), {"try_get_generation_config": lambda _: {}})()

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[_Output]:
        self.loop_threads.add(threading.get_ident())
        self.prompts.append(prompt)
        self.params.append(params)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.in_flight -= 1
        finish = self.finish.pop(0) if self.finish else "stop"
        yield _Output(prompt_token_ids=[1, 2, 3], outputs=[_Completion(self.reply, [7] * 5, finish)])

    def shutdown(self) -> None:
        self.shut_down = True


class _Template:
    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str:
        assert kwargs == {"tokenize": False, "add_generation_prompt": True}
        return repr(conversation)


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeAsyncLLM]:
    fake = _FakeAsyncLLM()

    class FakeShared(SharedEngine):
        async def _build(self) -> Any:
            return fake

        def _sampling_params(self, request: Any) -> Any:
            return {**request.sampling, "schema": request.schema, "structured": request.structured}

    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_engine, "SharedEngine", FakeShared)
    monkeypatch.setattr(vllm_engine, "_load_template_owner", lambda model, engine: _Template())
    yield fake
    clear_engine_cache()


def _png_block(color: str) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}


MESSAGES = [SystemMessage("judge"), HumanMessage([_png_block("red"), {"type": "text", "text": "ok?"}])]


def test_planner_and_critic_naming_the_same_weights_share_one_engine(fake_engine: _FakeAsyncLLM) -> None:
    planner, critic = _model(max_new_tokens=4096), _model(temperature=0)
    assert planner.engine is critic.engine
    assert engine_count() == 1
    other = _model("/models/other")
    assert other.engine is not planner.engine
    assert engine_count() == 2
    clear_engine_cache()
    assert engine_count() == 0
    assert fake_engine.shut_down


async def test_the_engine_starts_once_for_concurrent_first_calls(
    fake_engine: _FakeAsyncLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = []
    slow_start = vllm_engine.SharedEngine

    class Slow(slow_start):  # type: ignore[misc, valid-type]
        async def _build(self) -> Any:
            builds.append(self.settings)
            await asyncio.sleep(0.3)
            return await super()._build()

    monkeypatch.setattr(vllm_engine, "SharedEngine", Slow)
    model = _model()
    calls = [asyncio.create_task(model.ainvoke(MESSAGES)) for _ in range(6)]
    await asyncio.sleep(0.1)
    # A caller giving up while the engine starts does not stop it for the others.
    calls[0].cancel()
    replies = await asyncio.gather(*calls[1:])
    assert [reply.content for reply in replies] == ["ok"] * 5
    assert len(builds) == 1 and engine_count() == 1
    with pytest.raises(asyncio.CancelledError):
        await calls[0]


def test_a_reply_through_the_engine_thread(fake_engine: _FakeAsyncLLM) -> None:
    model = _model(max_new_tokens=99, seed=3)
    reply = model.invoke(MESSAGES, stop=["</answer>"])
    assert reply.content == "ok"
    assert reply.usage_metadata == {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.response_metadata["model_provider"] == "vllm"
    (prompt,) = fake_engine.prompts
    # The template rendered the conversation with an image placeholder; the image went along.
    assert "'type': 'image'" in prompt["prompt"]
    assert [image.size for image in prompt["multi_modal_data"]["image"]] == [(8, 8)]
    (params,) = fake_engine.params
    assert params == {
        "temperature": 0.0, "max_tokens": 99, "seed": 3, "stop": ["</answer>"],
        "schema": None, "structured": False,
    }
    # Requests run on the engine's own loop thread, not the caller's.
    assert fake_engine.loop_threads and threading.get_ident() not in fake_engine.loop_threads


def test_text_only_messages_send_no_images(fake_engine: _FakeAsyncLLM) -> None:
    _model().invoke([HumanMessage("hello")])
    assert "multi_modal_data" not in fake_engine.prompts[0]


async def test_concurrent_calls_reach_the_engine_together(fake_engine: _FakeAsyncLLM) -> None:
    fake_engine.delay = 0.3
    planner, critic = _model(), _model(max_new_tokens=7)
    started = time.perf_counter()
    replies = await asyncio.gather(*(model.ainvoke(MESSAGES) for model in [planner, critic] * 4))
    elapsed = time.perf_counter() - started
    assert [reply.content for reply in replies] == ["ok"] * 8
    # No lock of ours between them: all eight were in the engine at once.
    assert fake_engine.most_in_flight == 8
    assert elapsed < 8 * 0.3


async def test_cancelling_the_caller_aborts_the_engine_request(fake_engine: _FakeAsyncLLM) -> None:
    fake_engine.delay = 5.0
    model = _model()
    model.engine  # noqa: B018 - started outside the timing below
    task = asyncio.create_task(model.ainvoke(MESSAGES))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if fake_engine.in_flight:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if fake_engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert fake_engine.aborted == 1
    fake_engine.delay = 0.01
    assert (await model.ainvoke(MESSAGES)).content == "ok"


def test_structured_mode_sends_the_schema_and_no_stop(fake_engine: _FakeAsyncLLM) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fake_engine.reply = '{"ok":true}'
    response_format = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
    bound = _model().bind(response_format=response_format)
    assert bound.invoke(MESSAGES, stop=["x"]).content == '{"ok":true}'
    params = fake_engine.params[-1]
    assert params["schema"] == schema and params["structured"] and params["stop"] is None
    _model().bind(response_format={"type": "json_object"}).invoke(MESSAGES)
    assert fake_engine.params[-1]["schema"] is None and fake_engine.params[-1]["structured"]


def test_with_structured_output_returns_the_pydantic_object(fake_engine: _FakeAsyncLLM) -> None:
    pytest.importorskip("transformers")
    from pydantic import BaseModel

    class Verdict(BaseModel):
        ok: bool

    fake_engine.reply = '{"ok":false}'
    assert _model().with_structured_output(Verdict).invoke(MESSAGES) == Verdict(ok=False)


def test_a_cut_off_structured_reply_is_an_incomplete_json_error(fake_engine: _FakeAsyncLLM) -> None:
    pytest.importorskip("xgrammar")
    from interleave_thinker.models.constrained import IncompleteJSONError

    fake_engine.reply, fake_engine.finish = '{"ok":', ["length"]
    with pytest.raises(IncompleteJSONError, match="max_new_tokens=16"):
        _model(max_new_tokens=16).bind(response_format={"type": "json_object"}).invoke(MESSAGES)
    # Unconstrained, a cut-off reply is returned as it is, marked "length".
    fake_engine.finish = ["length"]
    assert _model().invoke(MESSAGES).response_metadata["finish_reason"] == "length"


def test_a_request_vllm_fails_is_retried_then_reported(fake_engine: _FakeAsyncLLM) -> None:
    # A multimodal cache miss finishes with "error" and succeeds when the images are resent.
    fake_engine.finish = ["error", "stop"]
    assert _model().invoke(MESSAGES).content == "ok"
    assert len(fake_engine.prompts) == 2
    fake_engine.finish = ["error"] * 3
    with pytest.raises(RuntimeError, match="failed the request 3 times"):
        _model().invoke(MESSAGES)


def test_unsupported_arguments_are_refused(fake_engine: _FakeAsyncLLM) -> None:
    with pytest.raises(ValueError, match="unsupported generation arguments"):
        _model().invoke(MESSAGES, tools=[])


def test_a_failed_start_is_a_configuration_error_and_nothing_is_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Failing(SharedEngine):
        async def _build(self) -> Any:
            raise ValueError("KV cache too small\nfor max_model_len 262144")

    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_engine, "SharedEngine", Failing)
    with pytest.raises(ConfigurationError, match="did not start: ValueError: for max_model_len") as caught:
        get_engine(EngineSettings(model="/models/x"))
    assert "vllm_max_model_len" in caught.value.hint
    assert engine_count() == 0


def test_a_dead_engine_is_replaced(fake_engine: _FakeAsyncLLM) -> None:
    model = _model()
    first = model.engine
    fake_engine.errored = True  # what AsyncLLM says once its engine process died
    second = model.engine
    assert second is not first and engine_count() == 1


class TestStandardUnit(ChatModelUnitTests):
    """LangChain's standard chat-model checks (construction, params, structured output)."""

    @property
    def chat_model_class(self) -> type[VLLMChatModel]:
        return VLLMChatModel

    @property
    def chat_model_params(self) -> dict:
        # Nothing starts until the first call, so a folder that does not exist is fine here.
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
