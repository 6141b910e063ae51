"""Named sets of backends a run can be started with (``--profile``)."""

from __future__ import annotations

from collections.abc import Callable

from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError

ProfileFactory = Callable[[], Backends]

_PROFILES: dict[str, ProfileFactory] = {}

# Shown wherever a profile's output is presented, so stand-in output is never mistaken for real.
PROFILE_NOTES: dict[str, str] = {}


def register_profile(name: str, factory: ProfileFactory, *, note: str = "") -> None:
    _PROFILES[name] = factory
    if note:
        PROFILE_NOTES[name] = note


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def load_profile(name: str) -> Backends:
    """Build the backends of profile ``name``."""
    factory = _PROFILES.get(name)
    if factory is None:
        raise ConfigurationError(
            f"unknown profile {name!r}; available: {', '.join(profile_names())}",
            hint="this release ships only the 'test' profile (stand-in models, no weights); "
            "real in-process models come with the diffusers/transformers backends",
        )
    return factory()


def _test_backends() -> Backends:
    from interleave_thinker.models.test_models import TestCriticModel, TestPlannerModel
    from interleave_thinker.tools.test_generator import TestImageGenerator

    return Backends(
        planner=TestPlannerModel(), critic=TestCriticModel(), generator=TestImageGenerator()
    )


register_profile(
    "test",
    _test_backends,
    note="test profile: rule-based stand-ins for the planner and critic and a PIL drawing "
    "instead of an image model; the pictures mean nothing",
)
