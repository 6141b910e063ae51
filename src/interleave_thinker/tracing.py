"""Tracing: an offline JSON-lines run tree, and LangSmith with image payloads stripped."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
# Longer base64 strings than this inside an image block are payload, not a reference.
_SHORT = 128


def strip_image_bytes(value: Any) -> Any:
    """``value`` with every inline image payload (base64 blocks, data URLs) replaced by a note.

    Our own messages carry only references; this guards traces against payloads that other
    code (a parent agent, a user's callback) may put in.
    """
    if isinstance(value, dict):
        stripped = {key: strip_image_bytes(item) for key, item in value.items()}
        data = value.get("base64") or value.get("data")
        if value.get("type") in ("image", "image_url") and isinstance(data, str):
            key = "base64" if "base64" in value else "data"
            stripped[key] = f"<{len(data)} base64 characters omitted>"
        return stripped
    if isinstance(value, list | tuple):
        return type(value)(strip_image_bytes(item) for item in value)
    if isinstance(value, str) and _DATA_URL.match(value) and len(value) > _SHORT:
        return f"{value[: value.index(',') + 1]}<{len(value)} characters omitted>"
    return value


def _plain(value: Any) -> Any:
    """JSON-safe form of run payloads (pydantic records, messages, anything else as text)."""
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


class JsonLinesTracer(BaseTracer):
    """Writes every finished run tree to a file, one JSON object per run, parents first.

    For debugging without a LangSmith account: ``interleave run ... --trace-file run.jsonl``.
    """

    name: str = "interleave-jsonl-tracer"

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _persist_run(self, run: Run) -> None:
        lines = [json.dumps(self._record(item)) for item in _walk(run)]
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))

    @staticmethod
    def _record(run: Run) -> dict[str, Any]:
        return {
            "id": str(run.id),
            "parent_run_id": str(run.parent_run_id) if run.parent_run_id else None,
            "trace_id": str(run.trace_id) if run.trace_id else None,
            "name": run.name,
            "run_type": run.run_type,
            "start_time": run.start_time.isoformat(),
            "end_time": run.end_time.isoformat() if run.end_time else None,
            "tags": list(run.tags or []),
            "metadata": _plain(strip_image_bytes((run.extra or {}).get("metadata", {}))),
            "inputs": _plain(strip_image_bytes(run.inputs)),
            "outputs": _plain(strip_image_bytes(run.outputs)),
            "error": run.error,
        }


def _walk(run: Run) -> list[Run]:
    runs = [run]
    for child in sorted(run.child_runs, key=lambda item: item.start_time):
        runs.extend(_walk(child))
    return runs


def langsmith_tracer(project: str | None = None) -> BaseCallbackHandler:
    """A LangSmith tracer whose client strips inline image payloads from inputs and outputs.

    ``LANGSMITH_API_KEY``, ``LANGSMITH_ENDPOINT`` and ``LANGSMITH_PROJECT`` work as usual.
    """
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    client = Client(hide_inputs=strip_image_bytes, hide_outputs=strip_image_bytes)
    return LangChainTracer(client=client, project_name=project)


def tracing_enabled() -> bool:
    """Whether the LANGSMITH_TRACING (or older LANGCHAIN_TRACING_V2) switch is on."""
    switch = os.environ.get("LANGSMITH_TRACING") or os.environ.get("LANGCHAIN_TRACING_V2") or ""
    return switch.lower() in ("1", "true", "yes")
