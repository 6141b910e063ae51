"""The content-addressed image store: round trips, integrity, unsafe input and atomic writes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from interleave_thinker.errors import ImageError
from interleave_thinker.state import ImageRef
from interleave_thinker.storage import atomic, image_store
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.storage.image_store import (
    MAX_IMAGE_PIXELS,
    ImageStore,
    blank_canvas,
    inspect_image,
)

GOOD_SHA = "a" * 64


def encoded(fmt: str, size: tuple[int, int] = (7, 5), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def handmade_png(width: int, height: int, *, bit_depth: int = 1, idat: bytes | None = None) -> bytes:
    """A grayscale PNG with the given header; by default its IDAT holds all-zero rows."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    if idat is None:
        row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
        idat = zlib.compress(row * height, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.mark.parametrize(
    ("fmt", "media_type", "suffix"),
    [("PNG", "image/png", ".png"), ("JPEG", "image/jpeg", ".jpg"),
     ("WEBP", "image/webp", ".webp")],
)
def test_put_then_read_round_trips(
    store: ImageStore, fmt: str, media_type: str, suffix: str
) -> None:
    data = encoded(fmt)
    ref = store.put(data)
    digest = hashlib.sha256(data).hexdigest()
    assert ref == ImageRef(sha256=digest, media_type=media_type, width=7, height=5)
    assert store.read(ref) == data
    assert store.contains(ref)
    assert store.path_for(ref) == store.root / digest[:2] / f"{digest}{suffix}"
    assert files_under(store.root) == [store.path_for(ref)]
    with store.open(ref) as image:
        assert image.size == (7, 5)


def test_same_bytes_are_stored_once(store: ImageStore) -> None:
    data = encoded("PNG")
    first = store.put(data)
    second = store.put(data)
    assert first == second
    assert len(files_under(store.root)) == 1
    other = store.put(encoded("PNG", color="blue"))
    assert other != first
    assert len(files_under(store.root)) == 2


def test_put_image_stores_png(store: ImageStore) -> None:
    ref = store.put_image(Image.new("L", (3, 4), 128))
    assert (ref.media_type, ref.width, ref.height) == ("image/png", 3, 4)
    with store.open(ref) as image:
        assert image.mode == "RGB"
        assert image.getpixel((0, 0)) == (128, 128, 128)


def test_tampered_file_is_refused_naming_the_hash(store: ImageStore) -> None:
    data = encoded("PNG")
    ref = store.put(data)
    path = store.path_for(ref)
    path.write_bytes(encoded("PNG", color="green"))
    with pytest.raises(ImageError) as info:
        store.read(ref)
    assert ref.short in str(info.value)
    assert "changed or damaged" in str(info.value)
    assert info.value.hint
    assert not store.contains(ref)
    # Storing the same bytes again repairs the damaged file.
    assert store.put(data) == ref
    assert store.read(ref) == data


def test_missing_file_is_refused_with_a_hint(store: ImageStore) -> None:
    ref = store.put(encoded("PNG"))
    store.path_for(ref).unlink()
    with pytest.raises(ImageError) as info:
        store.read(ref)
    assert ref.short in str(info.value)
    assert "missing" in str(info.value)
    assert "--run-dir" in info.value.hint
    assert not store.contains(ref)


@pytest.mark.parametrize(
    "digest",
    [
        "../../etc/passwd",
        "../" + "a" * 61,
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "a" * 64 + "\n",
        "",
    ],
)
def test_image_ref_refuses_anything_but_a_lowercase_sha256(digest: str) -> None:
    with pytest.raises(ValidationError, match="64 lowercase hexadecimal"):
        ImageRef(sha256=digest, media_type="image/png", width=1, height=1)


@pytest.mark.parametrize("media_type", ["image/gif", "image/png/../../x", "", "IMAGE/PNG"])
def test_image_ref_refuses_unknown_media_types(media_type: str) -> None:
    with pytest.raises(ValidationError, match="media type"):
        ImageRef(sha256=GOOD_SHA, media_type=media_type, width=1, height=1)


def test_image_ref_refuses_a_path_in_json(store: ImageStore) -> None:
    # A reference read back from a file or checkpoint is validated the same way.
    with pytest.raises(ValidationError):
        ImageRef.model_validate_json(
            '{"sha256": "../../etc/passwd", "media_type": "image/png", "width": 1, "height": 1}'
        )


@pytest.mark.parametrize("size", [(0, 1), (1, 0), (-1, 5)])
def test_image_ref_refuses_empty_sizes(size: tuple[int, int]) -> None:
    with pytest.raises(ValidationError):
        ImageRef(sha256=GOOD_SHA, media_type="image/png", width=size[0], height=size[1])


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_unsupported_format_is_refused_by_name(store: ImageStore, fmt: str) -> None:
    with pytest.raises(ImageError, match=rf"\b{fmt}\b.*not PNG, JPEG or WebP") as info:
        store.put(encoded(fmt), what="input image 1")
    assert "input image 1" in str(info.value)
    assert files_under(store.root) == []


@pytest.mark.parametrize(
    "data",
    [
        encoded("PNG", size=(64, 64))[:-40],  # cut inside the image data
        encoded("PNG")[:30],  # only the signature and part of the header
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        handmade_png(4, 4, idat=b"not zlib data at all"),
        b"",
        b"plain text, not an image",
    ],
    ids=["truncated-data", "truncated-header", "zeroed", "bad-idat", "empty", "text"],
)
def test_corrupt_bytes_are_refused(store: ImageStore, data: bytes) -> None:
    with pytest.raises(ImageError, match="could not be decoded") as info:
        store.put(data)
    assert info.value.hint
    # Pillow's own words for unknown data name a buffer object: never shown to the user.
    assert "BytesIO" not in info.value.message
    assert files_under(store.root) == []


def test_handmade_png_helper_is_valid() -> None:
    # Guards the bomb tests below: the helper builds PNGs that decode when small.
    assert inspect_image(handmade_png(16, 8)) == ("image/png", 16, 8)


def test_decompression_bomb_header_is_refused_fast(store: ImageStore) -> None:
    # 100000 x 100000 pixels claimed by a file of a few dozen bytes.
    data = handmade_png(100_000, 100_000, idat=zlib.compress(b"\x00" * 16))
    assert len(data) < 100
    started = time.perf_counter()
    # Our limit is quoted, not Pillow's (its bomb error would name 178956970 pixels).
    with pytest.raises(ImageError, match=r"100000x100000 pixels .* over the 64-megapixel limit"):
        store.put(data)
    assert time.perf_counter() - started < 1.0
    assert files_under(store.root) == []


def test_image_over_our_pixel_limit_is_refused_before_decoding(store: ImageStore) -> None:
    # 9000 x 9000 is under Pillow's own bomb limit but over ours, and decodes fine otherwise.
    width = height = 9000
    assert width * height > MAX_IMAGE_PIXELS
    assert width * height < Image.MAX_IMAGE_PIXELS
    data = handmade_png(width, height)
    assert len(data) < 100_000
    started = time.perf_counter()
    expected = f"9000x9000 pixels (81 million), over the 64-megapixel limit ({MAX_IMAGE_PIXELS} pixels)"
    with pytest.raises(ImageError, match=re.escape(expected)):
        store.put(data)
    assert time.perf_counter() - started < 1.0
    assert files_under(store.root) == []


def test_oversized_bytes_are_refused(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded("PNG")
    monkeypatch.setattr(image_store, "MAX_IMAGE_BYTES", len(data) - 1)
    with pytest.raises(ImageError, match=f"{len(data)} bytes, over the {len(data) - 1} byte"):
        store.put(data)
    assert files_under(store.root) == []
    monkeypatch.setattr(image_store, "MAX_IMAGE_BYTES", len(data))
    assert store.read(store.put(data)) == data


def _crash(*args: object, **kwargs: object) -> None:
    raise OSError("simulated crash")


@pytest.mark.parametrize("step", ["replace", "fsync"])
def test_crash_during_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    target = tmp_path / "ab" / "target.png"
    monkeypatch.setattr(os, step, _crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_atomically(target, b"payload")
    monkeypatch.undo()
    assert not target.exists()
    assert files_under(tmp_path) == []


def test_crash_during_overwrite_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target.png"
    write_atomically(target, b"old whole file")
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError):
        write_atomically(target, b"new file")
    monkeypatch.undo()
    assert target.read_bytes() == b"old whole file"
    assert files_under(tmp_path) == [target]


def test_crash_inside_put_leaves_the_store_empty(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encoded("PNG")
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError):
        store.put(data)
    monkeypatch.undo()
    assert files_under(store.root) == []
    ref = store.put(data)
    assert store.read(ref) == data


def test_write_atomically_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert files_under(tmp_path) == [target]


def test_blank_canvas_is_white_and_deterministic(tmp_path: Path) -> None:
    first_store = ImageStore(tmp_path / "one")
    ref = blank_canvas(first_store, 24, 16)
    assert (ref.media_type, ref.width, ref.height) == ("image/png", 24, 16)
    with first_store.open(ref) as image:
        assert image.size == (24, 16)
        assert image.convert("RGB").getcolors() == [(24 * 16, (255, 255, 255))]
    assert blank_canvas(first_store, 24, 16) == ref
    assert len(files_under(first_store.root)) == 1
    assert blank_canvas(ImageStore(tmp_path / "two"), 24, 16) == ref
    assert blank_canvas(first_store, 16, 24) != ref


def test_multi_picture_jpeg_from_a_phone_is_accepted_as_jpeg(store: ImageStore) -> None:
    buffer = io.BytesIO()
    left, right = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (20, 10), "blue")
    left.save(buffer, format="MPO", save_all=True, append_images=[right])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    ref = store.put(buffer.getvalue())
    assert (ref.media_type, ref.width, ref.height) == ("image/jpeg", 20, 10)


def test_written_files_get_the_mode_the_umask_allows_not_0600(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    atomic.write_atomically(tmp_path / "f.bin", b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_put_stages_writes_outside_the_hash_folders(store: ImageStore) -> None:
    ref = store.put(encoded("PNG"))
    assert files_under(store.root) == [store.path_for(ref)]
    assert store.staging.is_dir() and list(store.staging.iterdir()) == []


def test_sweep_removes_a_killed_writers_temp_file_and_keeps_a_live_ones(store: ImageStore) -> None:
    store.staging.mkdir(parents=True)
    host = atomic.host_name()
    dead = store.staging / f".tmp-{host}-{_dead_pid()}-abc123.png"
    live = store.staging / f".tmp-{host}-{os.getpid()}-def456.png"
    other_host = store.staging / f".tmp-elsewhere-{_dead_pid()}-ghi789.png"
    legacy = store.staging / ".tmp-k2j3h4.png"
    not_temp = store.staging / "notes.txt"
    for path in (dead, live, other_host, legacy, not_temp):
        path.write_bytes(b"half an image")

    assert store.sweep_abandoned_writes() == [dead]
    assert sorted(p.name for p in store.staging.iterdir()) == sorted(
        p.name for p in (live, other_host, legacy, not_temp)
    )

    # Files of other hosts or with old names go once they are older than the limit.
    old = time.time() - atomic.ABANDONED_AFTER_S - 60
    for path in (other_host, legacy):
        os.utime(path, (old, old))
    assert sorted(store.sweep_abandoned_writes()) == sorted([other_host, legacy])
    assert sorted(p.name for p in store.staging.iterdir()) == sorted([live.name, not_temp.name])


def test_sweep_of_a_store_never_written_is_a_no_op(tmp_path: Path) -> None:
    assert ImageStore(tmp_path / "nothing").sweep_abandoned_writes() == []


def test_a_write_killed_between_data_and_rename_is_swept_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    # A child process stops dead (os._exit skips every cleanup) right before the rename.
    code = (
        "import os, sys\n"
        "from interleave_thinker.storage.image_store import ImageStore\n"
        "os.replace = lambda *a, **k: os._exit(9)\n"
        "ImageStore(sys.argv[1]).put(bytes.fromhex(sys.argv[2]))\n"
    )
    root = tmp_path / "images"
    child = subprocess.run([sys.executable, "-c", code, str(root), encoded("PNG").hex()], check=False)
    assert child.returncode == 9
    store = ImageStore(root)
    leftovers = list(store.staging.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert store.sweep_abandoned_writes() == leftovers
    assert files_under(root) == []


def test_an_image_stored_here_is_inlined_from_memory_and_only_for_its_own_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The critic's message and the HTML page take a just-stored image's base64 from memory
    (no read, no second hash), but another store never sees an image it does not hold."""
    import base64

    store = ImageStore(tmp_path / "a")
    ref = store.put_image(Image.new("RGB", (48, 40), (200, 30, 30)))
    expected = base64.b64encode(store.path_for(ref).read_bytes()).decode("ascii")

    def no_read(*args: object) -> bytes:
        raise AssertionError("read from disk")

    monkeypatch.setattr(ImageStore, "read_path", no_read)
    assert store.as_base64(ref) == expected and store.recent(ref.sha256) == ref
    other = ImageStore(tmp_path / "b")
    assert other.recent(ref.sha256) is None
    monkeypatch.undo()
    with pytest.raises(ImageError, match="no image"):
        other.find(ref.sha256)


def test_the_inlining_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_store, "MAX_ENCODED_CHARS", 1)
    store = ImageStore(tmp_path)
    first = store.put_image(Image.new("RGB", (16, 16), (1, 2, 3)))
    second = store.put_image(Image.new("RGB", (16, 16), (4, 5, 6)))
    # Over the bound, only the newest is kept; the older one is read (and verified) again.
    assert store.recent(second.sha256) == second and store.recent(first.sha256) is None
    assert base64_of(store, first) == store.as_base64(first)


def base64_of(store: ImageStore, ref: ImageRef) -> str:
    import base64

    return base64.b64encode(store.read(ref)).decode("ascii")


def test_the_preview_of_an_image_stored_here_needs_no_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HTML page's thumbnails come from previews made while the pixels were at hand; an
    image stored elsewhere gets its preview from a decode, once."""
    store = ImageStore(tmp_path)
    ref = store.put_image(Image.new("RGB", (1024, 768), (10, 120, 30)))
    calls = []
    real_open = ImageStore.open

    def counting_open(self: ImageStore, wanted: ImageRef) -> Image.Image:
        calls.append(wanted.sha256)
        return real_open(self, wanted)

    monkeypatch.setattr(ImageStore, "open", counting_open)
    preview = store.preview(ref)
    # Reduced by a whole factor (3), so never under the 320 px the page shows at twice its size.
    assert (preview.width, preview.height) == (342, 256) and calls == []
    assert Image.open(io.BytesIO(preview.jpeg)).format == "JPEG"
    other = ImageStore(tmp_path / "copy")
    copied = other.put(store.read(ref))  # bytes only: no pixels at hand
    assert other.preview(copied) == other.preview(copied) and calls == [copied.sha256]


def test_the_base64_and_preview_are_made_while_the_image_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generated image's base64 text and preview are made on a worker thread during the write
    and sync, not after them: the write below waits for the worker to have started."""
    import threading

    started = threading.Event()
    real_derive, real_write = image_store._derive, image_store.write_atomically

    def derive(*args: object) -> object:
        started.set()
        return real_derive(*args)  # type: ignore[arg-type]

    def write(*args: object, **kwargs: object) -> None:
        assert started.wait(10), "nothing was derived while the image was being written"
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(image_store, "_derive", derive)
    monkeypatch.setattr(image_store, "write_atomically", write)
    store = ImageStore(tmp_path)
    ref = store.put_image(Image.new("RGB", (800, 600), (30, 60, 90)))
    monkeypatch.setattr(ImageStore, "read_path", lambda *args: pytest.fail("read from disk"))
    assert store.recent(ref.sha256) == ref
    assert (store.preview(ref).width, store.preview(ref).height) == (400, 300)


def test_an_image_whose_write_failed_is_never_found_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker made of an image is kept only once the image is stored: after a failed
    write the store neither claims the image nor serves its base64."""
    store = ImageStore(tmp_path)
    image = Image.new("RGB", (700, 500), (90, 10, 200))
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put_image(image)
    monkeypatch.undo()
    sha256 = image_store.png_image(image).sha256
    assert store.recent(sha256) is None
    with pytest.raises(ImageError, match="no image"):
        store.find(sha256)
    assert store.recent(store.put_image(image).sha256) is not None


def test_a_forked_child_stores_and_previews_with_its_own_workers(tmp_path: Path) -> None:
    """The worker threads are the parent's: a forked child (a DataLoader worker, a
    multiprocessing pool) starts its own instead of waiting for threads it does not have."""
    import multiprocessing

    store = ImageStore(tmp_path)
    store.put_image(Image.new("RGB", (640, 640), (1, 1, 1)))  # the parent's workers are running
    child = multiprocessing.get_context("fork").Process(target=_store_in_child, args=(tmp_path,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert len(files_under(tmp_path)) == 2


def _store_in_child(root: Path) -> None:
    store = ImageStore(root)
    ref = store.put_image(Image.new("RGB", (640, 640), (2, 2, 2)))
    assert store.recent(ref.sha256) == ref and store.preview(ref).width == 320
