"""Shared test helpers: image bytes in every format the gateway must handle."""

from __future__ import annotations

import io

from PIL import Image

from scanner_gateway.synthetic import shelf_jpeg, shelf_photo

__all__ = ["encode", "shelf_jpeg", "shelf_photo"]


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()
