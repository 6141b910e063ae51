"""Input images for the tools and the Python API: file paths, sha256 references and data URLs."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolCall, ToolMessage
from PIL import Image

from interleave_thinker import (
    Document,
    ImageError,
    ImageRef,
    ImageStore,
    RunOptions,
    create_interleave_tool,
    make_context,
    make_input,
)
from interleave_thinker.generators.stand_in import StandInImageGenerator
from interleave_thinker.tools.generator_tool import GenerateImageTool
from interleave_thinker.workspace import resolve_input_image

TINY = RunOptions(width=32, height=32)


def png(color: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _call(request: str, call_id: str, **args: Any) -> ToolCall:
    return ToolCall(name="interleave_document", args={"request": request, **args}, id=call_id,
                    type="tool_call")


def test_each_form_names_the_same_stored_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    data = png("navy")
    photo = tmp_path / "desk.png"
    photo.write_bytes(data)
    from_path, shown = resolve_input_image(store, str(photo))
    assert shown == str(photo)
    assert resolve_input_image(store, photo)[0] == from_path  # a Path works too
    from_url, shown = resolve_input_image(store, data_url(data))
    assert from_url == from_path and shown == f"a data URL of {len(data)} bytes"
    for reference in (f"sha256:{from_path.sha256}", from_path.sha256):
        ref, shown = resolve_input_image(store, reference)
        assert ref == from_path and shown == f"sha256:{from_path.short}"
    with pytest.raises(ImageError, match="is not an image hash"):  # hashes are lower case
        resolve_input_image(store, from_path.sha256.upper())
    assert resolve_input_image(store, from_path)[0] == from_path  # an ImageRef


def test_a_stored_image_with_transparency_is_made_rgb_as_an_input(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    drawn = store.put(png("red", mode="RGBA"))
    as_input, _ = resolve_input_image(store, f"sha256:{drawn.sha256}")
    assert as_input != drawn and store.open(as_input).mode == "RGB"
    # An edit's source is used as stored.
    assert resolve_input_image(store, drawn.sha256, normalise=False)[0] == drawn


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("sha256:" + "0" * 64, "no image 000000000000"),
        ("nope.png", "nope.png does not exist"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png,rawtext", "without base64"),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a....").decode(), "GIF"),
        (ImageRef(sha256="1" * 64, media_type="image/png", width=2, height=2), "is not in"),
    ],
    ids=["unknown-hash", "missing-file", "bad-base64", "not-base64", "gif", "unknown-ref"],
)
def test_unusable_images_are_refused_by_name(tmp_path: Path, given: Any, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        resolve_input_image(ImageStore(tmp_path / "images"), given)


async def test_agent_tool_builds_on_an_earlier_calls_image_by_hash(tmp_path: Path) -> None:
    run_dir, checkpointer = tmp_path / "runs", f"memory://{uuid.uuid4().hex}"
    tool = create_interleave_tool(profile="test", options=TINY, run_dir=run_dir,
                                  checkpointer=checkpointer)
    first = await tool.ainvoke(_call("A red kite. It rises.", "call_1"))
    document: Document = first.artifact
    last = document.steps[-1].image
    assert last is not None
    photo = tmp_path / "desk.png"
    photo.write_bytes(png("navy"))
    url_image = png("green", (20, 20))

    second = await tool.ainvoke(_call(
        "Put the kite on the desk. Add grass.", "call_2",
        images=[f"sha256:{last.sha256}", str(photo), data_url(url_image)],
    ))
    assert isinstance(second, ToolMessage) and second.status == "success", second.content
    used = second.artifact.request.images
    assert used[0].sha256 == last.sha256  # the drawn image is already RGB
    content = second.content
    # The reply says which image each input became, never repeating a payload.
    assert f"Input image 1: [image sha256={last.sha256} 32x32]\n" in content
    assert f"Input image 2: [image sha256={used[1].sha256} 40x30]\n" in content
    assert f"Input image 3: [image sha256={used[2].sha256} 20x20]\n" in content
    assert (f"Input images as given: 1. sha256:{last.short}; 2. {photo}; "
            f"3. a data URL of {len(url_image)} bytes\n") in content
    assert "base64" not in content


async def test_agent_tool_reports_a_bad_image_to_the_model(tmp_path: Path) -> None:
    tool = create_interleave_tool(profile="test", options=TINY, run_dir=tmp_path / "runs",
                                  checkpointer=f"memory://{uuid.uuid4().hex}")
    for image, message in [("sha256:" + "a" * 64, "input image 1: no image aaaaaaaaaaaa"),
                           ("data:image/png;base64,!!", "not valid base64")]:
        reply = await tool.ainvoke(_call("A kite.", f"call-{len(image)}", images=[image]))
        assert reply.status == "error" and message in reply.content, reply.content


def test_generator_tool_takes_paths_hashes_and_data_urls(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    tool = GenerateImageTool(generator=StandInImageGenerator(), image_store=store)
    drawn = tool.invoke(ToolCall(name=tool.name, args={"prompt": "a boat", "width": 40, "height": 24},
                                 id="1", type="tool_call")).artifact
    photo = tmp_path / "sea.png"
    photo.write_bytes(png("blue"))
    sketch = png("white", (16, 16))
    message = tool.invoke(ToolCall(
        name=tool.name,
        args={"prompt": "the boat on the sea", "width": 40, "height": 24,
              "source_images": [f"sha256:{drawn.sha256}", str(photo), data_url(sketch)]},
        id="2", type="tool_call"))
    content = message.content
    assert content.startswith("Edited") and message.artifact != drawn
    photo_ref = store.put_input(photo.read_bytes())
    sketch_ref = store.put_input(sketch)
    assert f"1. sha256 {drawn.sha256};" in content
    assert f"2. sha256 {photo_ref.sha256} (given as {photo})" in content
    assert f"3. sha256 {sketch_ref.sha256} (given as a data URL of {len(sketch)} bytes)" in content
    assert "base64," not in content


async def test_make_input_takes_every_form(tmp_path: Path) -> None:
    context = make_context(tmp_path / "runs", profile="test")
    photo = tmp_path / "desk.png"
    photo.write_bytes(png("navy"))
    stored = context.image_store.put_input(png("olive"))
    graph_input = make_input("Tidy the desk.", context=context, options=TINY,
                             images=[photo, data_url(png("teal")), f"sha256:{stored.sha256}", stored])
    images = graph_input["request"].images
    assert len(images) == 4 and images[2] == images[3] == stored
    assert all(context.image_store.contains(ref) for ref in images)
