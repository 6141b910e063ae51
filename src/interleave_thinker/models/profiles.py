"""Named sets of backends a run can be started with (``--profile``)."""

from __future__ import annotations

from collections.abc import Callable

from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError
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


def in_process_backends(settings: ModelSettings) -> Backends:
    """Planner and critic in transformers, generator in diffusers, all in this process."""
    try:
        from interleave_thinker.models.transformers_chat import TransformersChatModel
        from interleave_thinker.tools.diffusers_backend import DiffusersGenerator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing_extra("diffusers,transformers", exc) from exc

    def chat(model_name: str) -> TransformersChatModel:
        return TransformersChatModel(
            model_name=model_name,
            device=settings.device,
            dtype=settings.dtype,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
        )

    return Backends(
        planner=chat(settings.planner),
        critic=chat(settings.critic),
        generator=DiffusersGenerator(
            model=settings.generator,
            pipeline=settings.generator_pipeline,
            dtype=settings.dtype,
            device=settings.device,
            cpu_offload=settings.cpu_offload,
            steps=settings.steps,
            guidance=settings.guidance,
        ),
    )


def _test_backends(_: ModelSettings) -> Backends:
    from interleave_thinker.models.test_models import TestCriticModel, TestPlannerModel
    from interleave_thinker.tools.test_generator import TestImageGenerator

    return Backends(planner=TestPlannerModel(), critic=TestCriticModel(), generator=TestImageGenerator())


def _demo_backends(settings: ModelSettings) -> Backends:
    from interleave_thinker.demo.models import demo_model_settings

    return in_process_backends(demo_model_settings(settings))


register_profile(DEFAULT_PROFILE, in_process_backends)
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
