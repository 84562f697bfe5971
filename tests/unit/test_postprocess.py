import pytest
from jsonschema import Draft202012Validator

from scanner_gateway.scan.images import Scale
from scanner_gateway.scan.postprocess import (
    OutputInvalid,
    build_result,
    map_boxes,
    parse_output,
    to_pixel_box,
)
from scanner_gateway.scan.results import ProductScan

SCALE = Scale(original_width=4000, original_height=3000, sent_width=1024, sent_height=768)


def test_box_maps_0_1000_to_original_pixels():
    assert to_pixel_box([0, 0, 1000, 1000], SCALE) == (0, 0, 4000, 3000)
    assert to_pixel_box([250, 500, 500, 750], SCALE) == (1000, 1500, 2000, 2250)


def test_box_corners_are_sorted_and_clamped():
    assert to_pixel_box([500, 750, 250, 500], SCALE) == (1000, 1500, 2000, 2250)
    assert to_pixel_box([-50, 900, 1200, 1100], SCALE) == (0, 2700, 4000, 3000)


@pytest.mark.parametrize("coords", [[10, 10, 10, 500], [0, 0, 0, 0], [1, 2, 3], [5, 5, 5, 5, 5]])
def test_degenerate_boxes_are_none(coords):
    assert to_pixel_box(coords, SCALE) is None


def test_map_boxes_per_photo_and_warns():
    other = Scale(100, 200, 96, 192)
    data = {"items": [{"image": 1, "bbox_2d": [0, 0, 500, 500]}, {"image": 0, "bbox_2d": [3, 3, 3, 3]},
                      {"image": 7, "bbox_2d": [0, 0, 10, 10]}]}
    warnings: list[str] = []
    out = map_boxes(data, [SCALE, other], warnings)
    assert out["items"][0]["box"] == {"x1": 0, "y1": 0, "x2": 50, "y2": 100}
    assert "bbox_2d" not in out["items"][0]
    assert out["items"][1]["box"] is None and out["items"][2]["box"] is None
    assert len(warnings) == 2 and "items[2]" in warnings[1]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(None, "no content"), ("", "no content"), ('{"n": 1', "not valid JSON"), ("[1]", "schema"),
     ('{"n": 42}', "schema violation at n"), ('{"n": NaN}', "not valid JSON"), ('{"n": 1, "x": 2}', "schema")],
)
def test_parse_output_rejects_invalid_answers(text, fragment):
    with pytest.raises(OutputInvalid, match=fragment):
        parse_output(text, Draft202012Validator(SCHEMA))


def test_build_result_types_and_summarises():
    data = {"products": [
        {"name": "Cola", "brand": "X", "category": "beverage", "package": "can", "facings": 3,
         "price": "3.50", "currency": "CNY", "image": 0, "bbox_2d": [100, 100, 200, 300]},
        {"name": "Rice", "brand": None, "category": "dry_goods", "package": "bag", "facings": 2,
         "price": None, "currency": None, "image": 0, "bbox_2d": [0, 0, 0, 0]},
    ]}
    result, warnings = build_result(data, [SCALE], ProductScan)
    assert isinstance(result, ProductScan)
    dumped = result.model_dump()
    assert dumped["total_products"] == 2 and dumped["total_facings"] == 5 and dumped["priced_products"] == 1
    assert result.products[0].price == 3.5
    assert result.products[0].box.x2 == 800 and result.products[1].box is None
    assert len(warnings) == 1
