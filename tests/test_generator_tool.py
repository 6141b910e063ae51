"""The generator tool passes LangChain's standard tool tests and draws and edits through the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import ToolCall
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from interleave_thinker.errors import ImageError
from interleave_thinker.generators.stand_in import StandInImageGenerator
from interleave_thinker.state import ImageRef
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.tools.generator_tool import GenerateImageTool


class _ToolSetup:
    @property
    def tool_constructor(self) -> type[GenerateImageTool]:
        return GenerateImageTool

    @property
    def tool_constructor_params(self) -> dict:
        return {"generator": StandInImageGenerator(), "image_store": ImageStore(self.store_root)}

    @property
    def tool_invoke_params_example(self) -> dict:
        return {"prompt": "a paper boat", "seed": 3, "width": 32, "height": 32}

    @pytest.fixture(autouse=True)
    def _store_root(self, tmp_path: Path) -> None:
        self.store_root = tmp_path / "images"


class TestGeneratorToolUnit(_ToolSetup, ToolsUnitTests):
    pass


class TestGeneratorToolIntegration(_ToolSetup, ToolsIntegrationTests):
    pass


def _tool(tmp_path: Path) -> GenerateImageTool:
    return GenerateImageTool(generator=StandInImageGenerator(), image_store=ImageStore(tmp_path))


async def test_tool_call_returns_reference_artifact_and_edits_by_hash(tmp_path: Path) -> None:
    tool = _tool(tmp_path)
    call = ToolCall(name=tool.name, args={"prompt": "a boat", "width": 40, "height": 24},
                    id="1", type="tool_call")
    message = await tool.ainvoke(call)
    ref = message.artifact
    assert isinstance(ref, ImageRef) and (ref.width, ref.height) == (40, 24)
    assert ref.sha256 in message.content and "base64" not in str(message.content)
    assert tool.image_store.contains(ref)
    edit = await tool.ainvoke(ToolCall(
        name=tool.name, args={"prompt": "add a sail", "source_images": [ref.sha256],
                              "width": 40, "height": 24}, id="2", type="tool_call"))
    assert edit.content.startswith("Edited") and edit.artifact != ref
    # Same arguments, same image: the tool is as deterministic as its backend.
    again = tool.invoke({"prompt": "a boat", "width": 40, "height": 24})
    assert again == message.content


def test_unknown_or_malformed_source_hash_is_refused(tmp_path: Path) -> None:
    tool = _tool(tmp_path)
    with pytest.raises(ImageError, match="no image"):
        tool.invoke({"prompt": "x", "source_images": ["0" * 64]})
    with pytest.raises(ImageError, match="not an image hash"):
        tool.invoke({"prompt": "x", "source_images": ["../../etc/passwd"]})
