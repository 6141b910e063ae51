"""Turn a finished document into HTML, Markdown or JSON, and write it to a file."""

from interleave_thinker.render.export import EXPORT_FORMATS, ExportFormat, export_document
from interleave_thinker.render.html import render_html
from interleave_thinker.render.json_doc import document_json, load_document_json
from interleave_thinker.render.markdown import render_markdown

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "document_json",
    "export_document",
    "load_document_json",
    "render_html",
    "render_markdown",
]
