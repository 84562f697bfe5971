"""Synthetic retail photos (shelves of labelled boxes with price tags) for demos, tests, benches.

Deterministic per seed, so every system in a benchmark sees the same pixels, yet each
seed gives a distinct image (engine prefix/multimodal caches cannot short-cut them).
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

_PRODUCTS = ("COLA", "MILK", "RICE", "TEA", "SOAP", "CHIPS", "WATER", "JUICE", "NOODLE", "COFFEE")


def shelf_photo(width: int = 1024, height: int = 768, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (235, 232, 225))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, height // 40))
    shelves = 4
    shelf_h = height // shelves
    for s in range(shelves):
        y0 = s * shelf_h
        draw.rectangle((0, y0 + shelf_h - 12, width, y0 + shelf_h), fill=(120, 90, 60))
        x = rng.randint(4, 30)
        while x < width - 40:
            w = rng.randint(max(8, width // 20), max(9, width // 9))
            h_min = max(4, shelf_h // 2)
            h = rng.randint(h_min, max(h_min + 1, shelf_h - 40))
            if rng.random() < 0.12:  # an out-of-stock gap
                x += w + rng.randint(4, 20)
                continue
            colour = tuple(rng.randint(30, 230) for _ in range(3))
            top = y0 + shelf_h - 12 - h
            draw.rectangle((x, top, min(x + w, width - 1), y0 + shelf_h - 14), fill=colour, outline=(20, 20, 20))
            draw.text((x + 4, top + 6), rng.choice(_PRODUCTS), fill=(255, 255, 255), font=font)
            tag_y = y0 + shelf_h - 30
            draw.rectangle((x + 2, tag_y, x + min(w, 70), tag_y + 16), fill=(255, 240, 60))
            draw.text((x + 4, tag_y + 1), f"{rng.randint(1, 99)}.{rng.choice(['00', '50', '90'])}",
                      fill=(0, 0, 0), font=font)
            x += w + rng.randint(2, 10)
    # Fine noise so JPEG sizes resemble real photos rather than flat cartoons. From the
    # seeded generator, not Image.effect_noise (C rand(), unseeded): the same seed must
    # give the same bytes in every process, or a benchmark's systems see different photos.
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    noise = noise.point(_NOISE_SPREAD).convert("RGB")
    return Image.blend(img, noise, 0.08)


# Uniform bytes (std ~74) squeezed around grey to std ~18, the spread the noise had before.
_NOISE_SPREAD = [round(128 + (v - 128) * 18 / 74) for v in range(256)]


def shelf_jpeg(width: int = 1024, height: int = 768, seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    shelf_photo(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
