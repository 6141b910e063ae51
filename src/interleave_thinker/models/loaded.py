"""The process-wide cache of loaded transformers chat models: weights, processor, generation lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from interleave_thinker.devices import torch_dtype
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models.constrained import JsonGrammarCompiler
from interleave_thinker.settings import quiet_library

__all__ = ["LoadedModel", "clear_model_cache", "load_model"]


@dataclass
class LoadedModel:
    """Weights, processor and the lock that serialises generation on them."""

    model: Any
    processor: Any
    device: torch.device
    stop_token_ids: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    _grammars: JsonGrammarCompiler | None = None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def grammars(self) -> JsonGrammarCompiler:
        # Built on first structured call only: scanning a 150k vocabulary takes a moment.
        if self._grammars is None:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = JsonGrammarCompiler(
                self.tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
            )
        return self._grammars


# Keyed by (model_name, device, dtype) after "auto" is resolved, so a planner and a critic
# naming the same weights share one copy in memory.
_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every loaded model (their memory is freed once no chat model holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_model(model_name: str, device: str, dtype: str) -> LoadedModel:
    key = (model_name, device, dtype)
    with _CACHE_LOCK:
        # Loading under the lock: two callers asking at once must not load the weights twice.
        if key not in _CACHE:
            from transformers import AutoModelForImageTextToText, AutoProcessor
            from transformers.utils import logging as transformers_logging

            quiet_library(transformers_logging)

            try:
                processor = AutoProcessor.from_pretrained(model_name)
                model = AutoModelForImageTextToText.from_pretrained(
                    model_name, dtype=torch_dtype(dtype), device_map=device
                ).eval()
            except OSError as error:
                # transformers reports missing folders, files and hub access as OSError.
                raise ConfigurationError(
                    f"could not load the chat model {model_name!r}: {error}",
                    hint="pass a local model folder, or a hub id whose weights are already "
                    "in the Hugging Face cache (nothing is downloaded when offline)",
                ) from error
            _CACHE[key] = LoadedModel(
                model=model,
                processor=processor,
                device=model.device,
                stop_token_ids=_stop_token_ids(model, processor.tokenizer),
            )
        return _CACHE[key]


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
