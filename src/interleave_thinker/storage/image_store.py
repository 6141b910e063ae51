"""Content-addressed image files under the run directory: checked on the way in, verified on read."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from interleave_thinker.errors import ImageError
from interleave_thinker.state import MEDIA_SUFFIXES, SHA256_PATTERN, ImageRef
from interleave_thinker.storage.atomic import STAGING_DIR, sweep_abandoned_writes, write_atomically

# Phone cameras often write multi-picture JPEGs, which Pillow reports as MPO.
_PIL_MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
}

# Larger images are refused before decoding: a small file can claim billions of pixels.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MAX_IMAGE_BYTES = 64 * 1024 * 1024


# The signatures every PNG, JPEG and WebP file starts with, and some formats people try instead.
_ACCEPTED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_OTHER_FORMATS = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF-", "a PDF document"),
)


def not_an_image(data: bytes) -> str | None:
    """What is wrong when the bytes are no PNG, JPEG or WebP file, else None (decode them).

    Read from the first bytes only, so that a user's GIF, PDF or HTML page is named for what it
    is before any decoding; :func:`inspect_image` then decodes what passes.
    """
    if not data:
        return "is empty (0 bytes)"
    if data.startswith(_ACCEPTED_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    for signature, name in _OTHER_FORMATS:
        if data.startswith(signature):
            return f"is {name}, not PNG, JPEG or WebP"
    head = data[:1024].lstrip().lower()
    if b"<svg" in head:
        return "is an SVG file (vector graphics), not PNG, JPEG or WebP"
    if head.startswith((b"<!doctype html", b"<html")):
        return "is an HTML page, not PNG, JPEG or WebP"
    return "is not a PNG, JPEG or WebP file (its first bytes match none of them)"


def inspect_image(data: bytes, *, what: str = "image") -> tuple[str, int, int]:
    """Decode ``data`` fully and return (media type, width, height); raise ImageError if unusable."""
    image, media_type = _decode(data, what)
    with image:
        return media_type, image.width, image.height


def _decode(data: bytes, what: str) -> tuple[Image.Image, str]:
    """``data`` decoded (loaded) and its media type; raise ImageError if unusable.

    Our pixel limit is checked on the header, before Pillow's own (larger) one and before any
    pixel is decoded, so that the error quotes our limit. The caller closes the image.
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(
            f"{what} is {len(data)} bytes, over the {MAX_IMAGE_BYTES} byte limit",
            hint="resize or recompress the image",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_without_pillow_limit(data)
            try:
                _check_pixels(image.width, image.height, what)
                fmt = image.format or ""
                media_type = _PIL_MEDIA_TYPES.get(fmt)
                if media_type is None:
                    raise ImageError(
                        f"{what} is {fmt or 'an unknown format'}, not PNG, JPEG or WebP",
                        hint="convert it to PNG",
                    )
                image.load()
            except BaseException:
                image.close()
                raise
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only from Image.open, for a format other than ours (refused anyway); Pillow's message
        # quotes Pillow's limit, so it is not repeated.
        raise ImageError(
            f"{what} has too many pixels, over the {_MEGAPIXELS}-megapixel limit",
            hint=f"resize the image to at most {_MEGAPIXELS} megapixels",
        ) from exc
    except Image.UnidentifiedImageError as exc:
        # Pillow's own message names an in-memory buffer object, which tells a user nothing.
        raise ImageError(
            f"{what} could not be decoded: it is not in an image format Pillow recognises",
            hint="use a PNG, JPEG or WebP file",
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            f"{what} could not be decoded: {exc}", hint="use a PNG, JPEG or WebP file"
        ) from exc
    return image, media_type


_MEGAPIXELS = MAX_IMAGE_PIXELS // (1024 * 1024)


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{what} has {width}x{height} pixels ({width * height / 1e6:.0f} million), over the "
            f"{_MEGAPIXELS}-megapixel limit ({MAX_IMAGE_PIXELS} pixels)",
            hint=f"resize the image to at most {_MEGAPIXELS} megapixels",
        )


def _open_without_pillow_limit(data: bytes) -> Image.Image:
    """``data`` opened (header read, nothing decoded) by the PNG, JPEG or WebP reader directly.

    ``Image.open`` refuses images over Pillow's ``MAX_IMAGE_PIXELS`` (89 and 179 million pixels
    by default) with a message that quotes that limit, and changing it would change it for the
    whole program; opened here, the image is measured against our limit instead. Anything else
    goes to ``Image.open``.
    """
    Image.preinit()
    prefix = data[:16]
    for fmt in ("PNG", "JPEG", "WEBP"):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(prefix) is not True):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            break  # Image.open reports it as it would
    return Image.open(io.BytesIO(data))


def normalise_input(data: bytes, *, what: str = "image") -> CheckedImage:
    """A user's image as the models and the HTML page will both see it: 8-bit RGB, upright, opaque.

    Refused: anything that is not a PNG, JPEG or WebP file (see :func:`not_an_image`), images
    over the byte or pixel limits, and animated PNG and WebP files (the models would see one
    frame, a browser the animation; GIF is refused for the same reason). Changed, then
    re-encoded: an EXIF orientation other than "upright" is applied; 16-bit greyscale is scaled
    to 8 bits; transparency (alpha, a transparent palette entry or colour key) is composited
    on white; greyscale, palette and CMYK images become RGB. A changed image is stored as PNG,
    except a JPEG, which stays a JPEG (quality 95, no chroma subsampling): a phone photo as
    PNG is several times larger, and every model call carries it. Metadata (EXIF, colour
    profile, text) is not carried into a re-encoded image.

    An image that needs none of this (8-bit RGB, no transparency, no orientation to apply) is
    kept as its original bytes, so its hash, and the threads that name it, stay the same.
    """
    problem = not_an_image(data)
    if problem is not None:
        raise ImageError(f"{what} {problem}", hint="convert it to PNG, JPEG or WebP")
    image, media_type = _decode(data, what)
    with image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format in ("PNG", "WEBP"):
            # MPO (phone JPEGs) holds a photo and its previews: the first frame is the photo.
            name = "WebP" if image.format == "WEBP" else image.format
            raise ImageError(
                f"{what} is an animated {name} ({frames} frames), not a still image: "
                "the models would see one frame of it",
                hint="save the frame you mean as a still PNG, JPEG or WebP",
            )
        normalised = _normalised(image)
        if normalised is None:
            return CheckedImage(data, media_type, image.width, image.height)
        encode = _jpeg_image if media_type == "image/jpeg" else png_image
        checked = encode(normalised)
    if len(checked.data) > MAX_IMAGE_BYTES:
        kind = checked.media_type.removeprefix("image/").upper()
        raise ImageError(
            f"{what} is {len(checked.data)} bytes once made 8-bit RGB and saved as {kind}, over "
            f"the {MAX_IMAGE_BYTES} byte limit",
            hint="resize the image, or save it as an 8-bit RGB image without transparency",
        )
    return checked


# Exif tag 274: how the stored pixels must be turned to stand upright; 1 is "as stored".
_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# 16-bit values to 8 bits, rounded: 65535 -> 255, 32768 -> 128.
_SIXTEEN_TO_EIGHT = [(value + 128) // 257 for value in range(65536)]


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation to apply (2 to 8), or None when the image is upright as stored."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return None  # unreadable EXIF: browsers show such an image as stored, and so do we
    return value if isinstance(value, int) and 2 <= value <= 8 else None


def _normalised(image: Image.Image) -> Image.Image | None:
    """``image`` as 8-bit RGB, upright and opaque, with no metadata; None when it already is."""
    orientation = _orientation(image)
    transparent = "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "La", "RGBa")
    if image.mode == "RGB" and not transparent and orientation is None:
        return None
    if orientation is not None:
        image = ImageOps.exif_transpose(image)
    alpha: Image.Image | None = None
    if image.mode in _SIXTEEN_BIT_MODES:
        # Converted as is, every value over 255 would be clipped: a 16-bit image turns white.
        wide = image.convert("I")
        key = image.info.get("transparency")
        if isinstance(key, int):
            alpha = wide.point([0 if value == key else 255 for value in range(65536)], "L")
        rgb = wide.point(_SIXTEEN_TO_EIGHT, "L").convert("RGB")
    elif transparent:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        rgb = rgba.convert("RGB")
    else:
        rgb = image.convert("RGB")
    if alpha is not None and alpha.getextrema() != (255, 255):
        # What a transparent pixel hides is not shown: white shows through, as on the page.
        white = Image.new("RGB", rgb.size, "white")
        white.paste(rgb, mask=alpha)
        rgb = white
    # Nothing of the original's info travels: a PNG would write its colour key back as tRNS.
    rgb.info.clear()
    return rgb


def _jpeg_image(image: Image.Image) -> CheckedImage:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return CheckedImage(buffer.getvalue(), "image/jpeg", image.width, image.height)


# zlib's run-length strategy at level 1 suits PNG's filtered rows: at 1024x1024 it encodes a
# photo-like image in 65 ms against the default's 160 ms on the CI machine, and the file is no
# larger. A GPU trajectory waits for this between the generator and the critic.
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (converted to RGB or RGBA first)."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class CheckedImage:
    """Encoded image bytes whose format and size are known to be right (decoded, or encoded
    here), so storing them needs no second decode."""

    data: bytes
    media_type: str
    width: int
    height: int


def check_image(data: bytes, *, what: str = "image") -> CheckedImage:
    """Decode ``data`` fully (see :func:`inspect_image`) and keep what it says."""
    media_type, width, height = inspect_image(data, what=what)
    return CheckedImage(data, media_type, width, height)


def png_image(image: Image.Image) -> CheckedImage:
    """A PIL image encoded as PNG; its size is the image's own."""
    return CheckedImage(encode_png(image), "image/png", image.width, image.height)


class ImageStore:
    """Images stored once by their sha256 under ``root``; a reference can only name a hash."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Writes are staged in one folder, so finding a killed write's leftovers is one listing.
        self.staging = self.root / STAGING_DIR

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written images that killed processes left behind."""
        return sweep_abandoned_writes(self.staging)

    def path_for(self, ref: ImageRef) -> Path:
        # ImageRef validates the digest and media type, so nothing user-supplied reaches the path.
        return self.root / ref.sha256[:2] / f"{ref.sha256}{MEDIA_SUFFIXES[ref.media_type]}"

    def put(self, data: bytes, *, what: str = "image") -> ImageRef:
        """Store encoded image bytes (PNG, JPEG or WebP) and return their reference."""
        return self.put_checked(check_image(data, what=what))

    def put_input(self, data: bytes, *, what: str = "input image") -> ImageRef:
        """Store a user's image as the models will see it (see :func:`normalise_input`)."""
        return self.put_checked(normalise_input(data, what=what))

    def put_checked(self, image: CheckedImage) -> ImageRef:
        """Store an image already decoded or encoded by :func:`check_image` or :func:`png_image`."""
        ref = ImageRef(
            sha256=hashlib.sha256(image.data).hexdigest(),
            media_type=image.media_type,
            width=image.width,
            height=image.height,
        )
        path = self.path_for(ref)
        if not self._reuse(path, ref):
            write_atomically(path, image.data, staging=self.staging)
        return ref

    def _reuse(self, path: Path, ref: ImageRef) -> bool:
        """Whether ``path`` already holds ``ref``; if so its time is set to now.

        ``interleave gc`` keeps unreferenced images while they are young: a fresh time tells it
        that a run is about to reference this one. If gc removes it first, it is written again.
        """
        try:
            if not self._matches(path, ref):
                return False
        except FileNotFoundError:
            return False
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except PermissionError:
            # Another user's file in a shared store: it is there, only not ours to touch.
            pass
        return True

    def put_image(self, image: Image.Image) -> ImageRef:
        """Store a PIL image as PNG."""
        return self.put_checked(png_image(image))

    def read(self, ref: ImageRef) -> bytes:
        """The bytes of ``ref``, verified against its hash."""
        try:
            return self.read_path(self.path_for(ref), ref.sha256)
        except FileNotFoundError as exc:
            raise ImageError(
                f"image {ref.short} is missing from the image store at {self.root}",
                hint="the run directory was moved or cleaned; point --run-dir at the original",
            ) from exc

    def open(self, ref: ImageRef) -> Image.Image:
        """The image of ``ref`` as a loaded PIL image."""
        image = Image.open(io.BytesIO(self.read(ref)))
        image.load()
        return image

    def find(self, sha256: str) -> ImageRef:
        """The reference of a stored image known only by its hash (as an agent would name it)."""
        if not SHA256_PATTERN.fullmatch(sha256):
            raise ImageError(
                f"{sha256!r} is not an image hash", hint="give the 64-hex sha256 of a stored image"
            )
        for suffix in MEDIA_SUFFIXES.values():
            path = self.root / sha256[:2] / f"{sha256}{suffix}"
            if path.is_file():
                media, width, height = inspect_image(self.read_path(path, sha256))
                return ImageRef(sha256=sha256, media_type=media, width=width, height=height)
        raise ImageError(
            f"no image {sha256[:12]} in the image store at {self.root}",
            hint="pass the hash of an image this store produced",
        )

    def read_path(self, path: Path, sha256: str) -> bytes:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ImageError(
                f"image file {path} does not match its hash {sha256[:12]}: it was changed or damaged",
                hint="restore the run directory from a backup or rerun the thread",
            )
        return data

    def contains(self, ref: ImageRef) -> bool:
        path = self.path_for(ref)
        return path.exists() and self._matches(path, ref)

    @staticmethod
    def _matches(path: Path, ref: ImageRef) -> bool:
        return hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256


def blank_canvas(store: ImageStore, width: int, height: int) -> ImageRef:
    """A white image of the given size: the 'previous image' the critic sees before step 1."""
    return store.put_image(Image.new("RGB", (width, height), "white"))
