"""A LangChain chat model running a vision-language model in this process with transformers."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any, Literal

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field
from transformers import StoppingCriteria, StoppingCriteriaList

from interleave_thinker.devices import resolve_device, resolve_dtype
from interleave_thinker.models.chat_inputs import to_conversation
from interleave_thinker.models.constrained import IncompleteJSONError, schema_from_response_format
from interleave_thinker.models.loaded import LoadedModel, clear_model_cache, load_model

__all__ = ["TransformersChatModel", "clear_model_cache"]


class _Cancelled(StoppingCriteria):
    """Stops generation early once the awaiting coroutine has been cancelled."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
        return torch.full(
            (input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class TransformersChatModel(BaseChatModel):
    """A transformers image-text-to-text model (Qwen-VL and kin) as a LangChain chat model.

    Weights load lazily on the first call and are shared by every instance naming the same
    ``(model_name, device, dtype)``. Structured output uses JSON-schema constrained decoding
    (xgrammar), so the reply always parses: ``with_structured_output(Schema)``, or
    ``bind(response_format={"type": "json_schema", "json_schema": {...}})`` for JSON text.
    """

    model_name: str
    """A local model folder or a hub id (hub ids need the weights in the local cache offline)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), or a torch device such as 'cuda:1' or 'cpu'."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float16' or 'float32' (see ``devices``)."""
    max_new_tokens: int = Field(default=2048, ge=1)
    # Decoding knobs left None keep the checkpoint's generation_config.json, as it shipped.
    temperature: float | None = Field(default=None, ge=0.0)
    """0 decodes greedily; above 0 samples; None keeps the checkpoint's setting."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool | None = None
    """False decodes greedily, True samples; None keeps the checkpoint's setting."""
    seed: int | None = None
    """Seeds sampling, so that a sampled reply can be reproduced on the same hardware."""

    @property
    def _llm_type(self) -> str:
        return "transformers"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "device": self.device,
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
            ls_provider="transformers",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=self.temperature,
            ls_max_tokens=self.max_new_tokens,
        )
        if stop:
            params["ls_stop"] = stop
        return params

    @property
    def loaded(self) -> LoadedModel:
        """The shared loaded model (loads it on first use)."""
        device = resolve_device(self.device)
        return load_model(self.model_name, device, resolve_dtype(self.dtype, device))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._run(messages, stop, threading.Event(), **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        cancelled = threading.Event()
        try:
            # Loading and generating both block; a worker thread keeps the event loop free.
            return await asyncio.to_thread(self._run, messages, stop, cancelled, **kwargs)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _run(
        self,
        messages: Sequence[BaseMessage],
        stop: list[str] | None,
        cancelled: threading.Event,
        *,
        response_format: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        if kwargs:
            raise ValueError(f"unsupported generation arguments: {sorted(kwargs)}")
        conversation, images = to_conversation(messages)
        loaded = self.loaded
        prompt = loaded.processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        # The template already wrote any BOS; the tokenizer must not add a second one.
        inputs = loaded.processor(
            text=[prompt], images=images or None, return_tensors="pt", add_special_tokens=False
        ).to(loaded.device)
        prompt_length = inputs["input_ids"].shape[1]

        schema = schema_from_response_format(response_format) if response_format else None
        if response_format:
            # The grammar decides where a JSON reply ends; a stop string could only cut it.
            stop = None
        config = self._generation_config(loaded)
        extra: dict[str, Any] = {}
        if stop:
            # Stop strings are matched on token text, hence the tokenizer.
            config.stop_strings = list(stop)
            extra["tokenizer"] = loaded.tokenizer

        with loaded.lock, _seeded(self.seed, loaded.device):
            grammar = None
            if response_format:
                grammars = loaded.grammars()
                grammar = grammars.processor(grammars.compile(schema))
            output = loaded.model.generate(
                **inputs,
                generation_config=config,
                logits_processor=[grammar] if grammar else None,
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                **extra,
            )
        new_tokens = output[0, prompt_length:].tolist()
        text = loaded.tokenizer.decode(new_tokens, skip_special_tokens=True)
        stopped = bool(new_tokens) and new_tokens[-1] in loaded.stop_token_ids
        if grammar is not None and not grammar.finish(new_tokens):
            raise IncompleteJSONError(
                f"the JSON reply was cut off after {len(new_tokens)} tokens "
                f"(max_new_tokens={self.max_new_tokens}) before the schema was complete; "
                "raise max_new_tokens or tighten the schema's maxLength / maxItems bounds",
                llm_output=text,
            )
        if stop:
            text, stopped = _cut_at_stop(text, stop, stopped)

        usage = UsageMetadata(
            input_tokens=prompt_length,
            output_tokens=len(new_tokens),
            total_tokens=prompt_length + len(new_tokens),
        )
        message = AIMessage(
            content=text,
            usage_metadata=usage,
            response_metadata={
                "model_name": self.model_name,
                "model_provider": "transformers",
                "finish_reason": "stop" if stopped else "length",
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generation_config(self, loaded: LoadedModel) -> Any:
        # Start from the checkpoint's own settings (repetition penalty, top_k) and override
        # what this model exposes.
        config = copy.deepcopy(loaded.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.eos_token_id = loaded.stop_token_ids
        if config.pad_token_id is None:
            pad = loaded.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else next(iter(loaded.stop_token_ids), None)
        # Only what was set overrides the checkpoint's own choices.
        for name in ("temperature", "top_p", "top_k", "do_sample"):
            value = getattr(self, name)
            if value is not None:
                setattr(config, name, value)
        if self.temperature == 0 or self.do_sample is False or not config.do_sample:
            # Greedy: sampling knobs left set would only produce warnings.
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        return config

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

        ``schema`` is a pydantic model class, a JSON-schema dict (or an OpenAI function / a
        TypedDict). There are no tools here, so ``function_calling`` uses the same schema
        grammar as ``json_schema``; ``json_mode`` only guarantees some JSON object. ``strict``
        is accepted for compatibility: the grammar is always strict.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method {method!r} is not supported; use 'json_schema'")
        json_schema, pydantic_model = _json_schema_of(schema)
        response_format: dict[str, Any] = (
            {"type": "json_object"}
            if method == "json_mode"
            else {
                "type": "json_schema",
                "json_schema": {
                    "name": json_schema.get("title", "response"),
                    "schema": json_schema,
                    "strict": True,
                },
            }
        )
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = RunnableLambda(_json_parser(pydantic_model))
        if include_raw:
            parsed = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
            )
            fallback = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
        return llm | parser


def _json_schema_of(schema: dict[str, Any] | type) -> tuple[dict[str, Any], type[BaseModel] | None]:
    """The JSON schema to decode under, and the pydantic class to validate into (if any)."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        # pydantic's own schema keeps every bound (maxLength, maxItems, minimum) the grammar needs.
        return schema.model_json_schema(), schema
    if isinstance(schema, Mapping) and not ("parameters" in schema or schema.get("type") == "function"):
        return dict(schema), None
    return convert_to_json_schema(schema), None


def _json_parser(model: type[BaseModel] | None) -> Callable[[AIMessage], Any]:
    def parse(message: AIMessage) -> Any:
        text = message.text
        try:
            data = json.loads(text)
            return model.model_validate(data) if model is not None else data
        except ValueError as error:  # json and pydantic errors are both ValueErrors
            raise OutputParserException(
                f"the structured reply did not parse: {error}", llm_output=text
            ) from error

    return parse


def _cut_at_stop(text: str, stop: Sequence[str], stopped: bool) -> tuple[str, bool]:
    """Text before the first stop string (generate stops after it, but keeps it)."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    if not found:
        return text, stopped
    return text[: min(found)], True


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for one generate call, then restore it for everyone else."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
