"""Pure post-processing: parse the model's JSON, validate, map boxes to original pixels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from scanner_gateway.scan.images import Scale

MODEL_BOX_KEY = "bbox_2d"
RESULT_BOX_KEY = "box"
MODEL_COORD_RANGE = 1000  # Qwen3-VL grounding: 0-1000 relative coordinates


class OutputInvalid(ValueError):
    """The model's text is not a valid answer for the task (parse or schema failure)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_output(text: str | None, validator: Draft202012Validator) -> dict[str, Any]:
    """Strict JSON parse plus schema validation; raises OutputInvalid with the first problem."""
    if not text:
        raise OutputInvalid("the model returned no content")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise OutputInvalid(f"not valid JSON: {exc}") from exc
    error = next(iter(validator.iter_errors(data)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise OutputInvalid(f"schema violation at {where}: {error.message[:200]}")
    return data


def to_pixel_box(
    coords: Sequence[int | float], scale: Scale
) -> tuple[int, int, int, int] | None:
    """0-1000 model coordinates -> clamped (x1, y1, x2, y2) in original pixels.

    Corners given in any order are sorted; a box thinner than one pixel is None.
    """
    if len(coords) != 4:
        return None
    w, h = scale.original_width, scale.original_height

    def px(v: float, size: int) -> int:
        return min(max(round(v * size / MODEL_COORD_RANGE), 0), size)

    xa, ya, xb, yb = coords
    x1, x2 = sorted((px(xa, w), px(xb, w)))
    y1, y2 = sorted((px(ya, h), px(yb, h)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return x1, y1, x2, y2


def map_boxes(data: Any, scales: Sequence[Scale], warnings: list[str], path: str = "") -> Any:
    """Copy of `data` where every `bbox_2d` became a pixel `box` (or None, with a warning)."""
    if isinstance(data, list):
        return [map_boxes(v, scales, warnings, f"{path}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        return data
    out = {k: map_boxes(v, scales, warnings, f"{path}.{k}" if path else k)
           for k, v in data.items() if k != MODEL_BOX_KEY}
    if MODEL_BOX_KEY in data:
        index = data.get("image", 0)
        box = None
        if not isinstance(index, int) or not 0 <= index < len(scales):
            warnings.append(f"{path}: box refers to photo {index}, which was not sent; dropped")
        else:
            box = to_pixel_box(data[MODEL_BOX_KEY], scales[index])
            if box is None:
                warnings.append(f"{path}: degenerate box {data[MODEL_BOX_KEY]} dropped")
        out[RESULT_BOX_KEY] = (
            None if box is None else dict(zip(("x1", "y1", "x2", "y2"), box, strict=True))
        )
    return out


def build_result(
    data: dict[str, Any], scales: Sequence[Scale], model: type[BaseModel] | None
) -> tuple[BaseModel | dict[str, Any], list[str]]:
    """Map boxes and validate into the task's typed model (when it has one)."""
    warnings: list[str] = []
    mapped = map_boxes(data, scales, warnings)
    if model is None:
        return mapped, warnings
    try:
        return model.model_validate(mapped), warnings
    except ValidationError as exc:
        raise OutputInvalid(f"result does not fit the task's model: {exc.errors()[0]['msg']}") from exc
