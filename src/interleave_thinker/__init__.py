"""Interleaved text-image generation: planner, generator and critic on a resumable LangGraph.

``__all__`` is the public API; the README's "Python API" table lists the same names.
"""

from interleave_thinker.api import make_context, make_input
from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.context import Backends, Context, Timeouts
from interleave_thinker.errors import (
    ConfigurationError,
    DamagedCheckpointError,
    GeneratorError,
    ImageError,
    InterleaveError,
    ModelCallError,
    ModelOutputError,
    ModelTimeoutError,
    ReviewRequired,
    SettingsMismatchError,
    StorageError,
    ThreadBusyError,
    TransientGeneratorError,
    TransientModelError,
    UnknownThreadError,
)
from interleave_thinker.events import (
    BudgetExhausted,
    DocumentReady,
    ImageReady,
    PlanReady,
    ProgressEvent,
    StepCommitted,
    StepStarted,
    ThreadStarted,
    Verdict,
    parse_event,
)
from interleave_thinker.gc import GcReport, acollect_garbage, collect_garbage
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.graph import build_graph, recursion_limit
from interleave_thinker.inspect import (
    ThreadSummary,
    alist_threads,
    aload_document,
    athread_report,
    list_threads,
    load_document,
    thread_report,
)
from interleave_thinker.prompts.packs import PromptPack, resolve_prompt_pack
from interleave_thinker.runner import RunResult, aresume, arun, resume, run
from interleave_thinker.settings import ModelSettings, load_model_settings
from interleave_thinker.state import (
    Attempt,
    Budget,
    Critique,
    Document,
    DocumentStep,
    ImageRef,
    Plan,
    Request,
    RunOptions,
    Step,
    TrajectoryState,
)
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.tools.agent_tool import InterleaveTool, create_interleave_tool
from interleave_thinker.tools.generator_tool import GenerateImageTool
from interleave_thinker.tracing import JsonLinesTracer, langsmith_tracer

__all__ = [
    "Attempt",
    "Backends",
    "Budget",
    "BudgetExhausted",
    "ConfigurationError",
    "Context",
    "Critique",
    "DamagedCheckpointError",
    "Document",
    "DocumentReady",
    "DocumentStep",
    "GcReport",
    "GenerateImageTool",
    "GenerationJob",
    "GeneratorError",
    "ImageError",
    "ImageGenerator",
    "ImageReady",
    "ImageRef",
    "ImageStore",
    "InterleaveError",
    "InterleaveTool",
    "JsonLinesTracer",
    "ModelCallError",
    "ModelOutputError",
    "ModelSettings",
    "ModelTimeoutError",
    "Plan",
    "PlanReady",
    "ProgressEvent",
    "PromptPack",
    "Request",
    "ReviewRequired",
    "RunOptions",
    "RunResult",
    "SettingsMismatchError",
    "Step",
    "StepCommitted",
    "StepStarted",
    "StorageError",
    "ThreadBusyError",
    "ThreadStarted",
    "ThreadSummary",
    "Timeouts",
    "TrajectoryState",
    "TransientGeneratorError",
    "TransientModelError",
    "UnknownThreadError",
    "Verdict",
    "acollect_garbage",
    "alist_threads",
    "aload_document",
    "aresume",
    "arun",
    "athread_report",
    "build_graph",
    "collect_garbage",
    "create_interleave_tool",
    "langsmith_tracer",
    "list_threads",
    "load_document",
    "load_model_settings",
    "make_context",
    "make_input",
    "make_serializer",
    "parse_event",
    "recursion_limit",
    "resolve_prompt_pack",
    "resume",
    "run",
    "thread_report",
]
