"""Which stores a run uses, by URL: ``file://`` (folders of the run directory) or ``postgresql://``.

The image store URL decides where the images, the generation ledger and the critic's verdicts
live; they always move together, since the ledger and the verdicts are what keeps a worker
that takes over a thread from paying again for what another worker drew or asked.

- ``file://`` (the default): ``<run-dir>/images``, ``<run-dir>/generations`` and
  ``<run-dir>/verdicts``; ``file:///PATH`` puts the images in the folder PATH instead.
- ``postgresql://USER:PASSWORD@HOST:5432/DB`` (or ``postgres://``): the tables of
  ``storage.postgres_images`` in that database (``?pool_min=1&pool_max=4`` size this process's
  connection pool). Workers on several machines then share nothing but the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.settings import redact_url
from interleave_thinker.storage.image_store import ImageStorage, ImageStore
from interleave_thinker.storage.ledger import GenerationLedger, GenerationRecords
from interleave_thinker.storage.verdicts import VerdictLedger, VerdictRecords

__all__ = [
    "DEFAULT_IMAGE_STORE",
    "IMAGE_STORE_ENV",
    "Stores",
    "check_image_store_url",
    "image_folder",
    "is_postgres_store",
    "open_image_store",
    "open_stores",
]

IMAGE_STORE_ENV = "INTERLEAVE_IMAGE_STORE"
DEFAULT_IMAGE_STORE = "file://"
_FILE_PREFIX = "file://"
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_HINT = (
    "use file:// (the run directory, the default), file:///PATH (a folder) or "
    "postgresql://USER:PASSWORD@HOST:5432/DATABASE"
)


@dataclass(frozen=True)
class Stores:
    """The image store and the two ledgers that name its images, all of one URL."""

    images: ImageStorage
    ledger: GenerationRecords
    verdicts: VerdictRecords


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def check_image_store_url(url: str) -> str:
    """``url`` if it names an image store (a PostgreSQL URL's pool parameters checked too;
    the database is reached only on first use)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("the image store URL is empty", hint=_HINT)
    url = url.strip()
    if url.startswith(_FILE_PREFIX):
        return url
    if _scheme(url) in _POSTGRES_SCHEMES:
        from interleave_thinker.storage.postgres_images import check_url

        check_url(url)
        return url
    shown = redact_url(url) if "://" in url else url
    raise ConfigurationError(
        f"image store URL {shown!r} has an unknown scheme {_scheme(url) or 'none'!r}", hint=_HINT
    )


def is_postgres_store(url: str) -> bool:
    return _scheme(url) in _POSTGRES_SCHEMES


def image_folder(url: str, run_dir: Path) -> Path | None:
    """The folder of a ``file://`` store (``<run_dir>/images`` for ``file://``); None otherwise."""
    if not url.startswith(_FILE_PREFIX):
        return None
    rest = unquote(url.removeprefix(_FILE_PREFIX))
    return Path(rest) if rest else run_dir / "images"


def open_stores(url: str, run_dir: Path) -> Stores:
    """The image store, generation ledger and verdict ledger that ``url`` names.

    Nothing is opened yet: a PostgreSQL database connects on its first call (from a worker
    thread), so this is safe on an event loop.
    """
    url = check_image_store_url(url)
    folder = image_folder(url, run_dir)
    if folder is not None:
        files = ImageStore(folder)
        ledger = GenerationLedger(run_dir / "generations", files)
        return Stores(files, ledger, VerdictLedger(run_dir / "verdicts"))
    from interleave_thinker.storage.postgres_images import (
        PostgresGenerationLedger,
        PostgresImageStore,
        PostgresVerdictLedger,
        postgres_database,
    )

    database = postgres_database(url)
    images = PostgresImageStore(database)
    return Stores(images, PostgresGenerationLedger(database, images), PostgresVerdictLedger(database))


def open_image_store(url: str, run_dir: Path) -> ImageStorage:
    """The image store that ``url`` names (see :func:`open_stores`)."""
    return open_stores(url, run_dir).images
