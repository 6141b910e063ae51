"""Interleaved text-image generation: planner, generator and critic on a resumable LangGraph."""

from interleave_thinker.context import Backends, Context, Timeouts
from interleave_thinker.errors import (
    ConfigurationError,
    GeneratorError,
    ImageError,
    InterleaveError,
    ModelCallError,
    ModelOutputError,
    ModelTimeoutError,
    SettingsMismatchError,
    TransientGeneratorError,
    TransientModelError,
    UnknownThreadError,
)
from interleave_thinker.gc import GcReport, acollect_garbage, collect_garbage
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.graph import build_graph
from interleave_thinker.inspect import alist_threads, aload_document, athread_report, load_document
from interleave_thinker.runner import RunResult, aresume, arun, resume, run
from interleave_thinker.settings import ModelSettings, load_model_settings
from interleave_thinker.state import (
    Budget,
    Critique,
    Document,
    ImageRef,
    Plan,
    Request,
    RunOptions,
    Step,
)

__all__ = [
    "Backends",
    "Budget",
    "ConfigurationError",
    "Context",
    "Critique",
    "Document",
    "GcReport",
    "GenerationJob",
    "GeneratorError",
    "ImageError",
    "ImageGenerator",
    "ImageRef",
    "InterleaveError",
    "ModelCallError",
    "ModelOutputError",
    "ModelSettings",
    "ModelTimeoutError",
    "Plan",
    "Request",
    "RunOptions",
    "RunResult",
    "SettingsMismatchError",
    "Step",
    "Timeouts",
    "TransientGeneratorError",
    "TransientModelError",
    "UnknownThreadError",
    "acollect_garbage",
    "alist_threads",
    "aload_document",
    "aresume",
    "arun",
    "athread_report",
    "build_graph",
    "collect_garbage",
    "load_document",
    "load_model_settings",
    "resume",
    "run",
]
