"""Tiny Qwen3-VL chat models built in code, offline: one with random weights, one replaying a reply."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "build_scripted_vlm", "build_tiny_qwen3_vl"]

# Qwen's special tokens, in Qwen's order. The first three double as unk/pad, bos-less start
# of a turn and end of a turn; the vision ones must match the ids in the model config.
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_END_OF_TEXT, _END_OF_TURN = "<|endoftext|>", "<|im_end|>"
# What every prompt ends with once the generation prompt is added.
_GENERATION_PROMPT = "<|im_start|>assistant\n"

# ChatML as the Qwen-VL templates write it: images become a vision block where they stand;
# text parts are joined without separators. Handles string or list content in every role.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Text side: head_dim 32 because vLLM's CPU attention needs at least that. Vision side: the
# real Qwen3-VL patch geometry (16 px patches, 2x2 merge), shrunk everywhere else.
_HIDDEN = 64
_PATCH = 16
_MERGE = 2
# Images are resized to between 32x32 and 64x64 pixels: 1 to 4 vision tokens each.
_MIN_PIXELS = (_PATCH * _MERGE) ** 2
_MAX_PIXELS = (2 * _PATCH * _MERGE) ** 2


def _tokenizer(extra_tokens: list[str] | None = None) -> Any:
    """A byte-level Qwen2 tokenizer: 256 byte symbols, no merges, Qwen's special tokens."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=_END_OF_TEXT,
        eos_token=_END_OF_TURN,
        pad_token=_END_OF_TEXT,
        extra_special_tokens=[t for t in _SPECIAL_TOKENS if t not in (_END_OF_TEXT, _END_OF_TURN)],
        chat_template=CHAT_TEMPLATE,
    )
    if extra_tokens:
        # normalized=False keeps spaces literal: the byte-level pre-tokenizer never sees them.
        tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in extra_tokens])
    return tokenizer


def _processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geometry = {"patch_size": _PATCH, "temporal_patch_size": 2, "merge_size": _MERGE}
    image_processor = Qwen2VLImageProcessor(
        **geometry, size={"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
    )
    video_processor = Qwen3VLVideoProcessor(
        **geometry, size={"shortest_edge": _MIN_PIXELS, "longest_edge": 2 * _MAX_PIXELS}
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _config(tokenizer: Any) -> Any:
    from transformers import Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    head_dim = 32
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _HIDDEN,
            "intermediate_size": 2 * _HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": _HIDDEN // head_dim,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 8192,
            # mrope sections split head_dim / 2 rotary frequencies between time, height, width.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids[_END_OF_TURN],
            "pad_token_id": ids[_END_OF_TEXT],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "patch_size": _PATCH,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": _HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _build(tokenizer: Any, *, seed: int) -> tuple[Any, Any]:
    """A random-weight model for ``tokenizer`` and its processor (not yet saved)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    config = _config(tokenizer)
    # Forking leaves the caller's global torch RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).eval()
    stop_ids = [tokenizer.convert_tokens_to_ids(_END_OF_TURN), tokenizer.convert_tokens_to_ids(_END_OF_TEXT)]
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = stop_ids[1]
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model, _processor(tokenizer)


def _save(path: Path, model: Any, processor: Any) -> Path:
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # bfloat16 on disk like the released checkpoints, and half the size; loaders pick the dtype.
    model.to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen3_vl(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random-weight Qwen3-VL (about 0.2 M parameters, ~450 KB) with its processor."""
    tokenizer = _tokenizer()
    model, processor = _build(tokenizer, seed=seed)
    return _save(Path(path), model, processor)


def build_scripted_vlm(path: str | Path, reply: str) -> Path:
    """Save a tiny Qwen3-VL whose greedy reply to any chat prompt is exactly ``reply``.

    Every decoder layer is a pass-through (attention output and MLP down projections are
    zero), so the last hidden state is the embedding of the previous token, and the output
    head reads it as a lookup table: any token -> piece 1 -> piece 2 -> ... -> ``<|im_end|>``.
    The pieces of ``reply`` are added to the vocabulary as distinct tokens, which is what
    lets a lookup keyed on one token replay text with repetitions in it.
    """
    import torch

    pieces = _pieces(reply, max_pieces=_HIDDEN - 1)
    tokenizer = _tokenizer(pieces)
    model, processor = _build(tokenizer, seed=0)
    piece_ids = tokenizer.convert_tokens_to_ids(pieces)
    if tokenizer.encode(_GENERATION_PROMPT, add_special_tokens=False)[-1] in piece_ids:
        # Then every prompt would end inside the reply and the lookup would start it mid-way.
        raise ValueError(f"the scripted reply {reply!r} is too close to the end of every prompt")
    outputs = [*piece_ids, tokenizer.convert_tokens_to_ids(_END_OF_TURN)]
    # Output k is coded by the one-hot direction k of the hidden space: exactly orthogonal,
    # so the right logit wins by a wide, dtype-proof margin.
    codes = torch.eye(_HIDDEN)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.language_model.norm.weight.fill_(1.0)
        embeddings = model.model.language_model.embed_tokens.weight
        # Any token not in the reply (the prompt's last one, whatever it is) starts the reply.
        embeddings.copy_(codes[0].expand_as(embeddings))
        for position, token_id in enumerate(piece_ids):
            embeddings[token_id] = codes[position + 1]
        head = model.lm_head.weight
        head.zero_()
        for position, token_id in enumerate(outputs):
            head[token_id] = 10.0 * codes[position]
    return _save(Path(path), model, processor)


def _pieces(reply: str, *, max_pieces: int) -> list[str]:
    """Split ``reply`` into at most ``max_pieces`` distinct pieces, safe to add as tokens."""
    if not reply:
        raise ValueError("the scripted reply must not be empty")
    for token in _SPECIAL_TOKENS:
        if token in reply:
            raise ValueError(f"the scripted reply must not contain the special token {token!r}")
    size = max(8, math.ceil(len(reply) / max_pieces))
    pieces: list[str] = []
    seen: set[str] = set()
    start = 0
    while start < len(reply):
        end = min(start + size, len(reply))
        # A repeated piece would give the lookup two successors for one token; a piece found
        # inside the generation prompt could be matched there and start the reply mid-way.
        while end < len(reply) and not _usable(reply[start:end], seen):
            end += 1
        piece = reply[start:end]
        if not _usable(piece, seen):
            # The tail is a repeat: glue it to the pieces before it until the result is new.
            while pieces and not _usable(piece, seen):
                previous = pieces.pop()
                seen.discard(previous)
                piece = previous + piece
        pieces.append(piece)
        seen.add(piece)
        start = end
    return pieces


def _usable(piece: str, seen: set[str]) -> bool:
    return bool(piece) and piece not in seen and piece not in _GENERATION_PROMPT
