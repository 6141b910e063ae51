"""Tiny diffusers pipelines with random weights, built from configs and saved to a folder (no download)."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_BUILDERS",
    "build_tiny_flux",
    "build_tiny_flux2_klein",
    "build_tiny_flux_kontext",
    "build_tiny_qwen_image",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "clip_tokenizer",
    "qwen_tokenizer",
    "t5_tokenizer",
]

# Every component is seeded on its own, so a builder gives the same weights whatever ran before it.
SEED = 0

QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen's chat format; FLUX.2-klein renders its prompt through it (enable_thinking is accepted and unused).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, the alphabet of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer (256 byte symbols, no merges), Qwen's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def clip_tokenizer() -> Any:
    """A CLIP tokenizer over bytes: each byte symbol alone or ending a word (``</w>``), and the specials."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    # Pipelines read model_max_length as CLIP's context length.
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over printable ASCII characters (lower-case letters also word-initial)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.printable if not c.isspace()]
    pieces += [("▁" + c, -1.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _seeded(build: Callable[[], Any]) -> Any:
    import torch

    # A forked RNG: the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The shifting of the real FLUX and Qwen-Image schedulers, so `mu` from the pipelines is used as there.
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def _kl_vae(**config: Any) -> Any:
    """A four-level KL autoencoder: 8x downsampling like the real ones, 4 channels wide."""
    from diffusers import AutoencoderKL

    return _seeded(
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            norm_num_groups=2,
            sample_size=64,
            # Mid-block attention over a 1024x1024 source (Kontext resizes to about that) costs seconds.
            mid_block_add_attention=False,
            **config,
        )
    )


def _clip_text(tokenizer: Any, *, projection: bool, hidden: int = 16) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    # Built from a config the encoders start in training mode, where dropout makes them random.
    return _seeded(lambda: model_class(config).eval())


def _t5_encoder(tokenizer: Any, *, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(lambda: T5EncoderModel(config).eval())


def _sharpen_attention(transformer: Any, gain: float = 3.0) -> Any:
    """Raise the QK-norm gains, so attention is sharper than at random init.

    Near-uniform attention averages the reference-image tokens away, and an edit would then hardly
    depend on its source (max 1 level of 255); trained models attend sharply, and so does this.
    """
    import torch

    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.rsplit(".", 1)[-1] in {"norm_q", "norm_k", "norm_added_q", "norm_added_k"}:
                module.weight.mul_(gain)
    return transformer


def _save(pipeline: Any, path: str | Path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder)
    return folder


def build_tiny_flux2_klein(path: str | Path) -> Path:
    """A tiny FLUX.2-klein (step-distilled, like FLUX.2-klein-4B): text-to-image and edits with ``image=``."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    hidden = 16
    # The pipeline stacks hidden states 9, 18 and 27 of the text encoder, so it needs 27 layers.
    text_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    text_encoder = _seeded(lambda: Qwen3ForCausalLM(text_config).eval())
    transformer = _seeded(
        lambda: Flux2Transformer2DModel(
            in_channels=16,  # 4 latent channels, patchified 2x2 by the VAE
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * hidden,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
    )
    _sharpen_attention(transformer)
    vae = _seeded(
        lambda: AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    )
    pipeline = Flux2KleinPipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    return _save(pipeline, path)


def _flux1_components() -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the T5 width
            pooled_projection_dim=16,  # the CLIP width
            guidance_embeds=True,  # as FLUX.1-dev and Kontext-dev
            axes_dims_rope=(4, 4, 8),
        )
    )
    _sharpen_attention(transformer)
    return {
        "scheduler": _flow_scheduler(),
        "vae": _kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": _clip_text(clip, projection=False),
        "tokenizer": clip,
        "text_encoder_2": _t5_encoder(t5, d_model=32),
        "tokenizer_2": t5,
        "transformer": transformer,
    }


def build_tiny_flux(path: str | Path) -> Path:
    """A tiny FLUX.1 (dev-like, guidance-embedded): text-to-image; edits go through FluxImg2ImgPipeline."""
    from diffusers import FluxPipeline

    return _save(FluxPipeline(**_flux1_components()), path)


def build_tiny_flux_kontext(path: str | Path) -> Path:
    """A tiny FLUX.1 Kontext: edits with ``image=``, and text-to-image without one."""
    from diffusers import FluxKontextPipeline

    return _save(FluxKontextPipeline(**_flux1_components()), path)


def build_tiny_qwen_image(path: str | Path) -> Path:
    """A tiny Qwen-Image (text-to-image only; its edits need the separate Qwen-Image-Edit weights)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    hidden = 16
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        # These must name the tokenizer's own tokens, or image positions are computed wrongly.
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    text_encoder = _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config).eval())
    z_dim = 4
    vae = _seeded(
        lambda: AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
    )
    transformer = _seeded(
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * z_dim,
            out_channels=z_dim,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden,
            axes_dims_rope=(8, 4, 4),
        )
    )
    pipeline = QwenImagePipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _save(pipeline, path)


def build_tiny_sdxl(path: str | Path) -> Path:
    """A tiny Stable Diffusion XL: two CLIP encoders and a two-level UNet; edits go through img2img."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    hidden = 16
    unet = _seeded(
        lambda: UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            # six size/crop ids of 8 dims each, plus the pooled projection of the second encoder
            projection_class_embeddings_input_dim=6 * 8 + hidden,
            cross_attention_dim=2 * hidden,
            norm_num_groups=4,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        # No fp32 upcast (as the fp16-fix SDXL VAE): img2img otherwise re-casts it, warning, every call.
        vae=_kl_vae(latent_channels=4, scaling_factor=0.13025, force_upcast=False),
        text_encoder=_clip_text(tokenizer, projection=False, hidden=hidden),
        text_encoder_2=_clip_text(tokenizer_2, projection=True, hidden=hidden),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipeline, path)


def build_tiny_sd3(path: str | Path) -> Path:
    """A tiny Stable Diffusion 3: two CLIP encoders and T5 over an MMDiT; edits go through img2img."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    hidden = 16
    transformer = _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=2 * hidden,  # T5's width; the two CLIP outputs side by side are as wide
            caption_projection_dim=32,
            pooled_projection_dim=2 * hidden,
            pos_embed_max_size=32,  # up to 512x512 pixels
        )
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler_sd3(),
        vae=_kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text(tokenizer, projection=True, hidden=hidden),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer_2, projection=True, hidden=hidden),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, d_model=2 * hidden),
        tokenizer_3=tokenizer_3,
    )
    return _save(pipeline, path)


def _flow_scheduler_sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


# Pipeline class name -> builder, for the demo and the tests.
TINY_BUILDERS: dict[str, Callable[[str | Path], Path]] = {
    "Flux2KleinPipeline": build_tiny_flux2_klein,
    "FluxPipeline": build_tiny_flux,
    "FluxKontextPipeline": build_tiny_flux_kontext,
    "QwenImagePipeline": build_tiny_qwen_image,
    "StableDiffusionXLPipeline": build_tiny_sdxl,
    "StableDiffusion3Pipeline": build_tiny_sd3,
}
