"""The document as pretty-printed JSON with its thread id, and the way back."""

from __future__ import annotations

import json

from pydantic import ValidationError

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.state import Document

_HINT = "pass a file written by 'export --format json'"


def document_json(document: Document, *, thread_id: str) -> str:
    """``{"thread_id", "document", "text_answer"}`` as indented JSON ending in a newline.

    ``text_answer`` is the steps' texts joined as the official UEval script answers (derived
    from the document, so reading the file back ignores it).
    """
    payload = {
        "thread_id": thread_id,
        "document": document.model_dump(mode="json"),
        "text_answer": document.text_answer,
    }
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def load_document_json(text: str) -> tuple[str, Document]:
    """The thread id and document of a ``document_json`` text, validated."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"the document is not valid JSON: {exc}", hint=_HINT) from exc
    except RecursionError as exc:
        raise ConfigurationError("the document JSON is nested too deeply", hint=_HINT) from exc
    except ValueError as exc:
        # Python refuses integers of thousands of digits (a guard against slow conversions).
        raise ConfigurationError(f"the document JSON has an unreadable value: {exc}", hint=_HINT) from exc
    if not isinstance(payload, dict) or not {"thread_id", "document"} <= set(payload) <= {
        "thread_id", "document", "text_answer"
    }:
        raise ConfigurationError(
            "the document JSON must be an object with 'thread_id' and 'document' (and, "
            "optionally, 'text_answer')",
            hint=_HINT,
        )
    thread_id = payload["thread_id"]
    if not isinstance(thread_id, str):
        raise ConfigurationError("the document JSON's 'thread_id' is not a string", hint=_HINT)
    try:
        document = Document.model_validate(payload["document"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise ConfigurationError(
            f"the document JSON is not a valid document ({exc.error_count()} errors; "
            f"first at {where}: {first['msg']})",
            hint=_HINT,
        ) from exc
    return thread_id, document
