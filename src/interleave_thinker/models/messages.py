"""Image references in chat messages, resolved to bytes only below the traced model call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult
from pydantic import ConfigDict

from interleave_thinker.state import ImageRef
from interleave_thinker.storage.image_store import ImageStorage

REF_PREFIX = "sha256:"


def image_block(ref: ImageRef) -> dict[str, str]:
    """A standard ``image`` content block that names the image by hash instead of carrying it.

    Messages built from these blocks can be traced, logged and checkpointed at no cost; the
    bytes are put in by ``ImageInliningChatModel`` just before the provider call.
    """
    return {"type": "image", "file_id": f"{REF_PREFIX}{ref.sha256}", "mime_type": ref.media_type}


def image_data_block(store: ImageStorage, ref: ImageRef) -> dict[str, str]:
    """A standard ``image`` block carrying the verified bytes of ``ref`` as base64."""
    return {
        "type": "image",
        "base64": store.as_base64(ref),
        "mime_type": ref.media_type,
    }


def inline_images(messages: Sequence[BaseMessage], store: ImageStorage) -> list[BaseMessage]:
    """Copies of ``messages`` with every reference block replaced by a base64 block."""
    return [_inline_message(message, store) for message in messages]


def _inline_message(message: BaseMessage, store: ImageStorage) -> BaseMessage:
    if not isinstance(message.content, list):
        return message
    blocks = [_inline_block(block, store) for block in message.content]
    return message.model_copy(update={"content": blocks})


def _inline_block(block: Any, store: ImageStorage) -> Any:
    if not (isinstance(block, dict) and block.get("type") == "image"):
        return block
    file_id = block.get("file_id")
    if not (isinstance(file_id, str) and file_id.startswith(REF_PREFIX)):
        return block
    sha256 = file_id.removeprefix(REF_PREFIX)
    inlined = image_data_block(store, store.recent(sha256) or store.find(sha256))
    # Layout hints the prompt pack set (max_pixels) travel with the bytes.
    return inlined | {key: value for key, value in block.items() if key == "max_pixels"}


class ImageInliningChatModel(BaseChatModel):
    """Wraps a chat model: its traced inputs hold image references, the wrapped model gets bytes.

    The wrapped model's ``_generate``/``_agenerate`` is called directly, so no traced run ever
    carries the base64 payload; usage and output are reported on this wrapper's run.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseChatModel
    store: ImageStorage

    @property
    def _llm_type(self) -> str:
        return self.inner._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.inner._identifying_params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self.inner._generate(
            inline_images(messages, self.store), stop=stop, run_manager=run_manager, **kwargs
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Reading image files must not block the event loop.
        inlined = await asyncio.to_thread(inline_images, messages, self.store)
        return await self.inner._agenerate(inlined, stop=stop, run_manager=run_manager, **kwargs)
