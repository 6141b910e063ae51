"""Runtime objects of a run (models, generator, stores): passed as graph context, never checkpointed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from langchain_core.language_models import BaseChatModel

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.generators.base import ImageGenerator
from interleave_thinker.prompts.packs import InterleavePack, PromptPack
from interleave_thinker.settings import ModelSettings, redact_url
from interleave_thinker.state import BackendSpecs
from interleave_thinker.storage.image_store import ImageStorage
from interleave_thinker.storage.ledger import GenerationRecords
from interleave_thinker.storage.verdicts import VerdictLedger, VerdictRecords

# Generous enough for a large diffusion model drawing a full batch on one GPU, including the
# first call's loading of the weights from disk; a hung call is still noticed in minutes.
DEFAULT_GENERATOR_TIMEOUT_S = 900.0
# An 8B planner writing 2048 tokens with in-process transformers takes a minute or two.
DEFAULT_MODEL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Backends:
    """The three models of a run. Planner and critic may be the same object."""

    planner: BaseChatModel
    critic: BaseChatModel
    generator: ImageGenerator
    # How they were built, when built from model settings (models.profiles): what the thread
    # records so that a resume builds them again; None for stand-ins and your own objects.
    specs: BackendSpecs | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Timeouts:
    """Seconds one backend call may take before it counts as hung; None waits without limit.

    ``generator`` bounds one batched generator call, ``model`` one planner or critic reply. A
    call past its limit is retried like a transient error. These are operational settings, not
    part of a thread's settings: a resume may change them.
    """

    generator: float | None = DEFAULT_GENERATOR_TIMEOUT_S
    model: float | None = DEFAULT_MODEL_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("generator", "model"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0
            ):
                raise ConfigurationError(
                    f"the {name} timeout must be a positive number of seconds, not {value!r}",
                    hint="use None (Python) for no limit",
                )

    @classmethod
    def chosen(cls, timeouts: Timeouts | None, settings: ModelSettings | None) -> Timeouts:
        """The timeouts given, else those of the model settings, else the defaults."""
        if timeouts is not None:
            return timeouts
        if settings is None:
            return cls()
        return cls(generator=settings.generator_timeout, model=settings.model_timeout)


@dataclass(frozen=True)
class Context:
    """What every node receives through ``Runtime.context``; a resume passes it again.

    ``ledger`` records every image drawn and ``verdicts`` every verdict given, the moment each
    is made, so a node that runs again (retried, or resumed after a crash) pays for neither
    twice. ``verdicts`` defaults to a ``verdicts`` folder beside the generation ledger's.
    """

    backends: Backends
    image_store: ImageStorage
    ledger: GenerationRecords
    timeouts: Timeouts = Timeouts()
    verdicts: VerdictRecords | None = None
    # The wording and message layout the planner and critic get (the thread records its identity).
    prompts: PromptPack = field(default_factory=InterleavePack)
    # The profile the backends were built from (make_context sets it, make_input records it in
    # the thread's settings); None: the caller's own backends.
    profile: str | None = None

    def __post_init__(self) -> None:
        if self.verdicts is None:
            # The run directory's layout: <run_dir>/generations and <run_dir>/verdicts.
            object.__setattr__(self, "verdicts", VerdictLedger(self.ledger.root.parent / "verdicts"))


def model_identity(model: BaseChatModel) -> str:
    """A stable name for a chat model: its type and, when it has one, its model name.

    What a thread stores and a resume compares: a served model is known by its name and kind,
    not by its server's address, so that a thread can move to another address (``localhost``
    for ``127.0.0.1``, a new port, another replica). The address is in the thread's
    ``BackendSpecs`` and in :func:`model_label`.
    """
    name = getattr(model, "model_name", None) or getattr(model, "model", None)
    return f"{model._llm_type}:{name}" if isinstance(name, str) and name else model._llm_type


def model_address(model: BaseChatModel) -> str | None:
    """The server a served chat model talks to, credentials shown as ``***``; None in process."""
    base_url = getattr(model, "openai_api_base", None)
    return redact_url(base_url) if isinstance(base_url, str) and base_url else None


def model_label(model: BaseChatModel) -> str:
    """:func:`model_identity` with the server's address (``openai-chat:NAME@URL``), for messages
    that should say which server failed; never a key."""
    identity = model_identity(model)
    address = model_address(model)
    return f"{identity}@{address}" if address else identity
