import base64
import io

import pytest
from PIL import Image

from scanner_gateway.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    UnsupportedMedia,
)
from scanner_gateway.scan.images import (
    TILE,
    PixelBudget,
    decode_image_ref,
    normalize_image,
    sniff_format,
    target_size,
)
from tests.helpers import encode, shelf_jpeg, shelf_photo

BUDGET = PixelBudget(max_pixels=1024 * 768)
LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 64_000_000}


@pytest.mark.parametrize(
    ("w", "h"),
    [(4000, 3000), (3000, 4000), (1024, 768), (640, 480), (10000, 40), (40, 10000), (33, 33), (1, 1)],
)
def test_target_size_fits_budget_in_whole_tiles(w, h):
    tw, th = target_size(w, h, BUDGET)
    assert tw % TILE == 0 and th % TILE == 0
    assert tw >= TILE and th >= TILE
    assert tw * th <= BUDGET.max_pixels
    if min(w, h) >= 200:  # aspect kept within one tile of rounding
        assert abs(tw / th - w / h) < 0.1 * (w / h)


def test_target_size_uses_the_budget_and_upscales_tiny_images():
    tw, th = target_size(4000, 3000, BUDGET)
    assert tw * th > 0.9 * BUDGET.max_pixels
    tw, th = target_size(64, 48, PixelBudget(max_pixels=BUDGET.max_pixels, min_pixels=65536))
    assert tw * th >= 0.8 * 65536


def test_sniff_recognises_formats_by_bytes_not_names():
    img = Image.new("RGB", (8, 8))
    assert sniff_format(encode(img, "JPEG")) == "JPEG"
    assert sniff_format(encode(img, "PNG")) == "PNG"
    assert sniff_format(encode(img, "WEBP")) == "WEBP"
    assert sniff_format(encode(img, "GIF")) == "GIF"
    assert sniff_format(encode(img, "HEIF")) == "HEIF"
    assert sniff_format(encode(img, "AVIF")) == "AVIF"
    assert sniff_format(encode(img, "PDF")) is None
    assert sniff_format(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00") is None  # an MP4 video
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(b"hello") is None


def test_phone_photo_is_resized_to_budget_with_scale_kept():
    out = normalize_image(shelf_jpeg(4000, 3000, seed=3), BUDGET, **LIMITS)
    assert (out.scale.original_width, out.scale.original_height) == (4000, 3000)
    assert out.scale.sent_width * out.scale.sent_height <= BUDGET.max_pixels
    sent = Image.open(__import__("io").BytesIO(out.jpeg))
    assert sent.format == "JPEG" and sent.size == (out.scale.sent_width, out.scale.sent_height)
    assert out.data_url.startswith("data:image/jpeg;base64,")
    assert len(out.jpeg) < 300 * 1024


def test_exif_orientation_is_applied_before_sizing():
    img = shelf_photo(400, 200, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = normalize_image(encode(img, "JPEG", exif=exif), BUDGET, **LIMITS)
    assert (out.scale.original_width, out.scale.original_height) == (200, 400)
    assert out.scale.sent_height > out.scale.sent_width


def test_transparent_png_is_flattened_on_white():
    img = Image.new("RGBA", (256, 256), (255, 0, 0, 0))  # fully transparent red
    out = normalize_image(encode(img, "PNG"), BUDGET, **LIMITS)
    r, g, b = Image.open(__import__("io").BytesIO(out.jpeg)).convert("RGB").getpixel((10, 10))
    assert min(r, g, b) > 240


def test_palette_and_grayscale_and_webp_are_accepted():
    for img, fmt in [
        (Image.new("P", (300, 200)), "PNG"),
        (Image.new("L", (300, 200), 128), "JPEG"),
        (Image.new("RGB", (300, 200), (9, 9, 9)), "WEBP"),
        (Image.new("CMYK", (300, 200)), "JPEG"),
    ]:
        out = normalize_image(encode(img, fmt), BUDGET, **LIMITS)
        assert out.source_format == fmt


def test_too_many_bytes_is_413():
    with pytest.raises(ImageTooLarge) as exc:
        normalize_image(shelf_jpeg(800, 600), BUDGET, max_bytes=10_000, max_pixels=10**8)
    assert exc.value.status == 413 and exc.value.code == "image_too_large"


def test_pixel_bomb_is_refused_from_the_header():
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")  # 144 MP, a few KB on disk
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLarge) as exc:
        normalize_image(bomb, BUDGET, **LIMITS)
    assert "pixels" in exc.value.message


@pytest.mark.parametrize(("w", "h"), [(10000, 40), (40, 10000)])
def test_slivers_the_model_refuses_are_422_not_an_engine_error(w, h):
    with pytest.raises(InvalidImage) as exc:
        normalize_image(encode(Image.new("RGB", (w, h)), "PNG"), BUDGET, **LIMITS)
    assert exc.value.status == 422 and "crop" in exc.value.message


def test_long_shelf_panoramas_within_the_models_limit_pass():
    pano = normalize_image(encode(Image.new("RGB", (8000, 400)), "JPEG"), BUDGET, **LIMITS)
    assert 19 < pano.scale.sent_width / pano.scale.sent_height < 22  # 20:1, give or take a tile


@pytest.mark.parametrize(
    ("data", "error", "status"),
    [
        (b"", InvalidImage, 422),
        (b"not an image at all", UnsupportedMedia, 415),
        (encode(Image.new("RGB", (8, 8)), "PDF"), UnsupportedMedia, 415),
        (encode(Image.new("RGB", (8, 8)), "ICO"), UnsupportedMedia, 415),
        (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 64, InvalidImage, 422),  # HEIC brand, garbage body
        (shelf_jpeg(640, 480)[:2000], InvalidImage, 422),  # truncated JPEG
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, InvalidImage, 422),  # PNG magic, garbage body
        (b"\xff\xd8\xff garbage", InvalidImage, 422),  # JPEG magic, nothing Pillow can identify
    ],
)
def test_bad_bytes_get_clear_4xx(data, error, status):
    with pytest.raises(error) as exc:
        normalize_image(data, BUDGET, **LIMITS)
    assert exc.value.status == status
    assert " object at 0x" not in exc.value.message  # no reprs of our internals


def test_base64_inputs():
    raw = shelf_jpeg(320, 240)
    b64 = base64.b64encode(raw).decode()
    assert decode_image_ref(b64, max_bytes=10**7) == raw
    assert decode_image_ref("data:image/jpeg;base64," + b64, max_bytes=10**7) == raw
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert decode_image_ref(wrapped, max_bytes=10**7) == raw
    urlsafe_unpadded = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert decode_image_ref("data:image/jpeg;base64," + urlsafe_unpadded, max_bytes=10**7) == raw
    with pytest.raises(InvalidImage):
        decode_image_ref(b64[:-5] + "=" + b64[-4:], max_bytes=10**7)  # padding in the middle
    with pytest.raises(InvalidImage):
        decode_image_ref("data:image/jpeg;base64,@@@not-base64@@@", max_bytes=10**7)
    with pytest.raises(InvalidImage):
        decode_image_ref("data:image/jpeg," + b64, max_bytes=10**7)
    with pytest.raises(InvalidRequest):
        decode_image_ref("https://example.com/shelf.jpg", max_bytes=10**7)
    with pytest.raises(ImageTooLarge):
        decode_image_ref(b64, max_bytes=100)


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "ftp://host/shelf.jpg", "blob:https://app/1", "HTTPS://x/a.jpg"])
def test_urls_of_other_schemes_are_named_not_read_as_base64(ref):
    with pytest.raises(InvalidRequest) as caught:
        decode_image_ref(ref, max_bytes=10**7)
    assert "base64" not in str(caught.value).split(";")[0]
    assert ref.split(":")[0].lower() in str(caught.value) or "not fetched" in str(caught.value)


def test_normalizer_queue_is_bounded_and_answers_429():
    import asyncio

    from scanner_gateway.errors import Overloaded
    from scanner_gateway.scan.images import ImageNormalizer

    photo = shelf_jpeg(4000, 3000, seed=9)

    async def main():
        normalizer = ImageNormalizer(workers=1, queue_limit=1, **LIMITS)
        try:
            # One runs, one waits, the third finds the queue full.
            return await asyncio.gather(*(normalizer.normalize(photo, BUDGET) for _ in range(3)),
                                        return_exceptions=True)
        finally:
            normalizer.close()

    first, second, third = asyncio.run(main())
    assert first.scale.original_width == 4000 and second.scale.original_width == 4000
    assert isinstance(third, Overloaded) and third.status == 429 and third.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("fmt", "mode", "kwargs"),
    [
        ("HEIF", "RGB", {}),  # iPhone photos
        ("AVIF", "RGB", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("TIFF", "CMYK", {}),
        ("PNG", "LA", {}),
    ],
)
def test_every_accepted_format_goes_out_as_jpeg_within_budget(fmt, mode, kwargs):
    photo = shelf_photo(1600, 1200, seed=11).convert(mode)
    out = normalize_image(encode(photo, fmt, **kwargs), BUDGET, **LIMITS)
    assert out.source_format == fmt
    assert (out.scale.original_width, out.scale.original_height) == (1600, 1200)
    sent = Image.open(io.BytesIO(out.jpeg))
    assert sent.format == "JPEG" and sent.mode == "RGB"
    assert sent.size == (out.scale.sent_width, out.scale.sent_height) and sent.width * sent.height <= BUDGET.max_pixels


def test_animated_gif_sends_its_first_frame():
    frames = [Image.new("RGB", (320, 240), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = normalize_image(data, BUDGET, **LIMITS)
    r, g, b = Image.open(io.BytesIO(out.jpeg)).convert("RGB").getpixel((5, 5))
    assert r > 200 and b < 60


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = Image.linear_gradient("L").resize((512, 512)).convert("I")
    sixteen = ramp.point(lambda v: v * 257).convert("I;16")  # 0..65535
    out = normalize_image(encode(sixteen, "PNG"), BUDGET, **LIMITS)
    sent = Image.open(io.BytesIO(out.jpeg)).convert("L")
    top, bottom = sent.getpixel((256, 5)), sent.getpixel((256, sent.height - 5))
    assert top < 30 and bottom > 220  # the ramp survives: dark at the top, light at the bottom


@pytest.mark.parametrize(("mode", "scale", "offset"), [
    ("F", 1 / 255, 0.0),  # float TIFF holding 0..1
    ("F", 16.0, -1000.0),  # float TIFF in a camera's own units
    ("I", 65793.0, 0.0),  # 32-bit TIFF holding 24 bits
])
def test_float_and_32_bit_greyscale_keep_their_ramp(mode, scale, offset):
    ramp = Image.linear_gradient("L").resize((512, 512)).convert(mode)
    deep = ramp.point(lambda v: v * scale + offset)
    out = normalize_image(encode(deep, "TIFF"), BUDGET, **LIMITS)
    sent = Image.open(io.BytesIO(out.jpeg)).convert("L")
    top, bottom = sent.getpixel((256, 5)), sent.getpixel((256, sent.height - 5))
    assert top < 30 and bottom > 220  # neither all black nor clipped to white


def test_a_jpeg_already_at_its_budget_size_goes_out_byte_for_byte():
    sized = normalize_image(shelf_jpeg(1600, 1200, seed=4), BUDGET, **LIMITS)
    again = normalize_image(sized.jpeg, BUDGET, **LIMITS)
    assert again.jpeg == sized.jpeg  # no second generation of JPEG loss
    assert again.data_url == "data:image/jpeg;base64," + base64.b64encode(sized.jpeg).decode()
    size = (sized.scale.sent_width, sized.scale.sent_height)
    assert (again.scale.original_width, again.scale.original_height) == size
    assert (again.scale.sent_width, again.scale.sent_height) == size


def _at_budget_size(**save) -> tuple[bytes, Image.Image]:
    sized = normalize_image(shelf_jpeg(1600, 1200, seed=5), BUDGET, **LIMITS)
    img = Image.open(io.BytesIO(sized.jpeg))
    img.load()
    return encode(img, "JPEG", **save), img


@pytest.mark.parametrize(
    "variant",
    ["rotated by EXIF", "greyscale", "CMYK", "bloated with metadata", "not whole tiles"],
)
def test_a_jpeg_that_needs_any_work_is_re_encoded(variant):
    data, img = _at_budget_size()
    if variant == "rotated by EXIF":
        exif = Image.Exif()
        exif[0x0112] = 3  # upside down: same size, but the engine must see it upright
        data = encode(img, "JPEG", exif=exif)
    elif variant == "greyscale":
        data = encode(img.convert("L"), "JPEG")
    elif variant == "CMYK":
        data = encode(img.convert("CMYK"), "JPEG")
    elif variant == "bloated with metadata":
        data = encode(img, "JPEG", comment=b"x" * 65000, icc_profile=b"\0" * 800_000)
    else:
        data = encode(img.crop((0, 0, img.width - 10, img.height)), "JPEG")
    out = normalize_image(data, BUDGET, **LIMITS)
    assert out.jpeg != data
    sent = Image.open(io.BytesIO(out.jpeg))
    assert sent.mode == "RGB" and sent.size == (out.scale.sent_width, out.scale.sent_height)
    if variant == "rotated by EXIF":
        # the top-left pixel of what is sent is the original's bottom-right one
        assert _close(sent.getpixel((3, 3)), img.getpixel((img.width - 4, img.height - 4)))


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_corrupt_jpeg_at_its_budget_size_is_still_refused(cut):
    data, _ = _at_budget_size()
    with pytest.raises(InvalidImage):
        normalize_image(data[: int(len(data) * cut)], BUDGET, **LIMITS)
    garbled = bytearray(data)
    garbled[len(data) // 2 : len(data) // 2 + 200] = b"\xff" * 200
    with pytest.raises(InvalidImage):
        normalize_image(bytes(garbled), BUDGET, **LIMITS)
