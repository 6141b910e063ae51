"""Image references in chat messages become base64 only below the traced call, and without a
worker thread when the images are in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import Field

from interleave_thinker.models import messages as messages_module
from interleave_thinker.models.messages import ImageInliningChatModel, image_block
from interleave_thinker.storage.image_store import ImageStore


class RecordingChat(BaseChatModel):
    """Answers "ok" and keeps the messages it was given."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "recording"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.seen.append(messages)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="ok"))])


def _question(*refs: Any) -> list[BaseMessage]:
    blocks: list[Any] = [{"type": "text", "text": "same?"}]
    blocks += [image_block(ref) | {"max_pixels": 1024} for ref in refs]
    return [HumanMessage(content=blocks)]


@pytest.mark.parametrize("in_memory", [True, False], ids=["just-stored", "read-from-disk"])
def test_images_in_memory_are_inlined_on_the_loop_others_in_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_memory: bool
) -> None:
    drawn = ImageStore(tmp_path / "images")
    first = drawn.put_image(Image.new("RGB", (40, 30), (10, 20, 30)))
    second = drawn.put_image(Image.new("RGB", (40, 30), (30, 20, 10)))
    # Another process's view of the same folder: its images are only on disk.
    store = drawn if in_memory else ImageStore(tmp_path / "images" / ".." / "images")
    assert (store.recent(first.sha256) is not None) is in_memory
    threads: list[Any] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(func)
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(messages_module.asyncio, "to_thread", counting_to_thread)
    inner = RecordingChat(seen=[])
    model = ImageInliningChatModel(inner=inner, store=store)
    reply = asyncio.run(model.ainvoke(_question(first, second)))
    assert reply.content == "ok"
    assert len(threads) == (0 if in_memory else 1)
    (given,) = inner.seen
    blocks = given[0].content
    assert isinstance(blocks, list)
    for block, ref in zip(blocks[1:], (first, second), strict=True):
        assert block == {"type": "image", "base64": drawn.as_base64(ref), "mime_type": "image/png",
                         "max_pixels": 1024}
