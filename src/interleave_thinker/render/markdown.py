"""Render a document as Markdown that links its images and cannot carry raw HTML or links."""

from __future__ import annotations

import re
from collections.abc import Mapping
from html import escape
from urllib.parse import quote

from interleave_thinker.render.html import (
    FORCED_NOTE,
    NO_IMAGE_NOTE,
    STAND_IN_NOTES,
    STATUS_NOTES,
    document_title,
    kept_attempt,
)
from interleave_thinker.render.safe_text import display_text
from interleave_thinker.state import Attempt, Critique, Document, DocumentStep, ImageRef

# Characters that start emphasis, code, links, images, tables, strikethrough or headings anywhere.
_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]()!|~#])")
# Line openings that start a bullet list or a setext underline, and ordered list items.
_LINE_START = re.compile(r"^[-+=]")
_ORDERED_START = re.compile(r"^(\d+)\.(?=\s|$)")


def _escape_line(line: str) -> str:
    # HTML first: with no '<' left no tag, comment or autolink can form, and '&' cannot
    # smuggle one in as an entity. Quotes stay, since no attribute can open without '<'.
    line = escape(display_text(line).strip(), quote=False)
    line = _INLINE_SPECIAL.sub(r"\\\1", line)
    line = _LINE_START.sub(lambda match: "\\" + match.group(0), line)
    # Only punctuation can be backslash-escaped, so '1.' becomes '1\.', not '\1.'; the ')'
    # form was escaped above.
    return _ORDERED_START.sub(lambda match: match.group(1) + "\\.", line)


def md_inline(text: str) -> str:
    """Untrusted text escaped for one line (a heading, alt text, a list item): newlines fold."""
    return _escape_line(" ".join(text.split()))


def md_block(text: str, indent: str = "") -> str:
    """Untrusted text escaped as paragraphs; line breaks kept, continuation lines indented."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [_escape_line(line) for line in block.split("\n") if line.strip()]
        if lines:
            # A backslash at the end of a line is a hard break in CommonMark.
            paragraphs.append(("\\\n" + indent).join(lines))
    return ("\n\n" + indent).join(paragraphs)


def _link_target(path: str) -> str:
    # Percent-encoding leaves no space, parenthesis or scheme colon to end or redirect the link.
    # A file name that is not UTF-8 keeps its own bytes (%FF), so the link still finds the file.
    return quote(path, safe="/", errors="surrogateescape")


def _image(ref: ImageRef, alt: str, image_paths: Mapping[str, str]) -> str:
    path = image_paths.get(ref.sha256)
    if path is None:
        return f"*Image {ref.short} was not exported.*"
    return f"![{md_inline(alt)}]({_link_target(path)})"


def _image_link(ref: ImageRef, image_paths: Mapping[str, str]) -> str:
    path = image_paths.get(ref.sha256)
    if path is None:
        return f"image {ref.short} (not exported)"
    return f"[image {ref.short}]({_link_target(path)})"


def _field(indent: str, label: str, text: str) -> str:
    return f"{indent}- {label}: {md_block(text, indent + '  ')}"


def _critique(critique: Critique | None, indent: str) -> list[str]:
    if critique is None:
        return [f"{indent}- Critique: not judged"]
    verdict = "accepted" if critique.success else "rejected"
    lines = [f"{indent}- Critique: {verdict}"]
    inner = indent + "  "
    if critique.score is not None:
        lines.append(f"{inner}- Score: {critique.score:g}")
    if critique.refine_prompt:
        lines.append(_field(inner, "Refine prompt", critique.refine_prompt))
    if critique.reasoning:
        lines.append(_field(inner, "Reasoning", critique.reasoning))
    return lines


def _attempt(attempt: Attempt, kept: bool, image_paths: Mapping[str, str]) -> list[str]:
    marks = " (kept)" if kept else ""
    if attempt.reused:
        marks += " (reused from the generation ledger)"
    head = (
        f"- **Attempt {int(attempt.number)}**{marks}: seed {int(attempt.seed)}, "
        f"{_image_link(attempt.image, image_paths)}"
    )
    return [head, _field("  ", "Prompt", attempt.prompt), *_critique(attempt.critique, "  ")]


def _step(step: DocumentStep, image_paths: Mapping[str, str]) -> list[str]:
    number = int(step.number)
    heading = f"Step {number}: {step.name}" if step.name else f"Step {number}"
    forced = " (forced)" if step.status == "forced" else ""
    lines = [f"## {md_inline(heading)}{forced}", ""]
    if step.status == "forced":
        lines += [f"> **Forced:** {FORCED_NOTE}", ""]
    if step.text:
        lines += [md_block(step.text), ""]
    if step.image is not None:
        lines += [_image(step.image, step.instruction or heading, image_paths), ""]
    else:
        lines += [f"*{STATUS_NOTES.get(step.status, NO_IMAGE_NOTE)}*", ""]
    if step.attempts:
        kept = kept_attempt(step)
        lines += [f"**Attempts ({len(step.attempts)})**", ""]
        for index, attempt in enumerate(step.attempts):
            lines += _attempt(attempt, index == kept, image_paths)
        lines.append("")
    return lines


def render_markdown(document: Document, *, image_paths: Mapping[str, str], thread_id: str) -> str:
    """The document as Markdown; ``image_paths`` maps an image's sha256 to a relative path."""
    request = document.request
    lines = [f"# {md_inline(document_title(document))}", ""]
    if document.profile in STAND_IN_NOTES:
        lines += [f"> **{STAND_IN_NOTES[document.profile]}**", ""]
    lines += ["**Request:**", "", md_block(request.text), ""]
    for n, ref in enumerate(request.images, start=1):
        lines += [_image(ref, f"Input image {n}", image_paths), ""]
    lines += [
        f"- Thread: {md_inline(thread_id)}",
        f"- Profile: {md_inline(document.profile or '(not recorded)')}",
        f"- Generator calls: {int(document.generator_calls)}",
        f"- Steps: {len(document.steps)}",
        "",
    ]
    for step in document.steps:
        lines += _step(step, image_paths)
    return "\n".join(lines).rstrip("\n") + "\n"
