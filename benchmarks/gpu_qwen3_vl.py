"""Qwen3-VL-8B-Instruct's shapes, and a model folder of them with no weights and no download.

The folder holds config.json, generation_config.json, a tokenizer and a processor: vLLM builds
random weights from it itself (``load_format="dummy"``), and ``build_transformers_model`` builds
them on a device for the transformers baseline. The tokenizer is built here (a byte-level BPE
learned from the project's own prompts, padded to the config's 151,936 ids with Qwen's special
tokens at Qwen's ids), so any id a random model emits decodes. Used by ``gpu_vllm_engine``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# -- Qwen3-VL-8B-Instruct's shapes ------------------------------------------------------------------

# config.json of Qwen/Qwen3-VL-8B-Instruct, the values that decide the arithmetic: the text model
# (Qwen3, 36 layers of hidden 4096, 32 query and 8 key-value heads of 128, MLP 12288, vocabulary
# 151936, untied head, interleaved mRoPE [24, 20, 20], rope_theta 5e6) and the vision tower
# (27 blocks of hidden 1152, 16 heads, MLP 4304, 16 px patches, 2x2 merge to 4096, DeepStack
# from blocks 8, 16, 24). The same values appear in several independent ports (Megatron's Qwen3-VL
# provider, mlx-vlm's 8B config, the Cosmos3 reasoner extraction tests) and give 8.77 B
# parameters, the count published for the model.
QWEN3_VL_8B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_8B_VISION: dict[str, Any] = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 4096,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
# preprocessor_config.json of the same model: 16 px patches merged 2x2, images scaled to between
# 65,536 and 16,777,216 pixels (a 1024x1024 image stays as it is: 4096 patches, 1024 tokens).
QWEN3_VL_PIXELS = (65536, 16777216)
# Parameters of the two configs above (meta-device init, transformers 5.24).
EXPECTED_PARAMETERS_8B = 8_767_123_696

# Tiny shapes for --tiny-cpu: the vision geometry of the real model, everything else shrunk (head
# dim 32: vLLM's CPU attention needs at least that). The vocabulary stays full size.
TINY_TEXT: dict[str, Any] = {
    **QWEN3_VL_8B_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                        "mrope_interleaved": True},
}
TINY_VISION: dict[str, Any] = {
    **QWEN3_VL_8B_VISION,
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 1,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0],
}
TINY_PIXELS = (32 * 32, 64 * 64)

# Qwen's special tokens at Qwen's ids (151643 on), in Qwen's order; the vision ones are the ids
# in Qwen3-VL's config.
QWEN_SPECIAL_TOKENS = (
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
FIRST_SPECIAL_ID = 151643
# Merges learned from the project's prompts: common words become one token each, as with Qwen's
# 151k-token BPE (the prompts come out a little shorter than with Qwen's own tokenizer).
LEARNED_VOCAB = 8192


# -- the model folder: config, tokenizer, processor; no weights -----------------------------------------


def _prompt_corpus() -> list[str]:
    """Text to learn merges from: the project's planner and critic prompts and requests like ours."""
    from interleave_thinker.prompts import templates

    texts = [value for value in vars(templates).values() if isinstance(value, str) and len(value) > 200]
    texts += [
        f"A paper kite number {n} rises over the dunes. The wind turns it into a loop. "
        f"step: step {n}\ninstruction: the kite in a storm\n<planned_prompt>a red kite over a "
        f"beach, picture {n}</planned_prompt>\n<used_prompt>a red kite over a beach at dusk"
        "</used_prompt>"
        for n in range(64)
    ]
    return texts


def build_tokenizer(vocab_size: int = QWEN3_VL_8B_TEXT["vocab_size"]) -> Any:
    """A Qwen2 tokenizer with ``vocab_size`` ids: byte-level BPE learned from our prompts, filler
    tokens up to Qwen's special tokens (at ids 151643..151656) and after them to the end."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    from interleave_thinker.demo.tiny_vlm import CHAT_TEMPLATE

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=LEARNED_VOCAB, initial_alphabet=ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator(_prompt_corpus(), trainer)
    model = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = {token: FIRST_SPECIAL_ID + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    if vocab_size < FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS) or len(vocab) > FIRST_SPECIAL_ID:
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold Qwen's special token ids")
    # Fillers: reachable by no merge (never produced by encoding), decodable like any token.
    for index in range(len(vocab), vocab_size):
        vocab.setdefault(next(t for t, i in specials.items() if i == index) if index in specials.values()
                         else f"<fill{index}>", index)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != vocab_size or tokenizer.convert_tokens_to_ids("<|image_pad|>") != 151655:
        raise RuntimeError("the built tokenizer does not have Qwen's layout")
    return tokenizer


def build_processor(tokenizer: Any, pixels: tuple[int, int]) -> Any:
    """Qwen3-VL's processor with Qwen3-VL's patch geometry, scaling images into ``pixels``."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from interleave_thinker.demo.tiny_vlm import CHAT_TEMPLATE

    geometry = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    normalise = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    low, high = pixels
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            **geometry, **normalise, size={"shortest_edge": low, "longest_edge": high}
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(
            **geometry, **normalise, size={"shortest_edge": low, "longest_edge": 2 * high}
        ),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """The Qwen3VLConfig of these shapes, with Qwen's token ids."""
    from transformers import Qwen3VLConfig

    ids = {token: FIRST_SPECIAL_ID + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    return Qwen3VLConfig(
        text_config={
            **text,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=dict(vision),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def write_model_folder(folder: Path, *, tiny: bool) -> Path:
    """config.json, generation_config.json, tokenizer and processor; no weights (vLLM: dummy)."""
    from transformers import GenerationConfig

    text, vision, pixels = (TINY_TEXT, TINY_VISION, TINY_PIXELS) if tiny else (
        QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION, QWEN3_VL_PIXELS)
    folder.mkdir(parents=True, exist_ok=True)
    config = build_config(text, vision)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    stops = [FIRST_SPECIAL_ID + 2, FIRST_SPECIAL_ID]  # <|im_end|>, <|endoftext|>
    # Greedy: the sampled numbers would be the same, and greedy needs no sampler kernels.
    generation = GenerationConfig(eos_token_id=stops, pad_token_id=FIRST_SPECIAL_ID, do_sample=False)
    generation.save_pretrained(folder)
    build_processor(build_tokenizer(text["vocab_size"]), pixels).save_pretrained(folder)
    return folder


def parameter_count(*, tiny: bool = False) -> int:
    """Parameters of the model these shapes describe, counted on the meta device."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(build_config(text, vision))
    return sum(parameter.numel() for parameter in model.parameters())


def build_transformers_model(folder: Path, device: str, dtype_name: str) -> Any:
    """The model of ``folder``'s config with random weights, built on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    # Random weights at the default init scale overflow nothing in bfloat16 over 256 tokens, but a
    # smaller scale keeps the logits tame (NaN-free) whatever the init does.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(0.5)
    return model.eval()
