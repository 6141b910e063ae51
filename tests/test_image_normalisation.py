"""User images are normalised once, when stored: what the models see is what the page shows.

Every hostile image is built here with Pillow. The checks read the stored image (its ref and
pixels), the bytes the scripted planner and critic receive, and the HTML page's data URIs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from PIL import Image

from conftest import RecordingGenerator, scripted
from interleave_thinker.context import Backends
from interleave_thinker.errors import ImageError
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import arun
from interleave_thinker.state import ImageRef, RunOptions
from interleave_thinker.storage import image_store
from interleave_thinker.storage.image_store import ImageStore, normalise_input
from interleave_thinker.workspace import RUN_DIR_ENV, store_input_images

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
ORIENTATION = 0x0112


def _saved(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _red_left_blue_right(width: int = 40, height: int = 20) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def _rotated_jpeg(orientation: int = 6) -> bytes:
    """A 40x20 JPEG (red left, blue right) whose EXIF says: turn 90 degrees clockwise to view."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _saved(_red_left_blue_right(), "JPEG", quality=95, exif=exif.tobytes())


def _sixteen_bit_gradient() -> bytes:
    image = Image.new("I;16", (256, 4))
    image.putdata([x * 257 for x in range(256)] * 4)
    data = _saved(image, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode in ("I;16", "I") and check.getextrema() == (0, 65535)
    return data


def _hidden_colour_png() -> bytes:
    """RGBA: fully transparent red on the left (a hidden colour), half-transparent green in the
    middle, opaque blue on the right."""
    image = Image.new("RGBA", (30, 10), (255, 0, 0, 0))
    image.paste((0, 255, 0, 128), (10, 0, 20, 10))
    image.paste((0, 0, 255, 255), (20, 0, 30, 10))
    return _saved(image, "PNG")


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    return _saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _header_only_png(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming ``width`` x ``height``, and a few bytes of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _stored(tmp_path: Path, data: bytes) -> tuple[ImageRef, Image.Image, bytes]:
    path = tmp_path / "input.img"
    path.write_bytes(data)
    store = ImageStore(tmp_path / "images")
    [ref] = store_input_images(store, [path])
    stored = store.read(ref)
    image = Image.open(io.BytesIO(stored))
    image.load()
    return ref, image, stored


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# --- Each kind of image, stored ----------------------------------------------------------------


def test_exif_rotation_is_applied_when_stored(tmp_path: Path) -> None:
    data = _rotated_jpeg(6)
    ref, image, stored = _stored(tmp_path, data)
    # Turned clockwise: the left (red) half is now on top, 20 wide and 40 high.
    assert (ref.width, ref.height) == image.size == (20, 40)
    assert _close(image.getpixel((10, 5)), RED) and _close(image.getpixel((10, 35)), BLUE)
    # A photo stays a JPEG, with no orientation left to apply twice.
    assert ref.media_type == "image/jpeg" and image.format == "JPEG" and image.mode == "RGB"
    assert image.getexif().get(ORIENTATION) is None
    assert stored != data


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 7, 8])
def test_every_exif_orientation_is_applied(orientation: int) -> None:
    checked = normalise_input(_rotated_jpeg(orientation))
    expected = (20, 40) if orientation in (5, 6, 7, 8) else (40, 20)
    assert (checked.width, checked.height) == expected
    with Image.open(io.BytesIO(checked.data)) as image:
        assert image.size == expected and image.getexif().get(ORIENTATION) is None


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    ref, image, _ = _stored(tmp_path, _sixteen_bit_gradient())
    assert ref.media_type == "image/png" and image.mode == "RGB" and image.size == (256, 4)
    # Before: every value over 255 became white. Now 0..65535 maps to 0..255 exactly.
    assert [image.getpixel((x, 2)) for x in (0, 1, 64, 128, 255)] == [
        (0, 0, 0), (1, 1, 1), (64, 64, 64), (128, 128, 128), (255, 255, 255)
    ]


def test_sixteen_bit_greyscale_colour_key_is_composited_on_white() -> None:
    image = Image.new("I;16", (4, 1))
    image.putdata([1000, 30000, 30000, 1000])
    checked = normalise_input(_saved(image, "PNG", transparency=30000))
    with Image.open(io.BytesIO(checked.data)) as stored:
        assert [stored.getpixel((x, 0)) for x in range(4)] == [(4, 4, 4), WHITE, WHITE, (4, 4, 4)]


def test_hidden_colour_under_transparency_becomes_white(tmp_path: Path) -> None:
    ref, image, _ = _stored(tmp_path, _hidden_colour_png())
    assert ref.media_type == "image/png" and image.mode == "RGB"
    assert "transparency" not in image.info
    assert image.getpixel((5, 5)) == WHITE  # the red under alpha 0 is gone
    assert _close(image.getpixel((15, 5)), (127, 255, 127), 2)  # half green on white
    assert image.getpixel((25, 5)) == BLUE


@pytest.mark.parametrize("kind", ["palette", "greyscale-alpha", "rgb-colour-key", "grey-colour-key"])
def test_other_transparency_is_composited_on_white(kind: str) -> None:
    if kind == "palette":
        image = Image.new("P", (4, 1))
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image.putdata([0, 1, 1, 0])
        data = _saved(image, "PNG", transparency=0)
        expected = [WHITE, BLUE, BLUE, WHITE]
    elif kind == "greyscale-alpha":
        image = Image.new("LA", (4, 1))
        image.putdata([(0, 0), (50, 255), (50, 255), (0, 0)])
        data = _saved(image, "PNG")
        expected = [WHITE, (50, 50, 50), (50, 50, 50), WHITE]
    elif kind == "rgb-colour-key":
        image = Image.new("RGB", (4, 1), RED)
        image.putpixel((1, 0), BLUE)
        data = _saved(image, "PNG", transparency=RED)
        expected = [WHITE, BLUE, WHITE, WHITE]
    else:
        image = Image.new("L", (4, 1), 7)
        image.putpixel((2, 0), 90)
        data = _saved(image, "PNG", transparency=7)
        expected = [WHITE, WHITE, (90, 90, 90), WHITE]
    checked = normalise_input(data)
    with Image.open(io.BytesIO(checked.data)) as stored:
        assert stored.mode == "RGB" and "transparency" not in stored.info
        assert [stored.getpixel((x, 0)) for x in range(4)] == expected


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_are_refused_like_gif(fmt: str, tmp_path: Path) -> None:
    data = _animated(fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    path = tmp_path / "moving.img"
    path.write_bytes(data)
    store = ImageStore(tmp_path / "images")
    name = {"PNG": "PNG", "WEBP": "WebP"}[fmt]
    with pytest.raises(ImageError, match=f"is an animated {name} \\(3 frames\\)") as info:
        store_input_images(store, [path])
    assert "still" in info.value.hint
    assert not list((tmp_path / "images").rglob("*.*"))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_single_frame_png_or_webp_is_accepted(fmt: str) -> None:
    data = _saved(_red_left_blue_right(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    checked = normalise_input(data)
    assert checked.data == data and (checked.width, checked.height) == (40, 20)


def test_a_phone_mpo_is_its_first_picture_not_an_animation() -> None:
    photo, preview = _red_left_blue_right(), Image.new("RGB", (10, 5), "green")
    try:
        data = _saved(photo, "MPO", save_all=True, append_images=[preview])
    except (KeyError, OSError, ValueError) as exc:  # a Pillow that cannot write MPO
        pytest.skip(f"Pillow cannot write MPO here: {exc}")
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "MPO" and check.n_frames == 2
    checked = normalise_input(data)
    assert checked.data == data and checked.media_type == "image/jpeg"
    assert (checked.width, checked.height) == (40, 20)


@pytest.mark.parametrize(
    "size",
    [(9_000, 9_000),  # 81 million: over ours, under Pillow's warning (89 million)
     (20_000, 20_000),  # 400 million: over Pillow's error limit (179 million)
     (100_000, 100_000)],
)
def test_pixel_limit_message_names_our_64_megapixels(size: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_header_only_png(*size))
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        store_input_images(ImageStore(tmp_path / "images"), [path])
    assert time.perf_counter() - started < 2  # measured on the header; nothing decoded
    message = info.value.message
    assert f"{size[0]}x{size[1]} pixels" in message and "64-megapixel limit" in message
    assert str(image_store.MAX_IMAGE_PIXELS) in message
    assert "89478485" not in message and "178956970" not in message
    assert "decompression bomb" not in message.lower()
    assert "64 megapixels" in info.value.hint
    # Generator outputs are checked by the same code and get the same message.
    with pytest.raises(ImageError, match="64-megapixel limit"):
        image_store.check_image(_header_only_png(*size))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    data = _saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    ref, image, _ = _stored(tmp_path, data)
    assert ref.media_type == "image/jpeg" and image.mode == "RGB"
    assert _close(image.getpixel((8, 8)), RED, 16)


@pytest.mark.parametrize("mode", ["P", "L", "1"])
def test_palette_and_greyscale_become_rgb(mode: str) -> None:
    source = _red_left_blue_right().convert(mode)
    checked = normalise_input(_saved(source, "PNG"))
    with Image.open(io.BytesIO(checked.data)) as stored:
        assert stored.mode == "RGB" and stored.size == (40, 20)
        assert stored.tobytes() == source.convert("RGB").tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_upright_8_bit_rgb_image_keeps_its_bytes_and_hash(fmt: str, tmp_path: Path) -> None:
    # An EXIF orientation of 1 ("as stored") and other metadata change nothing.
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    data = _saved(_red_left_blue_right(), fmt, exif=exif.tobytes())
    ref, _, stored = _stored(tmp_path, data)
    assert stored == data and ref.sha256 == hashlib.sha256(data).hexdigest()


def test_normalising_twice_changes_nothing() -> None:
    for data in (_rotated_jpeg(), _sixteen_bit_gradient(), _hidden_colour_png()):
        once = normalise_input(data)
        assert normalise_input(once.data) == once


def test_a_normalised_image_over_the_byte_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # One bit per pixel becomes 24: a 1-bit noise PNG grows many times over as RGB.
    data = _saved(Image.frombytes("1", (256, 256), bytes(range(256)) * 32), "PNG")
    monkeypatch.setattr(image_store, "MAX_IMAGE_BYTES", len(data) + 10)
    with pytest.raises(ImageError, match="once made 8-bit RGB and saved as PNG, over the"):
        normalise_input(data, what="input image x.png")


# --- What the models see and what the page shows -------------------------------------------------


def _images_in(messages: list[BaseMessage]) -> list[bytes]:
    found = []
    for message in messages:
        if isinstance(message.content, list):
            found += [base64.b64decode(block["base64"]) for block in message.content
                      if isinstance(block, dict) and block.get("type") == "image"
                      and "base64" in block]
    return found


def _page_images(html: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r'src="data:image/[a-z]+;base64,([^"]+)"', html)]


HOSTILE: dict[str, Callable[[], bytes]] = {
    "exif-rotated-jpeg": _rotated_jpeg,
    "16-bit-png": _sixteen_bit_gradient,
    "hidden-colour-png": _hidden_colour_png,
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_planner_critic_and_page_all_get_the_normalised_image(
    name: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.img"
    path.write_bytes(HOSTILE[name]())
    planner = scripted(lambda messages: StandInPlannerModel()._reply(messages), "planner")
    critic = scripted(lambda messages: StandInCriticModel()._reply(messages), "critic")
    result = await arun(
        "Make it brighter.", images=[path],
        backends=Backends(planner=planner, critic=critic, generator=RecordingGenerator()),
        options=RunOptions(width=32, height=32), run_dir=tmp_path / "runs",
    )
    [ref] = result.document.request.images
    stored = ImageStore(tmp_path / "runs" / "images").read(ref)
    assert stored != path.read_bytes()
    with Image.open(io.BytesIO(stored)) as image:
        assert image.mode == "RGB" and "transparency" not in image.info
        assert image.getexif().get(ORIENTATION) is None
        if name == "exif-rotated-jpeg":
            assert image.size == (20, 40) and _close(image.getpixel((10, 5)), RED)
        elif name == "16-bit-png":
            assert image.getpixel((128, 0)) == (128, 128, 128)
        else:
            assert image.getpixel((5, 5)) == WHITE
    # The planner gets the stored bytes; the critic judges step 2 against them.
    assert _images_in(planner.calls[0]) == [stored]
    assert stored in [image for call in critic.calls for image in _images_in(call)]
    # The page shows the same bytes.
    page = result.document_path.read_text(encoding="utf-8")
    assert _page_images(page)[0] == stored


async def test_server_upload_is_normalised(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    import httpx

    from interleave_thinker import server

    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))
    transport = httpx.ASGITransport(app=server.make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        uploaded = await http.post("/interleave/images", content=_rotated_jpeg())
        assert uploaded.status_code == 201, uploaded.text
        ref = uploaded.json()
        assert (ref["width"], ref["height"], ref["media_type"]) == (20, 40, "image/jpeg")
        served = await http.get(f"/interleave/images/{ref['sha256']}")
        assert hashlib.sha256(served.content).hexdigest() == ref["sha256"]
        with Image.open(io.BytesIO(served.content)) as image:
            assert image.size == (20, 40) and _close(image.getpixel((10, 5)), RED)
        refused = await http.post("/interleave/images", content=_animated("PNG"))
        assert refused.status_code == 400 and "animated PNG" in refused.json()["detail"]
        gif = await http.post("/interleave/images", content=_saved(Image.new("RGB", (4, 4)), "GIF"))
        assert gif.status_code == 400 and "is a GIF image" in gif.json()["detail"]


async def test_the_agent_tool_stores_its_images_normalised(tmp_path: Path) -> None:
    from interleave_thinker.tools.agent_tool import create_interleave_tool

    path = tmp_path / "photo.jpg"
    path.write_bytes(_rotated_jpeg())
    tool = create_interleave_tool(profile="test", options=RunOptions(width=32, height=32),
                                  run_dir=tmp_path / "runs")
    text = await tool.ainvoke({"request": "Make it brighter.", "images": [str(path)]})
    [line] = [line for line in text.splitlines() if line.startswith("Input image 1:")]
    assert line.endswith(" 20x40]"), line
    sha256 = line.split("sha256=")[1].split()[0]
    ref = ImageStore(tmp_path / "runs" / "images").find(sha256)
    assert (ref.width, ref.height, ref.media_type) == (20, 40, "image/jpeg")
