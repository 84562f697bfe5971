"""Image intake: sniff, limit, decode, orient, flatten, resize to the task's budget, encode.

Accepted: JPEG, PNG, WebP, HEIF/HEIC (iPhone photos), AVIF, GIF (first frame), BMP and
TIFF (first page); whatever comes in, the engine gets a JPEG. A JPEG that already has
the size the task's budget gives it (a client that resizes before upload) goes out byte
for byte: re-encoding would cost CPU and blur price-tag text for nothing.

Everything here is synchronous and CPU-bound; `ImageNormalizer` runs it in a bounded
thread pool (Pillow releases the GIL while decoding and resizing) so the event loop
never blocks. Output sides are multiples of 32 px (Qwen3-VL: 16 px patches merged 2x2),
so the engine's processor never resizes again, and the `Scale` maps model boxes back to
the original upload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from scanner_gateway.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    Overloaded,
    UnsupportedMedia,
)
from scanner_gateway.tracing import TRACER

TILE = 32  # Qwen3-VL: 16 px patch x 2 spatial merge
DEFAULT_JPEG_QUALITY = 85
DRAFT_TOLERANCE = 0.9
# An already-sized JPEG goes out unchanged unless it is bigger than this per pixel: then it
# carries metadata (thumbnails, maker notes) or near-lossless quality the model gains nothing from.
MAX_PASS_THROUGH_BYTES_PER_PIXEL = 1.0
# Qwen-VL's processor refuses images whose sides differ by more than this factor (vLLM
# then answers 400 for the whole request); checked on the size the engine would get.
MAX_ASPECT_RATIO = 200

# Magic numbers of the formats we accept; anything else is 415 before Pillow sees it.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"WEBP", 8, "WEBP"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
# ISO media files (HEIC from iPhones, AVIF) name their format in the `ftyp` box's brand.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF", "BMP", "TIFF")
# Pillow plugins to try per sniffed format (a `mif1` file may hold HEVC or AV1 pictures).
_DECODERS = {"HEIF": ["HEIF", "AVIF"], "AVIF": ["AVIF", "HEIF"]}

# Pillow reads HEIF (HEIC) through the pillow-heif plugin; AVIF it reads natively.
register_heif_opener()


@dataclass(frozen=True)
class PixelBudget:
    max_pixels: int
    min_pixels: int = TILE * TILE * 4


@dataclass(frozen=True)
class Scale:
    """How the sent image relates to the original upload (after EXIF rotation)."""

    original_width: int
    original_height: int
    sent_width: int
    sent_height: int


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes
    scale: Scale
    source_format: str
    source_bytes: int
    data_url: str  # encoded in the worker thread, not on the event loop


def sniff_format(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand in _AVIF_BRANDS else "HEIF" if brand in _HEIF_BRANDS else None
    for magic, offset, fmt in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if fmt == "WEBP" and data[:4] != b"RIFF":
                continue
            return fmt
    return None


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")  # bounded: base64 bodies are megabytes


def decode_image_ref(ref: str, *, max_bytes: int, param: str = "image") -> bytes:
    """Bytes of a data URL (`data:image/...;base64,...`) or bare base64 string."""
    scheme = _URL_SCHEME.match(ref)
    scheme_name = scheme.group(1).lower() if scheme else None
    if scheme_name in ("http", "https"):
        raise InvalidRequest(
            "image URLs are not fetched by this gateway (its operator can allow hosts with "
            "SCANNER_IMAGE_URL_HOSTS); send the bytes as a data URL or base64",
            param=param,
        )
    if scheme_name not in (None, "data"):
        # Base64 has no ':', so this is a URL (file:, ftp:, blob:, content:...), not a garbled photo.
        raise InvalidRequest(
            f"'{scheme_name}:' URLs are not supported; send the bytes as a data URL or base64 "
            "(or an http(s) URL, where the operator allows its host)",
            param=param,
        )
    payload = ref
    if scheme_name == "data":
        header, sep, payload = ref.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidImage("data URL must be base64-encoded (data:<type>;base64,...)", param=param)
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"image is larger than the limit of {max_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        pass
    # Line-wrapped (`base64` without -w0), URL-safe alphabet, or padding dropped (base64url
    # encoders in browsers and JWT-style libraries): the same bytes, so accept them.
    compact = "".join(payload.split()).translate(_URLSAFE_TO_STANDARD).rstrip("=")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except binascii.Error as exc:
        raise InvalidImage(f"image is not valid base64: {exc}", param=param) from exc


def target_size(width: int, height: int, budget: PixelBudget) -> tuple[int, int]:
    """Largest (w, h), both multiples of TILE, with w*h <= max_pixels, keeping the aspect.

    Small images are scaled up to min_pixels; nothing is ever smaller than one tile.
    """
    area = width * height
    factor = 1.0
    if area > budget.max_pixels:
        factor = math.sqrt(budget.max_pixels / area)
    elif area < budget.min_pixels:
        factor = math.sqrt(budget.min_pixels / area)
    w = max(TILE, round(width * factor / TILE) * TILE)
    h = max(TILE, round(height * factor / TILE) * TILE)
    while w * h > budget.max_pixels and (w > TILE or h > TILE):
        # Rounding overshot: shrink the side whose removal loses the least aspect.
        if w >= h and w > TILE:
            w -= TILE
        elif h > TILE:
            h -= TILE
        else:
            w -= TILE
    return w, h


def normalize_image(
    data: bytes | str,
    budget: PixelBudget,
    *,
    max_bytes: int,
    max_pixels: int,
    quality: int = DEFAULT_JPEG_QUALITY,
    param: str = "image",
) -> NormalizedImage:
    """Validate and resize one upload (bytes, or base64 / data URL text).

    Raises 400/413/415/422 gateway errors, never anything else.
    """
    if isinstance(data, str):
        data = decode_image_ref(data, max_bytes=max_bytes, param=param)
    if not data:
        raise InvalidImage("image is empty", param=param)
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes; the limit is {max_bytes} bytes", param=param
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMedia(
            f"not a supported image (accepted: {', '.join(SUPPORTED_FORMATS)})", param=param
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_DECODERS.get(fmt, [fmt]))
            # Header only so far: refuse pixel bombs before decoding a single pixel.
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    f"image is {img.width}x{img.height} = {img.width * img.height} pixels; "
                    f"the limit is {max_pixels}",
                    param=param,
                )
            if img.width < 1 or img.height < 1:
                raise InvalidImage("image has no pixels", param=param)
            if fmt in _DECODERS:  # the plugin that could read it tells which one it was
                fmt = img.format or fmt
            return _convert(img, fmt, data, budget, quality, param)
    except (ImageTooLarge, InvalidImage, UnsupportedMedia, InvalidRequest):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}", param=param) from exc
    except UnidentifiedImageError as exc:  # its text names our in-memory file object: say it plainly
        raise InvalidImage(f"image could not be decoded ({fmt}): not a readable {fmt} file "
                           "(corrupt, or only its first bytes are right)", param=param) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"image could not be decoded ({fmt}): {exc}", param=param) from exc


def _convert(
    img: Image.Image, fmt: str, data: bytes, budget: PixelBudget, quality: int, param: str
) -> NormalizedImage:
    orientation = img.getexif().get(0x0112, 1)
    swapped = orientation in (5, 6, 7, 8)
    orig_w, orig_h = (img.height, img.width) if swapped else (img.width, img.height)
    out_w, out_h = target_size(orig_w, orig_h, budget)
    if max(out_w, out_h) > MAX_ASPECT_RATIO * min(out_w, out_h):  # still before any pixel is decoded
        raise InvalidImage(
            f"image is {orig_w}x{orig_h}: sides more than {MAX_ASPECT_RATIO} times "
            "apart are more than the model accepts; crop it into parts",
            param=param,
        )
    scale = Scale(orig_w, orig_h, out_w, out_h)
    if _fits_as_is(img, fmt, len(data), orientation, (out_w, out_h)):
        # Draft at 1/8 still reads the whole entropy-coded stream (a truncated or corrupt
        # file fails here, with our error, not the engine's) but skips the IDCT: ~1 ms.
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return _encoded(data, scale, fmt, len(data))
    if fmt == "JPEG":
        # Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale, so a 12 MP photo headed
        # for ~0.8 MP is never fully decoded. Accepting a draft up to 10% smaller than the
        # target per side lets 4000x3000 -> 1024x768 decode at 1/4 (1000x750) instead of
        # 1/2: ~2.5x less CPU for ~5% fewer source pixels.
        req_w, req_h = (out_h, out_w) if swapped else (out_w, out_h)
        img.draft("RGB", (math.ceil(req_w * DRAFT_TOLERANCE), math.ceil(req_h * DRAFT_TOLERANCE)))
    img.load()
    img = ImageOps.exif_transpose(img)
    img = _flatten(img)
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False)
    return _encoded(buf.getvalue(), scale, fmt, len(data))


def _fits_as_is(img: Image.Image, fmt: str, nbytes: int, orientation: int, size: tuple[int, int]) -> bool:
    """An upright RGB JPEG of exactly the size it would be resized to, and not bloated."""
    return (
        fmt == "JPEG"
        and img.mode == "RGB"
        and orientation == 1
        and img.size == size
        and nbytes <= MAX_PASS_THROUGH_BYTES_PER_PIXEL * size[0] * size[1]
    )


def _encoded(jpeg: bytes, scale: Scale, fmt: str, nbytes: int) -> NormalizedImage:
    return NormalizedImage(
        jpeg=jpeg,
        data_url="data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
        scale=scale,
        source_format=fmt,
        source_bytes=nbytes,
    )


def _flatten(img: Image.Image) -> Image.Image:
    """RGB on white: transparency would otherwise turn black in JPEG. High-bit-depth
    greyscale is brought to 8 bits, not clipped to white or black."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_grey(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit greyscale (scanners, some PNGs) scaled by 1/256; 32-bit integer and float
    images (TIFFs from measuring cameras) rarely use their type's range (a float image
    holds 0..1, a 32-bit one a sensor's 12-20 bits), so what they hold is stretched
    over 0..255."""
    if img.mode.startswith("I;16"):
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    low, high = img.getextrema()
    if img.mode == "F" and 0 <= low and high <= 1:
        low, high = 0.0, 1.0
    scale = 255 / (high - low) if high > low else 0.0
    return img.point(lambda v: v * scale - low * scale).convert("L")


class ImageNormalizer:
    """Runs `normalize_image` off the event loop with bounded concurrency and queue."""

    def __init__(
        self,
        *,
        workers: int,
        queue_limit: int,
        max_bytes: int,
        max_pixels: int,
        quality: int = DEFAULT_JPEG_QUALITY,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image")
        self._slots = asyncio.Semaphore(workers)
        self._queue_limit = queue_limit
        self._waiting = 0
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.quality = quality

    async def normalize(self, data: bytes | str, budget: PixelBudget, *, param: str = "image") -> NormalizedImage:
        with TRACER.start_as_current_span("image normalize", attributes={"scanner.image.param": param}) as span:
            image = await self._normalize(data, budget, param)
            if span.is_recording():
                span.set_attributes({
                    "scanner.image.format": image.source_format, "scanner.image.bytes": image.source_bytes,
                    "scanner.image.width": image.scale.original_width, "scanner.image.height": image.scale.original_height,
                    "scanner.image.sent_width": image.scale.sent_width, "scanner.image.sent_height": image.scale.sent_height,
                })
            return image

    async def _normalize(self, data: bytes | str, budget: PixelBudget, param: str) -> NormalizedImage:
        if self._waiting >= self._queue_limit:
            raise Overloaded("image decoding queue is full; retry shortly", retry_after_s=1)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        job = self._pool.submit(
            normalize_image,
            data,
            budget,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            quality=self.quality,
            param=param,
        )
        # The slot frees when the thread finishes, even if the caller was cancelled
        # meanwhile, so the pool never holds more than `workers` jobs.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
