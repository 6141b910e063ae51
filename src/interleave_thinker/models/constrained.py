"""JSON-schema constrained decoding for transformers' ``generate``: an xgrammar logits processor."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xgrammar as xgr
from langchain_core.exceptions import OutputParserException
from transformers import LogitsProcessor

__all__ = [
    "GrammarLogitsProcessor",
    "IncompleteJSONError",
    "JsonGrammarCompiler",
    "schema_from_response_format",
]

# Compact JSON: no free whitespace, no spaces after separators. Whitespace is where a weak
# model can stall forever (measured: a random tiny model wrote spaces until max_tokens).
_SEPARATORS = (",", ":")
_CONTROL_BYTES = bytes(range(0x20))


class IncompleteJSONError(OutputParserException):
    """The token budget ran out before the constrained JSON reply was complete."""


def schema_from_response_format(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI-style ``response_format`` asks for; None means any JSON value.

    Accepts ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``,
    ``{"type": "json_object"}`` and, as ChatOpenAI does, a pydantic model class.
    """
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()
    if not isinstance(response_format, Mapping):
        raise ValueError(
            f"response_format must be a dict or a pydantic model class, not {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "json_object":
        return None
    if kind != "json_schema":
        raise ValueError(
            f"response_format type {kind!r} is not supported; use 'json_schema' or 'json_object'"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise ValueError(
            "response_format 'json_schema' needs {'json_schema': {'name': ..., 'schema': {...}}}"
        )
    return dict(spec["schema"])


class JsonGrammarCompiler:
    """Compiles JSON schemas against one tokenizer's vocabulary; compiled grammars are cached."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        # vocab_size is the model's (its output layer is often padded past the tokenizer).
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(info)
        self._control = _control_token_mask(info)

    def compile(self, schema: Mapping[str, Any] | None) -> xgr.CompiledGrammar:
        """The grammar of replies valid under ``schema`` (any JSON value when None)."""
        if schema is None:
            # Not {"type": "object"}: xgrammar 0.2.8's free-form object rejects nested arrays
            # written with compact separators.
            return self._compiler.compile_builtin_json_grammar()
        return self._compiler.compile_json_schema(
            # Key order matters: properties are generated in the order the schema lists them.
            json.dumps(schema),
            any_whitespace=False,
            separators=_SEPARATORS,
            # No keys or items beyond the schema's, as in OpenAI's strict mode.
            strict_mode=True,
        )

    def processor(self, grammar: xgr.CompiledGrammar) -> GrammarLogitsProcessor:
        """A fresh logits processor for one ``generate`` call."""
        return GrammarLogitsProcessor(grammar, control_tokens=self._control)


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next; one instance per ``generate`` call.

    It follows the sequence by position rather than by call count, so it never loses track of
    which generated tokens the matcher has seen.
    """

    def __init__(self, grammar: xgr.CompiledGrammar, *, control_tokens: torch.Tensor) -> None:
        self._matcher = xgr.GrammarMatcher(grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
        self._control = control_tokens
        self._prompt_length: int | None = None
        self._accepted = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError("constrained decoding handles one sequence per generate call")
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        self._accept(input_ids[0, self._prompt_length + self._accepted :].tolist())
        if self._matcher.is_terminated():
            return scores
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        # The bitmask kernel runs on CUDA or the CPU only (mps and others go through the CPU).
        on_cpu = scores.device.type not in ("cuda", "cpu")
        work = scores.to("cpu") if on_cpu else scores
        xgr.apply_token_bitmask_inplace(work, self._bitmask.to(work.device))
        if self._control.device != work.device:
            self._control = self._control.to(work.device)
        _drop_control_tokens(work, self._control)
        return work.to(scores.device) if on_cpu else work

    def finish(self, generated: Sequence[int]) -> bool:
        """Feed the tokens ``generate`` produced after the last call; True if the JSON is complete."""
        self._accept(list(generated[self._accepted :]))
        return self._matcher.is_terminated() or self._matcher.is_completed()

    def _accept(self, tokens: list[int]) -> None:
        for token in tokens:
            if self._matcher.is_terminated():
                # Tokens after the stop token (padding) are not the grammar's business.
                self._accepted += 1
                continue
            if not self._matcher.accept_token(token):
                raise RuntimeError(f"the grammar rejected token {token}, which it had allowed")
            self._accepted += 1


def _control_token_mask(info: xgr.TokenizerInfo) -> torch.Tensor:
    """True for tokens holding a raw control character (U+0000 to U+001F).

    xgrammar 0.2.8 lets strings with a maxLength contain raw control characters (invalid JSON)
    and no escapes at all. With whitespace off, no JSON structure needs a control character,
    so banning them keeps replies strict JSON.
    """
    banned = torch.zeros(info.vocab_size, dtype=torch.bool)
    special = set(info.special_token_ids) | set(info.stop_token_ids)
    for token_id, text in enumerate(info.decoded_vocab):
        if token_id not in special and len(text.translate(None, _CONTROL_BYTES)) != len(text):
            banned[token_id] = True
    return banned


def _drop_control_tokens(scores: torch.Tensor, banned: torch.Tensor) -> None:
    width = min(scores.shape[-1], banned.shape[0])
    filtered = scores[..., :width].masked_fill(banned[:width], float("-inf"))
    # Only when something stays allowed: a grammar that needs a control character (a schema
    # pattern asking for a newline, say) must still be able to finish.
    if torch.isfinite(filtered).any(dim=-1).all():
        scores[..., :width] = filtered
