"""Write a document to a file as HTML, Markdown (with an image folder) or JSON, atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, get_args

from interleave_thinker.checkpoints.image_store import ImageStore, write_atomically
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.render.html import render_html, validated_ref
from interleave_thinker.render.json_doc import document_json
from interleave_thinker.render.markdown import render_markdown
from interleave_thinker.state import MEDIA_SUFFIXES, Document, ImageRef

ExportFormat = Literal["html", "md", "json"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def images_folder(out: Path) -> Path:
    """The folder beside a Markdown export that holds its images: ``<stem>_files``."""
    return out.parent / f"{out.stem}_files"


def referenced_images(document: Document) -> list[ImageRef]:
    """Every image the document shows (inputs, final images, attempts), once each, in order."""
    refs = list(document.request.images)
    for step in document.steps:
        if step.image is not None:
            refs.append(step.image)
        refs.extend(attempt.image for attempt in step.attempts)
    unique: dict[str, ImageRef] = {}
    for ref in refs:
        unique.setdefault(ref.sha256, ref)
    return list(unique.values())


def _copy_images(document: Document, store: ImageStore, folder: Path) -> dict[str, str]:
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(
            f"{folder} exists and is not a folder, so the images cannot be written there",
            hint="move that file away or export under another name",
        )
    paths: dict[str, str] = {}
    for ref in referenced_images(document):
        # Validated again: the sha256 and media type become a file name.
        ref = validated_ref(ref)
        name = f"{ref.sha256}{MEDIA_SUFFIXES[ref.media_type]}"
        target = folder / name
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == ref.sha256):
            write_atomically(target, store.read(ref))
        paths[ref.sha256] = f"{folder.name}/{name}"
    return paths


def export_document(
    document: Document,
    store: ImageStore,
    *,
    thread_id: str,
    fmt: ExportFormat,
    out: Path,
) -> Path:
    """Write ``document`` to ``out`` in ``fmt``; a Markdown export also fills ``<stem>_files/``."""
    out = Path(out)
    if out.is_dir():
        raise ConfigurationError(
            f"the export path {out} is a directory",
            hint=f"give a file path, such as {out / ('document.' + str(fmt))}",
        )
    if fmt == "html":
        text = render_html(document, store, thread_id=thread_id)
    elif fmt == "md":
        # Images first, so that a written Markdown file never links a missing image.
        paths = _copy_images(document, store, images_folder(out))
        text = render_markdown(document, image_paths=paths, thread_id=thread_id)
    elif fmt == "json":
        text = document_json(document, thread_id=thread_id)
    else:
        raise ConfigurationError(
            f"unknown export format {fmt!r}", hint=f"use one of {', '.join(EXPORT_FORMATS)}"
        )
    write_atomically(out, text.encode("utf-8"))
    return out
