"""Named sets of backends a run can be started with (``--profile``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.generators.base import ImageGenerator
from interleave_thinker.settings import ModelSettings

ProfileFactory = Callable[[ModelSettings], Backends]

DEFAULT_PROFILE = "default"

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
        return served_chat_model(
            name,
            base_url=url,
            timeout=settings.request_timeout,
            temperature=settings.temperature,
            max_tokens=settings.max_new_tokens,
        )
    try:
        from interleave_thinker.models.transformers_chat import TransformersChatModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing_extra("transformers", exc) from exc
    return TransformersChatModel(
        model_name=name,
        device=settings.device,
        dtype=settings.dtype,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
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
