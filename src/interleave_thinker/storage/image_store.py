"""Content-addressed image files under the run directory: checked on the way in, verified on read."""

from __future__ import annotations

import abc
import base64
import collections
import functools
import hashlib
import io
import os
import struct
import threading
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

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


# Without fpng: zlib's run-length strategy at level 1 suits PNG's filtered rows (a photo-like
# 1024x1024 image in 65 ms against the default's 160 ms on the CI machine, no larger).
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE


@functools.cache
def _fast_png_writer() -> ModuleType | None:
    # Imported on first use: with numpy it adds about 80 ms to every command's start (resume,
    # list, show), and only the ones that encode images need it.
    try:  # a fast lossless PNG writer; optional, Pillow writes the same images without it
        import fpng
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        return None
    return fpng


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image (converted to RGB or RGBA first).

    fpng writes a 1024x1024 image in 3-5 ms where Pillow's zlib takes 50-75 ms (benchmark h):
    a GPU trajectory waits for this between the generator and the critic. Its files are up to
    about 40 % larger for photo-like content; Pillow is used where the wheel is missing.
    """
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    fpng = _fast_png_writer()
    if fpng is not None:
        return fpng.from_pil(image)
    buffer = io.BytesIO()
    image.save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class CheckedImage:
    """Encoded image bytes whose format and size are known to be right (decoded, or encoded
    here), so storing them needs no second decode. ``pixels``: the decoded image, when it is at
    hand (an image encoded here), so that reading it back needs no decode either."""

    data: bytes
    media_type: str
    width: int
    height: int
    pixels: Image.Image | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


# Decoded images this process encoded or read recently, by sha256: the critic's transformers
# backend, the next edit and the HTML page all need pixels that were just encoded, and a
# 1024x1024 PNG takes 15-25 ms to decode. Content-addressed, so a hit is always the right image.
_DECODED: collections.OrderedDict[tuple[str, str], Image.Image] = collections.OrderedDict()
_DECODED_LOCK = threading.Lock()
# About 12 MB of RGB pixels: four 1024x1024 images, what one trajectory uses next (the
# memory benchmark holds 64 trajectories within 10 MiB each).
MAX_DECODED_PIXELS = 4 * 1024 * 1024


def remember_decoded(key: tuple[str, str], image: Image.Image) -> None:
    """Keep ``image`` (the decoded form of the stored image ``key``: the store's location and
    the sha256) for :meth:`ImageStorage.open`."""
    with _DECODED_LOCK:
        _DECODED[key] = image
        _DECODED.move_to_end(key)
        total = sum(kept.width * kept.height for kept in _DECODED.values())
        while total > MAX_DECODED_PIXELS and len(_DECODED) > 1:
            _, dropped = _DECODED.popitem(last=False)
            total -= dropped.width * dropped.height


def _recalled(key: tuple[str, str]) -> Image.Image | None:
    with _DECODED_LOCK:
        image = _DECODED.get(key)
        if image is not None:
            _DECODED.move_to_end(key)
    # A copy: callers (pipelines, renderers) may change the image they are given.
    return None if image is None else image.copy()


# Base64 forms of images this process stored or verified recently, by sha256, with their
# references: every critic call inlines the candidate and the previous image, and the HTML page
# embeds all of them; reading a 1024x1024 PNG back, hashing it and encoding it again costs a few
# milliseconds each time. Only bytes whose hash was checked in this process go in. Both caches
# are keyed by the store's location too: an image is only ever found in the store that holds it.
_ENCODED: collections.OrderedDict[tuple[str, str], tuple[ImageRef, str]] = collections.OrderedDict()
_ENCODED_LOCK = threading.Lock()
# About 16 MB of base64 text: some ten 1024x1024 PNGs.
MAX_ENCODED_CHARS = 16 * 1024 * 1024


def _remember_encoded(location: str, ref: ImageRef, data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    _keep_encoded((location, ref.sha256), ref, encoded)
    return encoded


def _keep_encoded(key: tuple[str, str], ref: ImageRef, encoded: str) -> None:
    with _ENCODED_LOCK:
        _ENCODED[key] = (ref, encoded)
        _ENCODED.move_to_end(key)
        total = sum(len(text) for _, text in _ENCODED.values())
        while total > MAX_ENCODED_CHARS and len(_ENCODED) > 1:
            _, (_, dropped) = _ENCODED.popitem(last=False)
            total -= len(dropped)


def _recalled_encoded(key: tuple[str, str]) -> tuple[ImageRef, str] | None:
    with _ENCODED_LOCK:
        kept = _ENCODED.get(key)
        if kept is not None:
            _ENCODED.move_to_end(key)
    return kept


# Small JPEG previews (the HTML page's attempt thumbnails) of images this process stored, made
# while the pixels are at hand: made later, each needs a full PNG decode (15-25 ms at 1024x1024).
PREVIEW_PIXELS = 320
PREVIEW_QUALITY = 85
_PREVIEWS: collections.OrderedDict[tuple[str, str], Preview] = collections.OrderedDict()
_PREVIEWS_LOCK = threading.Lock()
# About 16 MB of JPEG: some 800 previews.
MAX_PREVIEW_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Preview:
    """A small JPEG copy of an image (see :func:`make_preview`)."""

    jpeg: bytes
    width: int
    height: int


def make_preview(image: Image.Image) -> Preview:
    """``image`` scaled down by a whole factor to between PREVIEW_PIXELS and twice that on its
    longer side (unless it is smaller already), as JPEG."""
    small = image if image.mode == "RGB" else image.convert("RGB")
    # A box reduction by a whole factor (1024 -> 342) and nothing else: about 1.3 ms at
    # 1024x1024 against 4 ms for a thumbnail() to exactly PREVIEW_PIXELS, on every image drawn.
    factor = max(small.width, small.height) // PREVIEW_PIXELS
    if factor > 1:
        small = small.reduce(factor)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return Preview(buffer.getvalue(), small.width, small.height)


def _remember_preview(key: tuple[str, str], preview: Preview) -> Preview:
    with _PREVIEWS_LOCK:
        _PREVIEWS[key] = preview
        _PREVIEWS.move_to_end(key)
        total = sum(len(kept.jpeg) for kept in _PREVIEWS.values())
        while total > MAX_PREVIEW_BYTES and len(_PREVIEWS) > 1:
            _, dropped = _PREVIEWS.popitem(last=False)
            total -= len(dropped.jpeg)
    return preview


def _recalled_preview(key: tuple[str, str]) -> Preview | None:
    with _PREVIEWS_LOCK:
        kept = _PREVIEWS.get(key)
        if kept is not None:
            _PREVIEWS.move_to_end(key)
    return kept


# The base64 text and the preview of an image generated here are made on a worker thread while
# the image is written and synced (which releases the GIL), instead of after it: together they
# cost about 3 ms for a photo-like and 8 ms for a noise image at 1024x1024 (benchmark h). They
# go into the caches above only once the image is stored, so that no image is ever found in a
# store that does not hold it.
@dataclass(frozen=True)
class DerivedForms:
    """What the caches keep of a generated image besides its pixels."""

    ref: ImageRef
    encoded: str
    preview: Preview | None


_deriving: ThreadPoolExecutor | None = None
_DERIVING_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _deriving
    with _DERIVING_LOCK:
        if _deriving is None:
            _deriving = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="interleave-derive"
            )
        return _deriving


def _forget_executor_in_child() -> None:
    # A forked child has none of the parent's worker threads: it starts its own when needed.
    global _deriving, _DERIVING_LOCK
    _deriving = None
    _DERIVING_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_executor_in_child)


def _derive(ref: ImageRef, image: CheckedImage) -> DerivedForms:
    assert image.pixels is not None
    preview = make_preview(image.pixels) if max(image.width, image.height) > PREVIEW_PIXELS else None
    return DerivedForms(ref, base64.b64encode(image.data).decode("ascii"), preview)


def check_image(data: bytes, *, what: str = "image") -> CheckedImage:
    """Decode ``data`` fully (see :func:`inspect_image`) and keep what it says."""
    media_type, width, height = inspect_image(data, what=what)
    return CheckedImage(data, media_type, width, height)


def png_image(image: Image.Image) -> CheckedImage:
    """A PIL image encoded as PNG; its size is the image's own, and it keeps the pixels."""
    pixels = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    return CheckedImage(encode_png(pixels), "image/png", image.width, image.height, pixels=pixels)


def image_ref(image: CheckedImage) -> ImageRef:
    """The reference that names ``image``: its sha256, media type and size."""
    return ImageRef(
        sha256=image.sha256,
        media_type=image.media_type,
        width=image.width,
        height=image.height,
    )


class ImageStorage(abc.ABC):
    """What runs, renderers and gc need of an image store: images stored once by sha256.

    Every method blocks (files, a database): async code calls them through a worker thread.
    ``put_checked`` returns only once the image is durable, so a checkpoint written after it
    never names an image a crash could lose; ``read`` verifies the bytes against the hash.
    Implementations: :class:`ImageStore` (files under a folder, ``file://``) and
    ``storage.postgres_images.PostgresImageStore`` (a table, ``postgresql://``).
    """

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the images are, as messages name it (a folder, or a URL without password)."""

    @abc.abstractmethod
    def put_checked(self, image: CheckedImage) -> ImageRef:
        """Store an image already decoded or encoded by :func:`check_image` or :func:`png_image`."""

    @abc.abstractmethod
    def read(self, ref: ImageRef) -> bytes:
        """The bytes of ``ref``, verified against its hash; ImageError if missing or damaged."""

    @abc.abstractmethod
    def find(self, sha256: str) -> ImageRef:
        """The reference of a stored image known only by its hash (as an agent would name it)."""

    @abc.abstractmethod
    def contains(self, ref: ImageRef) -> bool:
        """Whether the store holds ``ref`` intact."""

    @abc.abstractmethod
    def touch(self, ref: ImageRef) -> bool:
        """Mark ``ref`` as just used (gc keeps young images); False if it is not stored."""

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written images that killed processes left behind (none by default)."""
        return []

    def put(self, data: bytes, *, what: str = "image") -> ImageRef:
        """Store encoded image bytes (PNG, JPEG or WebP) and return their reference."""
        return self.put_checked(check_image(data, what=what))

    def put_input(self, data: bytes, *, what: str = "input image") -> ImageRef:
        """Store a user's image as the models will see it (see :func:`normalise_input`)."""
        return self.put_checked(normalise_input(data, what=what))

    def put_image(self, image: Image.Image) -> ImageRef:
        """Store a PIL image as PNG."""
        return self.put_checked(png_image(image))

    def open(self, ref: ImageRef) -> Image.Image:
        """The image of ``ref`` as a loaded PIL image (from memory when this process has just
        encoded or read it)."""
        recalled = _recalled((self.location, ref.sha256))
        if recalled is not None:
            return recalled
        image = Image.open(io.BytesIO(self.read(ref)))
        image.load()
        remember_decoded((self.location, ref.sha256), image)
        return image.copy()

    def as_base64(self, ref: ImageRef) -> str:
        """The verified bytes of ``ref`` as base64 text (from memory when this process stored
        or read it recently), for the models' messages and the HTML page."""
        kept = _recalled_encoded((self.location, ref.sha256))
        if kept is not None:
            return kept[1]
        return _remember_encoded(self.location, ref, self.read(ref))

    def recent(self, sha256: str) -> ImageRef | None:
        """The reference of an image this process stored or encoded recently; None otherwise."""
        kept = self.cached_base64(sha256)
        return None if kept is None else kept[0]

    def cached_base64(self, sha256: str) -> tuple[ImageRef, str] | None:
        """The reference and base64 text of an image this process stored or verified
        recently, from memory only (never blocks); None otherwise."""
        return _recalled_encoded((self.location, sha256))

    def preview(self, ref: ImageRef) -> Preview:
        """A small JPEG copy of ``ref`` (see :func:`make_preview`), from memory when this
        process stored the image recently."""
        key = (self.location, ref.sha256)
        kept = _recalled_preview(key)
        if kept is not None:
            return kept
        with self.open(ref) as image:
            return _remember_preview(key, make_preview(image))

    def deriving(self, image: CheckedImage) -> Future[DerivedForms] | None:
        """Start making what :meth:`stored` keeps of ``image`` on a worker thread; call it
        before writing the image, so that the two overlap. None when there is nothing to make
        (no pixels at hand, or this process already keeps it for this store)."""
        if image.pixels is None or _recalled_encoded((self.location, image.sha256)) is not None:
            return None
        return _executor().submit(_derive, image_ref(image), image)

    def stored(
        self, ref: ImageRef, image: CheckedImage, derived: Future[DerivedForms] | None = None
    ) -> ImageRef:
        """``ref`` after ``image`` was stored: when its pixels are at hand (an image generated
        in this process), they are kept for ``open``, its base64 form for the critic's message
        and a preview for the HTML page, each in a small bounded cache. ``derived``: from
        :meth:`deriving`, started before the write."""
        if image.pixels is None:
            return ref
        key = (self.location, ref.sha256)
        remember_decoded(key, image.pixels)
        try:
            if derived is not None:
                forms = derived.result()
            elif _recalled_encoded(key) is None:
                forms = _derive(ref, image)
            else:
                return ref
        except Exception:  # only a cache: the image is stored, and lookups read it
            return ref
        _keep_encoded(key, forms.ref, forms.encoded)
        if forms.preview is not None:
            _remember_preview(key, forms.preview)
        return ref


class ImageStore(ImageStorage):
    """Images stored once by their sha256 under ``root``; a reference can only name a hash."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Writes are staged in one folder, so finding a killed write's leftovers is one listing.
        self.staging = self.root / STAGING_DIR

    @property
    def location(self) -> str:
        return f"the image store at {self.root}"

    def sweep_abandoned_writes(self) -> list[Path]:
        """Remove half-written images that killed processes left behind."""
        return sweep_abandoned_writes(self.staging)

    def path_for(self, ref: ImageRef) -> Path:
        # ImageRef validates the digest and media type, so nothing user-supplied reaches the path.
        return self.root / ref.sha256[:2] / f"{ref.sha256}{MEDIA_SUFFIXES[ref.media_type]}"

    def put_checked(self, image: CheckedImage) -> ImageRef:
        """Store an image already decoded or encoded by :func:`check_image` or :func:`png_image`."""
        ref = image_ref(image)
        path = self.path_for(ref)
        derived = self.deriving(image)
        if not self._reuse(path, ref):
            write_atomically(path, image.data, staging=self.staging)
        return self.stored(ref, image, derived)

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

    def touch(self, ref: ImageRef) -> bool:
        try:
            os.utime(self.path_for(ref))
        except FileNotFoundError:
            return False
        except OSError:
            pass  # another user's file in a shared store: it is there, only not ours to touch
        return True

    def read(self, ref: ImageRef) -> bytes:
        """The bytes of ``ref``, verified against its hash."""
        try:
            return self.read_path(self.path_for(ref), ref.sha256)
        except FileNotFoundError as exc:
            raise ImageError(
                f"image {ref.short} is missing from the image store at {self.root}",
                hint="the run directory was moved or cleaned; point --run-dir at the original",
            ) from exc

    def find(self, sha256: str) -> ImageRef:
        """The reference of a stored image known only by its hash (as an agent would name it)."""
        if not SHA256_PATTERN.fullmatch(sha256):
            raise ImageError(
                f"{sha256!r} is not an image hash", hint="give the 64-hex sha256 of a stored image"
            )
        for suffix in MEDIA_SUFFIXES.values():
            path = self.root / sha256[:2] / f"{sha256}{suffix}"
            if path.is_file():
                return ImageRef(sha256=sha256, **_header(self.read_path(path, sha256)))
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


def _header(data: bytes) -> dict[str, object]:
    """Media type and size of stored bytes, from the header alone: they were checked whole
    when stored and their hash was just verified, so no second full decode is needed."""
    with Image.open(io.BytesIO(data)) as image:
        return {"media_type": _PIL_MEDIA_TYPES[image.format or ""], "width": image.width,
                "height": image.height}


def blank_image(width: int, height: int) -> Image.Image:
    """The white image the critic sees as the 'previous image' before step 1."""
    return Image.new("RGB", (width, height), "white")


@functools.lru_cache(maxsize=4)
def blank_png(width: int, height: int) -> CheckedImage:
    """:func:`blank_image` as PNG, encoded once per size and process (every trajectory's first
    critic call needs it); callers must not change its pixels."""
    return png_image(blank_image(width, height))


def blank_canvas(store: ImageStorage, width: int, height: int) -> ImageRef:
    """:func:`blank_png` of the given size, stored."""
    return store.put_checked(blank_png(width, height))
