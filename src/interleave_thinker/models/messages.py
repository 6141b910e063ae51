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


def image_data_block(store: ImageStorage, ref: ImageRef) -> dict[str, Any]:
    """A standard ``image`` block carrying the verified bytes of ``ref`` as base64."""
    return _data_block(ref, store.as_base64(ref), {})


def inline_images(messages: Sequence[BaseMessage], store: ImageStorage) -> list[BaseMessage]:
    """Copies of ``messages`` with every reference block replaced by a base64 block."""
    return [_inline_message(message, store) for message in messages]


def inline_from_memory(messages: Sequence[BaseMessage], store: ImageStorage) -> list[BaseMessage] | None:
    """:func:`inline_images` when every image the messages name is in ``store``'s memory cache
    (then no file is read, so the event loop may do it); None as soon as one is not."""
    inlined: list[BaseMessage] = []
    for message in messages:
        if not isinstance(message.content, list):
            inlined.append(message)
            continue
        blocks = []
        for block in message.content:
            if _is_reference(block):
                kept = store.cached_base64(block["file_id"].removeprefix(REF_PREFIX))
                if kept is None:
                    return None
                block = _data_block(kept[0], kept[1], block)
            blocks.append(block)
        inlined.append(message.model_copy(update={"content": blocks}))
    return inlined


def _is_reference(block: Any) -> bool:
    if not (isinstance(block, dict) and block.get("type") == "image"):
        return False
    file_id = block.get("file_id")
    return isinstance(file_id, str) and file_id.startswith(REF_PREFIX)


def _inline_message(message: BaseMessage, store: ImageStorage) -> BaseMessage:
    if not isinstance(message.content, list):
        return message
    blocks = [_inline_block(block, store) for block in message.content]
    return message.model_copy(update={"content": blocks})


def _inline_block(block: Any, store: ImageStorage) -> Any:
    if not _is_reference(block):
        return block
    sha256 = block["file_id"].removeprefix(REF_PREFIX)
    ref = store.recent(sha256) or store.find(sha256)
    return _data_block(ref, store.as_base64(ref), block)


def _data_block(ref: ImageRef, encoded: str, reference: dict[str, Any]) -> dict[str, Any]:
    """The base64 block that replaces ``reference``; layout hints the prompt pack set
    (max_pixels) travel with the bytes."""
    hints = {key: value for key, value in reference.items() if key == "max_pixels"}
    return {"type": "image", "base64": encoded, "mime_type": ref.media_type, **hints}


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
        # Reading image files must not block the event loop; images this process has just
        # stored are inlined from memory, with no worker thread to wait for.
        inlined = inline_from_memory(messages, self.store)
        if inlined is None:
            inlined = await asyncio.to_thread(inline_images, messages, self.store)
        return await self.inner._agenerate(inlined, stop=stop, run_manager=run_manager, **kwargs)
