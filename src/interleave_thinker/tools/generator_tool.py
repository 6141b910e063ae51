"""The image generator as a LangChain tool: text content for the model, an ImageRef as artifact."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field

from interleave_thinker.errors import GeneratorError
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.state import ImageRef
from interleave_thinker.storage.image_store import ImageStorage, encode_png
from interleave_thinker.workspace import resolve_input_image


class GenerateImageInput(BaseModel):
    """Arguments an agent passes to draw or edit one image."""

    prompt: str = Field(min_length=1, description="What to draw, or how to change the sources.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed; same seed, same image.")
    width: int = Field(default=1024, ge=16, le=8192, description="Image width in pixels.")
    height: int = Field(default=1024, ge=16, le=8192, description="Image height in pixels.")
    source_images: list[str] = Field(
        default_factory=list,
        description="Images to edit (the first) or use as references: sha256 hashes of earlier "
        "images ('sha256:HEX' or the bare hex), file paths, or data:image/...;base64 URLs.",
    )


class GenerateImageTool(BaseTool):
    """Draws one image with any ImageGenerator backend and stores it in the image store."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "generate_image"
    description: str = (
        "Draw an image from a text prompt, or edit earlier images (named by their sha256, a "
        "file path or a data URL). Returns the new image's sha256 and size, and the sources used."
    )
    args_schema: type[BaseModel] = GenerateImageInput
    response_format: str = "content_and_artifact"
    generator: Any = Field(exclude=True)
    image_store: Any = Field(exclude=True)

    def _run(self, **kwargs: Any) -> tuple[str, ImageRef]:
        # Sync callers get the async path on a private loop, which also works inside a loop.
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._arun(**kwargs)).result()

    async def _arun(
        self,
        prompt: str,
        seed: int = 0,
        width: int = 1024,
        height: int = 1024,
        source_images: list[str] | None = None,
        **_: Any,
    ) -> tuple[str, ImageRef]:
        store: ImageStorage = self.image_store
        generator: ImageGenerator = self.generator
        # An image named by its hash is edited as stored; files and data URLs are stored first
        # (as input images are: 8-bit RGB, upright), so that the reply can name them by hash.
        resolved = await asyncio.to_thread(
            lambda: [
                resolve_input_image(store, source, what=f"source image {number}", normalise=False)
                for number, source in enumerate(source_images or [], start=1)
            ]
        )
        sources = [ref for ref, _ in resolved]
        job = GenerationJob(
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            source_images=tuple(await asyncio.to_thread(lambda: [store.open(r) for r in sources])),
        )
        (output,) = await generator.agenerate([job]) or [None]
        if output is None:
            raise GeneratorError(f"generator {generator.identity} returned no image")
        ref = await asyncio.to_thread(
            store.put, output if isinstance(output, bytes) else encode_png(output)
        )
        verb = "Edited" if sources else "Drew"
        content = f"{verb} a {ref.width}x{ref.height} image, sha256 {ref.sha256}."
        if resolved:
            used = "; ".join(
                f"{number}. sha256 {source.sha256}"
                + ("" if given.startswith("sha256:") else f" (given as {given})")
                for number, (source, given) in enumerate(resolved, start=1)
            )
            content += f" Sources used: {used}."
        return content, ref
