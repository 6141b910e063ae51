"""Runtime objects of a run (models, generator, stores): passed as graph context, never checkpointed."""

from __future__ import annotations

from dataclasses import dataclass

from langchain_core.language_models import BaseChatModel

from interleave_thinker.checkpoints.image_store import ImageStore
from interleave_thinker.checkpoints.ledger import GenerationLedger
from interleave_thinker.tools.base import ImageGenerator


@dataclass(frozen=True)
class Backends:
    """The three models of a run. Planner and critic may be the same object."""

    planner: BaseChatModel
    critic: BaseChatModel
    generator: ImageGenerator


@dataclass(frozen=True)
class Context:
    """What every node receives through ``Runtime.context``; a resume passes it again."""

    backends: Backends
    image_store: ImageStore
    ledger: GenerationLedger


def model_identity(model: BaseChatModel) -> str:
    """A stable name for a chat model: its type and, when it has one, its model name."""
    name = getattr(model, "model_name", None) or getattr(model, "model", None)
    identity = f"{model._llm_type}:{name}" if isinstance(name, str) and name else model._llm_type
    # The same model name on two servers may be two different models.
    base_url = getattr(model, "openai_api_base", None)
    return f"{identity}@{base_url}" if isinstance(base_url, str) and base_url else identity
