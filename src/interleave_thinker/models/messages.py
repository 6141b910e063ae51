"""Turn image references into LangChain standard image content blocks at the moment of a call."""

from __future__ import annotations

import base64

from interleave_thinker.checkpoints.image_store import ImageStore
from interleave_thinker.state import ImageRef


def image_block(store: ImageStore, ref: ImageRef) -> dict[str, str]:
    """A standard ``image`` content block with the verified bytes of ``ref`` inlined as base64."""
    return {
        "type": "image",
        "base64": base64.b64encode(store.read(ref)).decode("ascii"),
        "mime_type": ref.media_type,
    }
