"""Named sets of backends a run can be started with (``--profile``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.generators.base import ImageGenerator
from interleave_thinker.prompts.packs import PromptPack
from interleave_thinker.settings import ModelSettings

ProfileFactory = Callable[[ModelSettings], Backends]

DEFAULT_PROFILE = "default"
# Reply length of in-process planner and critic when neither the user nor the prompt pack sets it.
DEFAULT_MAX_NEW_TOKENS = 2048

_PROFILES: dict[str, ProfileFactory] = {}

# Shown wherever a profile's output is presented, so stand-in output is never mistaken for real.
PROFILE_NOTES: dict[str, str] = {}


def register_profile(name: str, factory: ProfileFactory, *, note: str = "") -> None:
    _PROFILES[name] = factory
    if note:
        PROFILE_NOTES[name] = note


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def load_profile(name: str, settings: ModelSettings | None = None) -> Backends:
    """Build the backends of profile ``name`` with the given model settings."""
    factory = _PROFILES.get(name)
    if factory is None:
        raise ConfigurationError(
            f"unknown profile {name!r}; available: {', '.join(profile_names())}",
            hint="'default' runs the real models, 'demo' tiny offline ones, 'test' stand-ins",
        )
    return factory(settings or ModelSettings())


def _missing_extra(extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"the in-process backends need packages that are not installed ({exc.name})",
        hint=f"pip install 'interleave-thinker[{extra}]' (install torch first)",
    )


# "provider:model" strings that init_chat_model understands, e.g. openai:gpt-5.
_PROVIDER_MODEL = re.compile(r"^[a-z][a-z0-9_-]*:[^/\\]")


def _is_provider_string(name: str) -> bool:
    return bool(_PROVIDER_MODEL.match(name)) and not Path(name).exists()


def _chat_model(name: str, url: str | None, settings: ModelSettings) -> BaseChatModel:
    """A served model when a URL or provider is named, else one loaded in this process."""
    if url or _is_provider_string(name):
        try:
            from interleave_thinker.models.served import served_chat_model
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing_extra("openai", exc) from exc
        # Only what the user set is sent: the server applies the model's own defaults.
        return served_chat_model(
            name,
            base_url=url,
            timeout=settings.request_timeout,
            temperature=0.0 if settings.do_sample is False else settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            max_tokens=settings.max_new_tokens,
        )
    if settings.engine == "vllm":
        return _vllm_chat_model(name, settings)
    try:
        from interleave_thinker.models.transformers_chat import TransformersChatModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing_extra("transformers", exc) from exc
    return TransformersChatModel(
        model_name=name,
        device=settings.device,
        dtype=settings.dtype,
        max_new_tokens=settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        do_sample=settings.do_sample,
    )


def _vllm_chat_model(name: str, settings: ModelSettings) -> BaseChatModel:
    """The planner or critic on an in-process vLLM engine; one engine when both name the same
    weights, else the GPU share ``vllm_gpu_memory`` is split between the two."""
    from interleave_thinker.models.vllm_engine import VLLMChatModel, require_vllm

    require_vllm()
    in_process = {
        model
        for model, url in ((settings.planner, settings.planner_url), (settings.critic, settings.critic_url))
        if not url and not _is_provider_string(model)
    }
    return VLLMChatModel(
        model_name=name,
        dtype=settings.dtype,
        max_new_tokens=settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        do_sample=settings.do_sample,
        gpu_memory_utilization=round(settings.vllm_gpu_memory / max(1, len(in_process)), 4),
        max_model_len=settings.vllm_max_model_len,
    )


def _generator(settings: ModelSettings) -> ImageGenerator:
    if settings.generator_url or settings.generator.startswith("openai:"):
        try:
            from interleave_thinker.generators.openai_images import OpenAIImagesGenerator
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing_extra("openai", exc) from exc
        return OpenAIImagesGenerator(
            model=settings.generator.removeprefix("openai:"),
            base_url=settings.generator_url,
            timeout=settings.request_timeout,
        )
    try:
        from interleave_thinker.generators.diffusers_backend import DiffusersGenerator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing_extra("diffusers", exc) from exc
    return DiffusersGenerator(
        model=settings.generator,
        pipeline=settings.generator_pipeline,
        dtype=settings.dtype,
        device=settings.device,
        cpu_offload=settings.cpu_offload,
        steps=settings.steps,
        guidance=settings.guidance,
    )


def backends_from_settings(settings: ModelSettings) -> Backends:
    """Each of planner, critic and generator in this process, or served when a URL is set."""
    return Backends(
        planner=_chat_model(settings.planner, settings.planner_url, settings),
        critic=_chat_model(settings.critic, settings.critic_url, settings),
        generator=_generator(settings),
    )


def _test_backends(_: ModelSettings) -> Backends:
    from interleave_thinker.generators.stand_in import StandInImageGenerator
    from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel

    return Backends(
        planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=StandInImageGenerator()
    )


def _demo_backends(settings: ModelSettings) -> Backends:
    from interleave_thinker.demo.models import demo_model_settings

    return backends_from_settings(demo_model_settings(settings))


register_profile(DEFAULT_PROFILE, backends_from_settings)
register_profile(
    "test",
    _test_backends,
    note="test profile: rule-based stand-ins for the planner and critic and a PIL drawing "
    "instead of an image model; the pictures mean nothing",
)
register_profile(
    "demo",
    _demo_backends,
    note="demo profile: tiny FLUX.2-klein and Qwen3-VL models with random or scripted weights, "
    "built offline; the real code paths ran, but the pictures are noise and the planner and "
    "critic print fixed replies",
)


def with_prompt_pack(backends: Backends, pack: PromptPack, *, fit_length: bool) -> Backends:
    """``backends`` fitted to a prompt pack: stand-ins read its layout and, with ``fit_length``
    (models built from settings that leave max_new_tokens unset), in-process models get the
    pack's reply length."""
    def fitted(model: BaseChatModel) -> BaseChatModel:
        update: dict[str, object] = {}
        if "prompts" in type(model).model_fields:
            update["prompts"] = pack
        if fit_length and "max_new_tokens" in type(model).model_fields and (
            getattr(model, "max_new_tokens", None) == DEFAULT_MAX_NEW_TOKENS
        ):
            update["max_new_tokens"] = pack.default_max_new_tokens
        return model.model_copy(update=update) if update else model

    planner = fitted(backends.planner)
    # One model object for both roles stays one object.
    critic = planner if backends.critic is backends.planner else fitted(backends.critic)
    return Backends(planner=planner, critic=critic, generator=backends.generator)
