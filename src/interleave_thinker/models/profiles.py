"""Named sets of backends a run can be started with (``--profile``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from interleave_thinker.context import Backends, model_address, model_identity
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.generators.base import ImageGenerator
from interleave_thinker.prompts.packs import PromptPack
from interleave_thinker.settings import (
    DEFAULT_CRITIC,
    DEFAULT_GENERATOR,
    DEFAULT_PLANNER,
    PAPER_CRITIC,
    PAPER_GENERATOR,
    PAPER_PLANNER,
    ModelSettings,
)
from interleave_thinker.state import (
    BackendKind,
    BackendSpec,
    BackendSpecs,
    BuildSettings,
    RunSettings,
)

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


def _chat_kind(name: str, url: str | None, settings: ModelSettings) -> BackendKind:
    """How ``_chat_model`` builds a planner or critic from these settings."""
    if url:
        return "served"
    if _is_provider_string(name):
        return "provider"
    return "vllm" if settings.engine == "vllm" else "transformers"


def _chat_model(name: str, url: str | None, settings: ModelSettings) -> BaseChatModel:
    """A served model when a URL or provider is named, else one loaded in this process."""
    if _chat_kind(name, url, settings) in ("served", "provider"):
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
    if _chat_kind(name, url, settings) == "vllm":
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


def _served_generator(settings: ModelSettings) -> bool:
    return bool(settings.generator_url) or settings.generator.startswith("openai:")


def _generator(settings: ModelSettings) -> ImageGenerator:
    if _served_generator(settings):
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
        specs=specs_from_settings(settings),
    )


# -- what a thread records of its backends, and building them again on resume -------------------


def specs_from_settings(settings: ModelSettings) -> BackendSpecs:
    """How ``backends_from_settings`` builds the backends of ``settings`` (never a key)."""

    def chat(name: str, url: str | None) -> BackendSpec:
        return BackendSpec(kind=_chat_kind(name, url, settings), model=name, base_url=url)

    if _served_generator(settings):
        generator = BackendSpec(
            kind="openai-images",
            model=settings.generator.removeprefix("openai:"),
            base_url=settings.generator_url,
        )
    else:
        generator = BackendSpec(kind="diffusers", model=settings.generator)
    return BackendSpecs(
        planner=chat(settings.planner, settings.planner_url),
        critic=chat(settings.critic, settings.critic_url),
        generator=generator,
        build=BuildSettings.model_validate(
            {name: getattr(settings, name) for name in BuildSettings.model_fields}
        ),
    )


def describe_backends(backends: Backends, *, fallback: BackendKind) -> BackendSpecs:
    """The specs of backends not built from model settings (a profile's stand-ins, your own
    objects): served and in-process models are named by kind, others get ``fallback``."""

    def chat(model: BaseChatModel) -> BackendSpec:
        identity = model_identity(model)
        name = identity.partition(":")[2]
        kind = model._llm_type
        if kind in ("transformers", "vllm") and name:
            return BackendSpec(kind=kind, model=name)
        if kind == "openai-chat" and name:
            address = model_address(model)
            if address:
                return BackendSpec(kind="served", model=name, base_url=address)
            return BackendSpec(kind="provider", model=f"openai:{name}")
        return BackendSpec(kind=fallback, model=identity, base_url=model_address(model))

    generator = backends.generator
    model = getattr(generator, "model", None)
    if generator.identity.startswith("diffusers:") and isinstance(model, str):
        spec = BackendSpec(kind="diffusers", model=model)
    elif generator.identity.startswith("openai-images:") and isinstance(model, str):
        base_url = getattr(generator, "base_url", None)
        spec = BackendSpec(
            kind="openai-images", model=model, base_url=base_url if isinstance(base_url, str) else None
        )
    else:
        spec = BackendSpec(kind=fallback, model=generator.identity)
    return BackendSpecs(planner=chat(backends.planner), critic=chat(backends.critic), generator=spec)


# An address at the end of a chat identity, as threads stored them before BackendSpecs.
_STORED_ADDRESS = re.compile(r"@([A-Za-z][A-Za-z0-9+.-]*://.*)\Z", re.DOTALL)


def recorded_specs(settings: RunSettings) -> BackendSpecs:
    """The thread's specs; for a thread from before they were recorded, what its identities
    tell (``openai-chat:NAME@URL``, ``transformers:NAME``, ``openai-images:URL:NAME``, ...).
    A backend they do not describe is ``custom``: the model settings then decide it."""
    if settings.backends is not None:
        return settings.backends

    def chat(identity: str) -> BackendSpec:
        kind, _, name = identity.partition(":")
        if kind in ("transformers", "vllm") and name:
            return BackendSpec(kind=kind, model=name)
        if kind == "openai-chat" and name:
            address = _STORED_ADDRESS.search(name)
            if address is None:
                return BackendSpec(kind="provider", model=f"openai:{name}")
            return BackendSpec(kind="served", model=name[: address.start()], base_url=address.group(1))
        return BackendSpec(kind="custom", model=identity)

    def generator(identity: str) -> BackendSpec:
        kind, _, rest = identity.partition(":")
        if kind == "diffusers" and " (" in rest:
            return BackendSpec(kind="diffusers", model=rest.rpartition(" (")[0])
        if kind == "openai-images" and " (" not in rest:
            if rest.startswith("api.openai.com:"):
                return BackendSpec(kind="openai-images", model=rest.removeprefix("api.openai.com:"))
            url, _, name = rest.rpartition(":")
            if "://" in url and name:
                return BackendSpec(kind="openai-images", model=name, base_url=url)
        return BackendSpec(kind="custom", model=identity)

    return BackendSpecs(
        planner=chat(settings.planner), critic=chat(settings.critic), generator=generator(settings.generator)
    )


def settings_for_specs(specs: BackendSpecs, settings: ModelSettings | None = None) -> ModelSettings:
    """Model settings that build the backends ``specs`` describe, for a resume.

    The fields of ``settings`` that were set (its ``model_fields_set``: the flags given on
    resume) replace what the specs say: ``critic_url`` alone moves the critic to another
    address. The other fields of ``settings`` (its defaults, the environment's) fill what the
    specs do not hold: timeouts, memory shares, backends the specs cannot name (``custom``).
    """
    base = settings if settings is not None else ModelSettings()
    given = set(base.model_fields_set) if settings is not None else set()
    stored: dict[str, object] = {}
    for role, spec in (("planner", specs.planner), ("critic", specs.critic)):
        if spec.kind in ("served", "provider", "transformers", "vllm"):
            stored[role] = spec.model
            stored[f"{role}_url"] = spec.base_url if spec.kind == "served" else None
    kinds = {specs.planner.kind, specs.critic.kind}
    if "vllm" in kinds or "transformers" in kinds:
        stored["engine"] = "vllm" if "vllm" in kinds else "transformers"
    generator = specs.generator
    if generator.kind == "diffusers":
        stored["generator"], stored["generator_url"] = generator.model, None
    elif generator.kind == "openai-images":
        stored["generator"] = generator.model if generator.base_url else f"openai:{generator.model}"
        stored["generator_url"] = generator.base_url
    if specs.build is not None:
        stored.update(specs.build.model_dump())
    values = base.model_dump()
    values.update({name: value for name, value in stored.items() if name not in given})
    for role in ("planner", "critic", "generator"):
        url = values[f"{role}_url"]
        if f"{role}_url" not in given and isinstance(url, str) and "***" in url:
            raise ConfigurationError(
                f"the {role}'s server address held credentials, which threads never store: {url}",
                hint=f"give the address again with --{role}-url URL (ModelSettings({role}_url=...))",
            )
    return ModelSettings.model_construct(_fields_set=given, **values)


# Model settings a profile with models of its own would ignore: (field, flag).
_MODEL_CHOICES = (
    ("planner", "--planner"),
    ("critic", "--critic"),
    ("generator", "--generator"),
    ("planner_url", "--planner-url"),
    ("critic_url", "--critic-url"),
    ("generator_url", "--generator-url"),
    ("generator_pipeline", "generator_pipeline"),
    ("engine", "--engine"),
)
# What each of those is unless someone chose it (the paper's models when --paper is on).
_UNCHOSEN: dict[str, tuple[object, ...]] = {
    "planner": (DEFAULT_PLANNER, PAPER_PLANNER),
    "critic": (DEFAULT_CRITIC, PAPER_CRITIC),
    "generator": (DEFAULT_GENERATOR, PAPER_GENERATOR),
    "engine": ("transformers",),
}


def refuse_model_choices(profile: str, settings: ModelSettings, *, honoured: tuple[str, ...] = ()) -> None:
    """ConfigurationError when ``settings`` choose models (or servers) that ``profile``, which
    brings its own, would silently ignore; ``honoured`` names the fields it does use."""
    # Only fields that were set count: on resume those are the flags given, so that a model
    # chosen in the environment (for other threads) does not stop a test or demo thread.
    chosen = [
        flag
        for name, flag in _MODEL_CHOICES
        if name not in honoured
        and name in settings.model_fields_set
        and getattr(settings, name) not in _UNCHOSEN.get(name, (None,))
    ]
    if chosen:
        variables = ", ".join(f"INTERLEAVE_{name.upper()}" for name, flag in _MODEL_CHOICES if flag in chosen)
        raise ConfigurationError(
            f"the {profile} profile brings its own models, so {', '.join(chosen)} would be ignored",
            # Worded for run and resume alike: a resumed thread keeps its profile.
            hint=f"drop {', '.join(chosen)} (check {variables} and the --config file too); to use "
            f"the models you named instead, start a new thread without --profile {profile}",
        )


def _test_backends(settings: ModelSettings) -> Backends:
    from interleave_thinker.generators.stand_in import StandInImageGenerator
    from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel

    refuse_model_choices("test", settings)
    return Backends(
        planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=StandInImageGenerator()
    )


def _demo_backends(settings: ModelSettings) -> Backends:
    from interleave_thinker.demo.models import demo_model_settings

    # The demo swaps in its tiny models; the engine (and device, dtype) are its user's choice.
    refuse_model_choices("demo", settings, honoured=("engine",))
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
    return Backends(planner=planner, critic=critic, generator=backends.generator, specs=backends.specs)
