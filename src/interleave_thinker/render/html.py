"""Render a document as one self-contained HTML page: inline CSS, data-URI images, no scripts."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from html import escape

from pydantic import ValidationError

from interleave_thinker.errors import ImageError
from interleave_thinker.render.safe_text import display_text
from interleave_thinker.state import Attempt, Critique, Document, DocumentStep, ImageRef
from interleave_thinker.storage.image_store import PREVIEW_PIXELS, ImageStorage

TITLE_LENGTH = 80

# What a reader is told when a step shows no image, by status.
STATUS_NOTES: dict[str, str] = {
    "text": "Text-only step: no image was planned for it.",
    "skipped": "Skipped: the generator-call budget ran out before this step was drawn.",
    "pending": "Unfinished: the run stopped before this step had an image.",
}
NO_IMAGE_NOTE = "This step has no image."
FORCED_NOTE = (
    "The critic never accepted an attempt at this step; "
    "the kept image was chosen by the selection policy."
)
TEST_PROFILE_NOTE = (
    "Test profile: the planner, critic and generator were test stand-ins, not real models. "
    "The text and images below are placeholders."
)
DEMO_PROFILE_NOTE = (
    "Demo profile: tiny models with random or scripted weights ran through the real code. "
    "The planner and critic replay fixed replies and the pictures are noise."
)
# Profiles whose output must never be mistaken for a real model's.
STAND_IN_NOTES: dict[str, str] = {"test": TEST_PROFILE_NOTE, "demo": DEMO_PROFILE_NOTE}

# The policy forbids every script, plugin and remote fetch even if escaping were ever missed.
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
:root { color-scheme: light dark; --muted: #6b7280; --line: #d1d5db; --warn: #b45309;
        --ok: #15803d; }
@media (prefers-color-scheme: dark) { :root { --ok: #4ade80; } }
body { font: 16px/1.55 system-ui, sans-serif; max-width: 56rem; margin: 2rem auto;
       padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .5rem; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem;
        color: var(--muted); }
.meta dt { font-weight: 600; }
.meta dd { margin: 0; overflow-wrap: anywhere; }
.notice { border-left: 4px solid var(--warn); padding: .5rem .8rem;
          background: rgba(180, 83, 9, .08); }
.inputs img, .step-image img { max-width: 100%; height: auto; display: block; }
.inputs { display: flex; flex-wrap: wrap; gap: .5rem; }
.inputs img { max-width: 16rem; }
.step-image img { max-width: min(100%, 32rem); max-height: 70vh; width: auto; }
figure { margin: .8rem 0; }
.step { border-top: 1px solid var(--line); padding: 1rem 0; }
.badge { display: inline-block; font-size: .75rem; font-weight: 600; padding: .1rem .5rem;
         border-radius: .6rem; vertical-align: middle; margin-left: .4rem;
         border: 1px solid currentColor; }
.badge.forced { color: var(--warn); }
.badge.accepted { color: var(--ok); }
.verdict.rejected { color: var(--warn); }
.verdict.accepted { color: var(--ok); }
.note { color: var(--muted); font-style: italic; }
details.attempts { margin-top: .8rem; }
details.attempts summary { cursor: pointer; color: var(--muted); }
.attempt { margin: .6rem 0; padding: .5rem; border: 1px solid var(--line);
           border-radius: .4rem; display: grid; grid-template-columns: 10rem 1fr; gap: .8rem; }
.attempt-list { list-style: none; padding: 0; margin: 0; }
.attempt h4 { margin: 0 0 .3rem; }
.attempt.kept { border-color: var(--ok); border-width: 2px; }
.attempt img.thumb { width: 10rem; height: auto; }
.attempt dl { margin: 0; display: grid; grid-template-columns: max-content 1fr; gap: .1rem .6rem; }
.attempt dt { font-weight: 600; }
.attempt dd { margin: 0; overflow-wrap: anywhere; }
code { overflow-wrap: anywhere; }
"""


def _e(value: object) -> str:
    """Escape anything for element text or a quoted attribute value (controls and bidi made safe)."""
    return escape(display_text(str(value)), quote=True)


def document_title(document: Document, limit: int = TITLE_LENGTH) -> str:
    """A one-line title from the request text (not escaped), cut to ``limit`` characters."""
    # Cut before escaping, so that an entity such as &amp; is never split in half.
    words = " ".join(document.request.text.split())
    if len(words) <= limit:
        return words
    cut = words[: limit - 1]
    # Prefer ending at a word boundary, unless that would leave almost nothing.
    if " " in cut and cut.rfind(" ") > limit // 2:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip() + "…"


def kept_attempt(step: DocumentStep) -> int | None:
    """Index of the attempt whose image the step kept: the last one with the step's image."""
    if step.image is None:
        return None
    for index in range(len(step.attempts) - 1, -1, -1):
        if step.attempts[index].image == step.image:
            return index
    return None


def validated_ref(ref: ImageRef) -> ImageRef:
    """``ref`` validated again: a record built without validation must not pick a media type."""
    try:
        return ImageRef.model_validate(ref.model_dump())
    except ValidationError as exc:
        raise ImageError(
            f"image reference {str(ref.sha256)[:12]!r} is invalid: {exc.errors()[0]['msg']}",
            hint="the document was edited or damaged; export it again from the thread",
        ) from exc


# Attempt thumbnails: the store's previews, twice the 10rem they are shown at, for sharp
# high-density screens.
THUMB_PIXELS = PREVIEW_PIXELS


_SLOT = re.compile(r"\x00(\d+)\x00")


class _Embedder:
    """Builds data URIs, reading and encoding each distinct image once.

    The markup holds a short placeholder for each full-size image's base64 text (megabytes per
    image), so that the page's text is put together, and the page written, without copying
    that text again: :meth:`chunks` puts it back in while writing.
    """

    def __init__(self, store: ImageStorage) -> None:
        self._store = store
        self._thumbs: dict[str, tuple[str, int, int]] = {}
        # The placeholders are NUL-delimited: escaped text never holds a NUL (see _e).
        self._payloads: list[str] = []
        self._slots: dict[str, str] = {}

    def uri(self, ref: ImageRef) -> str:
        ref = validated_ref(ref)
        slot = self._slots.get(ref.sha256)
        if slot is None:
            self._payloads.append(self._store.as_base64(ref))
            slot = self._slots[ref.sha256] = f"\x00{len(self._payloads) - 1}\x00"
        # The media type is one of a fixed set and base64 needs no escaping in an attribute.
        return f"data:{ref.media_type};base64,{slot}"

    def chunks(self, markup: str) -> Iterator[bytes]:
        """``markup`` as UTF-8 bytes, with the image data put back in place of placeholders."""
        for index, part in enumerate(_SLOT.split(markup)):
            if index % 2:
                yield self._payloads[int(part)].encode("ascii")
            elif part:
                yield part.encode("utf-8")

    def img(self, ref: ImageRef, alt: str, css_class: str = "") -> str:
        class_attr = f' class="{_e(css_class)}"' if css_class else ""
        return (
            f'<img{class_attr} src="{self.uri(ref)}" alt="{_e(alt)}" '
            f'width="{int(ref.width)}" height="{int(ref.height)}" '
            f'title="sha256 {_e(ref.sha256)}">'
        )

    def thumb(self, ref: ImageRef, alt: str) -> str:
        """A small JPEG copy for an attempt's thumbnail; the title names the original's hash.

        Full-size copies of every attempt made a 12-step, 3-attempt page at 1024x1024 weigh
        about 100 MB; the thumbnails add a few tens of KB each.
        """
        ref = validated_ref(ref)
        if max(ref.width, ref.height) <= THUMB_PIXELS:
            return self.img(ref, alt, "thumb")
        cached = self._thumbs.get(ref.sha256)
        if cached is None:
            preview = self._store.preview(ref)
            cached = (base64.b64encode(preview.jpeg).decode("ascii"), preview.width, preview.height)
            self._thumbs[ref.sha256] = cached
        encoded, width, height = cached
        return (
            f'<img class="thumb" src="data:image/jpeg;base64,{encoded}" alt="{_e(alt)}" '
            f'width="{int(width)}" height="{int(height)}" title="sha256 {_e(ref.sha256)}">'
        )


def _lines(text: str) -> str:
    return "<br>\n".join(_e(line) for line in display_text(text).split("\n"))


def _paragraphs(text: str, css_class: str = "") -> str:
    """Escaped text as paragraphs: blank lines split paragraphs, single newlines become <br>."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    class_attr = f' class="{_e(css_class)}"' if css_class else ""
    blocks = [block for block in re.split(r"\n[ \t]*\n", text) if block.strip()]
    return "\n".join(f"<p{class_attr}>{_lines(block.strip())}</p>" for block in blocks)


def _header(document: Document, embed: _Embedder, thread_id: str) -> str:
    request = document.request
    parts = [f"<header>\n<h1>{_e(document_title(document))}</h1>"]
    if document.profile in STAND_IN_NOTES:
        note = STAND_IN_NOTES[document.profile]
        parts.append(f'<p class="notice test-profile" role="note">{_e(note)}</p>')
    parts.append(f'<section class="request">\n<h2>Request</h2>\n{_paragraphs(request.text)}')
    if request.images:
        images = "\n".join(
            f"<figure>{embed.img(ref, f'Input image {n}')}"
            f"<figcaption>Input image {n}</figcaption></figure>"
            for n, ref in enumerate(request.images, start=1)
        )
        parts.append(f'<h3>Input images</h3>\n<div class="inputs">\n{images}\n</div>')
    parts.append("</section>")
    profile = document.profile or "(not recorded)"
    parts.append(
        '<dl class="meta">'
        f"<dt>Thread</dt><dd><code>{_e(thread_id)}</code></dd>"
        f"<dt>Profile</dt><dd>{_e(profile)}</dd>"
        f"<dt>Generator calls</dt><dd>{int(document.generator_calls)}</dd>"
        f"<dt>Steps</dt><dd>{len(document.steps)}</dd>"
        "</dl>\n</header>"
    )
    return "\n".join(parts)


def _critique(critique: Critique | None) -> str:
    if critique is None:
        return '<dt>Critique</dt><dd class="note">not judged</dd>'
    verdict = "accepted" if critique.success else "rejected"
    rows = [f'<dt>Critique</dt><dd class="verdict {verdict}">{verdict}</dd>']
    if critique.score is not None:
        rows.append(f"<dt>Score</dt><dd>{_e(f'{critique.score:g}')}</dd>")
    if critique.refine_prompt:
        rows.append(f"<dt>Refine prompt</dt><dd>{_lines(critique.refine_prompt)}</dd>")
    if critique.reasoning:
        rows.append(f"<dt>Reasoning</dt><dd>{_lines(critique.reasoning)}</dd>")
    return "".join(rows)


def _attempt(step: DocumentStep, attempt: Attempt, kept: bool, embed: _Embedder) -> str:
    anchor = f"step-{int(step.number)}-attempt-{int(attempt.number)}"
    css = "attempt kept" if kept else "attempt"
    name = f"Attempt {int(attempt.number)}"
    label = name
    if kept:
        label += ' <span class="badge accepted">kept</span>'
    if attempt.reused:
        label += ' <span class="note">(reused from the generation ledger)</span>'
    thumb = embed.thumb(attempt.image, f"{name} of step {int(step.number)}")
    return (
        f'<li class="{css}" id="{anchor}" data-attempt="{int(attempt.number)}" '
        f'data-kept="{"true" if kept else "false"}">\n'
        f"{thumb}\n<div>\n<h4>{label}</h4>\n<dl>"
        f"<dt>Prompt</dt><dd>{_lines(attempt.prompt)}</dd>"
        f"<dt>Seed</dt><dd>{int(attempt.seed)}</dd>"
        f"<dt>Image</dt><dd><code>{_e(attempt.image.short)}</code></dd>"
        f"{_critique(attempt.critique)}</dl>\n</div>\n</li>"
    )


def _step(step: DocumentStep, embed: _Embedder) -> str:
    number = int(step.number)
    heading = f"Step {number}: {step.name}" if step.name else f"Step {number}"
    badge = ""
    if step.status == "forced":
        badge = ' <span class="badge forced">forced</span>'
    elif step.status == "accepted":
        badge = ' <span class="badge accepted">accepted</span>'
    parts = [
        f'<article class="step" id="step-{number}" data-step="{number}" '
        f'data-status="{_e(step.status)}">',
        f"<h2>{_e(heading)}{badge}</h2>",
    ]
    if step.status == "forced":
        parts.append(f'<p class="notice forced">{_e(FORCED_NOTE)}</p>')
    if step.text:
        parts.append(_paragraphs(step.text, "text"))
    if step.image is not None:
        alt = step.instruction or heading
        parts.append(f'<figure class="step-image">{embed.img(step.image, alt)}</figure>')
    else:
        note = STATUS_NOTES.get(step.status, NO_IMAGE_NOTE)
        parts.append(f'<p class="note no-image">{_e(note)}</p>')
    if step.attempts:
        kept = kept_attempt(step)
        items = "\n".join(
            _attempt(step, attempt, index == kept, embed)
            for index, attempt in enumerate(step.attempts)
        )
        parts.append(
            f'<details class="attempts">\n<summary>Attempts ({len(step.attempts)})</summary>\n'
            f'<ol class="attempt-list">\n{items}\n</ol>\n</details>'
        )
    parts.append("</article>")
    return "\n".join(parts)


def render_html(document: Document, store: ImageStorage, *, thread_id: str) -> str:
    """The document as one HTML5 page that needs no network, no files and no JavaScript."""
    return b"".join(render_html_chunks(document, store, thread_id=thread_id)).decode("utf-8")


def render_html_chunks(document: Document, store: ImageStorage, *, thread_id: str) -> Iterator[bytes]:
    """:func:`render_html` as UTF-8 bytes in pieces, to write to a file one after the other:
    a page of 1024x1024 images is megabytes of base64, copied once less than as one string."""
    embed = _Embedder(store)
    return embed.chunks(_markup(document, embed, thread_id))


def _markup(document: Document, embed: _Embedder, thread_id: str) -> str:
    steps = "\n".join(_step(step, embed) for step in document.steps)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(document_title(document))}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{_header(document, embed, thread_id)}\n"
        f"<main>\n{steps}\n</main>\n</body>\n</html>\n"
    )
