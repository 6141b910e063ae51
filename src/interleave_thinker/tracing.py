"""Tracing: an offline JSON-lines run tree, and LangSmith with image payloads stripped."""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run
from pydantic import BaseModel

# A base64 data URL anywhere in a string (a whole image_url, or inside a tool's input text).
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,[A-Za-z0-9+/_=-]*", re.I)
# A run of base64 this long in free text is a payload (a block printed into a string), not
# words; it must also mix upper case, lower case and digits, as encoded bytes do.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{1000,}={0,2}")
# A long Python bytes literal in free text (raw bytes printed with repr() or str()).
_BYTES_LITERAL = re.compile(r"(?<!\w)(?:b'(?:[^'\\]|\\.){256,}'|b\"(?:[^\"\\]|\\.){256,}\")")
# Keys whose text or bytes are always a payload: standard blocks ("base64"), OpenAI's images
# API ("b64_json"), Bedrock's image source ("bytes").
_PAYLOAD_KEYS = frozenset({"base64", "b64_json", "bytes"})
# A "data" key is a payload in a block of these types, or beside a media type (Gemini's
# inline_data, Anthropic's base64 source, LangChain's v0 blocks with source_type "base64").
_DATA_BLOCK_TYPES = frozenset(
    {"base64", "image", "audio", "video", "file", "media", "image_url", "input_image", "document"}
)
_MEDIA_TYPE_KEYS = ("mime_type", "mimeType", "media_type", "mediaType")


def strip_image_bytes(value: Any) -> Any:
    """``value`` with every inline image payload replaced by its hash (``sha256:HEX``).

    Covered: standard content blocks (``{"type": "image", "base64": ...}`` and the older
    ``source_type: "base64"`` with ``data``), OpenAI ``image_url`` data URLs (and any data URL
    inside a string), Anthropic ``source: {"type": "base64", "data": ...}``, Gemini
    ``inline_data: {"mime_type", "data"}``, Bedrock ``source: {"bytes": ...}`` (raw bytes, also
    as LangChain serialises them), OpenAI images ``b64_json``, any ``bytes`` value, PIL images,
    and long base64 runs inside text. The hash is that of the decoded bytes, so an image that is
    also in the image store is named as the store names it. Returns new containers; ``value``
    is not changed. Our own messages carry only references; this guards traces against
    payloads that other code (a parent agent, a user's callback) may put in.
    """
    if isinstance(value, dict):
        if _is_serialised_bytes(value):
            return _bytes_reference(value.get("repr"))
        typed = _is_data_block(value)
        stripped = {}
        for key, item in value.items():
            if (key in _PAYLOAD_KEYS or (key == "data" and typed)) and _is_payload(item):
                stripped[key] = _reference(item)
            else:
                stripped[key] = strip_image_bytes(item)
        return stripped
    if isinstance(value, list | tuple):
        return [strip_image_bytes(item) for item in value]
    if isinstance(value, str):
        return _strip_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _hash(bytes(value))
    if isinstance(value, BaseModel):
        return strip_image_bytes(value.model_dump())
    if _is_pil_image(value):
        return _hash(value.tobytes())
    return value


def _is_data_block(block: dict[str, Any]) -> bool:
    return (
        block.get("type") in _DATA_BLOCK_TYPES
        or block.get("source_type") == "base64"
        or any(isinstance(block.get(key), str) for key in _MEDIA_TYPE_KEYS)
    )


def _is_payload(item: Any) -> bool:
    return isinstance(item, str | bytes | bytearray | memoryview) or (
        isinstance(item, dict) and _is_serialised_bytes(item)
    )


def _is_serialised_bytes(value: dict[str, Any]) -> bool:
    """LangChain's ``dumpd`` of a ``bytes`` value: its repr, under a "not_implemented" marker."""
    return (
        value.get("lc") == 1
        and value.get("type") == "not_implemented"
        and value.get("id") in (["builtins", "bytes"], ["builtins", "bytearray"])
    )


def _reference(item: Any) -> str:
    if isinstance(item, dict):
        return _bytes_reference(item.get("repr"))
    if isinstance(item, str):
        return _hash(_decoded(item.split(",", 1)[1] if _DATA_URL.fullmatch(item) else item))
    return _hash(bytes(item))


def _bytes_reference(text: Any) -> str:
    try:
        data = ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        data = None
    if isinstance(data, bytes | bytearray):
        return _hash(bytes(data))
    return _hash(str(text).encode())


def _decoded(text: str) -> bytes:
    """The bytes a base64 text encodes (standard or URL-safe), else the text itself."""
    compact = "".join(text.split())
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(compact + "=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            continue
    return text.encode("utf-8", "surrogatepass")


def _hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _strip_text(text: str) -> str:
    if "base64," in text:
        whole = _DATA_URL.fullmatch(text)
        if whole:
            return _reference(text)
        text = _DATA_URL.sub(lambda match: _reference(match.group(0)), text)
    if len(text) >= 256 and ("b'" in text or 'b"' in text):
        text = _BYTES_LITERAL.sub(_bytes_literal, text)
    if len(text) >= 1000:
        text = _BASE64_RUN.sub(_base64_run, text)
    return text


def _bytes_literal(match: re.Match[str]) -> str:
    literal = match.group(0)
    # Escaped bytes (\xNN) are what makes it binary rather than a quotation.
    return _bytes_reference(literal) if "\\x" in literal else literal


def _base64_run(match: re.Match[str]) -> str:
    run = match.group(0)
    mixed = any(c.isupper() for c in run) and any(c.islower() for c in run) and any(
        c.isdigit() for c in run
    )
    return _hash(_decoded(run)) if mixed else run


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "tobytes")


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
    """A LangSmith tracer whose client replaces inline image payloads in inputs, outputs and
    metadata by their hash (see :func:`strip_image_bytes`).

    ``LANGSMITH_API_KEY``, ``LANGSMITH_ENDPOINT`` and ``LANGSMITH_PROJECT`` work as usual.
    """
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    client = Client(
        hide_inputs=strip_image_bytes,
        hide_outputs=strip_image_bytes,
        hide_metadata=strip_image_bytes,
    )
    return LangChainTracer(client=client, project_name=project)


def tracing_enabled() -> bool:
    """Whether the LANGSMITH_TRACING (or older LANGCHAIN_TRACING_V2) switch is on."""
    switch = os.environ.get("LANGSMITH_TRACING") or os.environ.get("LANGCHAIN_TRACING_V2") or ""
    return switch.lower() in ("1", "true", "yes")
