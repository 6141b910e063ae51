"""Write a document to a file as HTML, Markdown (with an image folder) or JSON, atomically."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.input_files import shown_path
from interleave_thinker.render.html import render_html_chunks, validated_ref
from interleave_thinker.render.json_doc import document_json
from interleave_thinker.render.markdown import render_markdown
from interleave_thinker.state import MEDIA_SUFFIXES, Document, ImageRef
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.storage.image_store import ImageStorage

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


def _image_names(document: Document) -> dict[str, tuple[ImageRef, str]]:
    """sha256 -> (reference, file name in the images folder), for every image shown."""
    names: dict[str, tuple[ImageRef, str]] = {}
    for ref in referenced_images(document):
        # Validated again: the sha256 and media type become a file name.
        ref = validated_ref(ref)
        names[ref.sha256] = (ref, f"{ref.sha256}{MEDIA_SUFFIXES[ref.media_type]}")
    return names


def _copy_images(names: dict[str, tuple[ImageRef, str]], store: ImageStorage, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(
            f"{shown_path(folder)} exists and is not a folder, so the images cannot be written there",
            hint="move that file away or export under another name",
        )
    for ref, name in names.values():
        target = folder / name
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == ref.sha256):
            write_atomically(target, store.read(ref))


def _refuse_protected(target: Path, protected: Sequence[Path]) -> None:
    resolved = target.resolve()
    for path in protected:
        guarded = path.resolve()
        if resolved == guarded or resolved.is_relative_to(guarded):
            raise ConfigurationError(
                f"the export path {shown_path(target)} would overwrite the run's own data "
                f"({shown_path(path)})",
                hint="export to a file outside the run directory's images, generations and "
                "checkpoint files, e.g. the default under documents/",
            )


def _refuse_file_as_folder(out: Path) -> None:
    # The nearest existing ancestor must be a folder; missing ones are created on writing.
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise ConfigurationError(
                    f"cannot write the export to {shown_path(out)}: {shown_path(folder)} is a "
                    "file, not a folder",
                    hint="choose a path whose folders are folders, or move that file away",
                )
            return


def export_document(
    document: Document,
    store: ImageStorage,
    *,
    thread_id: str,
    fmt: ExportFormat,
    out: Path,
    protected: Sequence[Path] = (),
) -> Path:
    """Write ``document`` to ``out`` in ``fmt``; a Markdown export also fills ``<stem>_files/``.

    An existing file at ``out`` is replaced atomically (a symlink is replaced, not followed);
    a directory, or a path in or under ``protected`` (see ``Workspace.protected_paths``), is refused.
    Missing parent folders are created.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigurationError(
            f"the export path {shown_path(out)} is a directory",
            hint=f"give a file path, such as {shown_path(out / ('document.' + str(fmt)))}",
        )
    _refuse_protected(out, protected)
    _refuse_file_as_folder(out)
    try:
        data: bytes | list[bytes]
        if fmt == "html":
            data = list(render_html_chunks(document, store, thread_id=thread_id))
        elif fmt == "md":
            folder = images_folder(out)
            _refuse_protected(folder, protected)
            names = _image_names(document)
            paths = {sha: f"{folder.name}/{name}" for sha, (_, name) in names.items()}
            data = render_markdown(document, image_paths=paths, thread_id=thread_id).encode("utf-8")
            # Images before the page, so that a written Markdown file never links a missing image.
            _copy_images(names, store, folder)
        elif fmt == "json":
            data = document_json(document, thread_id=thread_id).encode("utf-8")
        else:
            raise ConfigurationError(
                f"unknown export format {fmt!r}", hint=f"use one of {', '.join(EXPORT_FORMATS)}"
            )
        write_atomically(out, data)
    except OSError as exc:
        # A parent that is a file, a read-only folder, a full disk: one line, not a traceback.
        raise ConfigurationError(
            f"cannot write the export to {shown_path(out)}: {exc.strerror or exc}",
            hint="choose a path in a folder you can write to (its parent must be a folder)",
        ) from exc
    return out
