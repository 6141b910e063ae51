"""The image generator interface every backend implements: batches of jobs in, images out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class GenerationJob:
    """One image to draw: text-to-image when ``source_images`` is empty, else an edit of them."""

    prompt: str
    seed: int
    width: int
    height: int
    # The first image is the one being edited; any others are references.
    source_images: tuple[Image.Image, ...] = ()
    # Where the job comes from, for logs and tracing; backends must not let it change the image.
    thread_id: str = ""
    step: int = 0
    attempt: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class ImageGenerator(Protocol):
    """A backend that draws a batch of jobs; it returns one image (PIL or encoded bytes) per job.

    ``identity`` names the backend and model (for example ``diffusers:FLUX.2-klein-4B``): it is
    part of a thread's settings and of every generation key, so it must change whenever the
    images would.
    """

    identity: str

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]: ...
