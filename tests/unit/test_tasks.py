import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from scanner_gateway.config import default_prompts_dir
from scanner_gateway.scan.schema import bound_problems, max_json_length, sample_instance
from scanner_gateway.scan.tasks import LOCALES, TaskConfigError, TaskRegistry

BUILT_IN = {"product_scan", "shelf_audit", "price_tags", "storefront", "kitchen_compliance"}


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry.load(default_prompts_dir())


def test_the_five_tasks_load(registry):
    assert set(registry.names()) == BUILT_IN
    for task in registry:
        assert task.result_model is not None
        assert task.spec.sampling.temperature == 0.0


def test_every_schema_is_bounded_and_fits_max_tokens(registry):
    for task in registry:
        assert bound_problems(task.spec.result_schema) == []
        assert max_json_length(task.spec.result_schema) <= task.spec.sampling.max_tokens


def test_every_template_renders_in_both_locales(registry):
    for task in registry:
        for locale in LOCALES:
            system, user = task.render(locale, 2)
            assert system and "2" in user and "$" not in user


def test_engine_schema_caps_photo_index(registry):
    task = registry.get("product_scan")
    item = task.engine_schema(2)["properties"]["products"]["items"]["properties"]
    assert item["image"]["maximum"] == 1
    assert task.spec.result_schema["properties"]["products"]["items"]["properties"]["image"]["maximum"] == 3


def test_max_json_length_is_an_upper_bound():
    schema = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
              "properties": {"a": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 5}},
                             "b": {"type": ["integer", "null"], "minimum": -100, "maximum": 10}}}
    longest = {"a": ["xxxxx"] * 3, "b": -100}
    Draft202012Validator(schema).validate(longest)
    assert len(json.dumps(longest, separators=(",", ":"))) == max_json_length(schema)
    Draft202012Validator(schema).validate(sample_instance(schema))


@pytest.mark.parametrize(
    ("node", "fragment"),
    [({"type": "string"}, "maxLength"), ({"type": "number"}, "unbounded digits"),
     ({"type": "array", "items": {"type": "boolean"}}, "maxItems"), ({"type": "integer", "minimum": 0}, "maximum"),
     ({"type": "object", "properties": {}}, "additionalProperties"), ({}, "no 'type'")],
)
def test_unbounded_schemas_are_named(node, fragment):
    assert any(fragment in p for p in bound_problems(node))


def _write_variant(tmp_path: Path, mutate) -> Path:
    source = default_prompts_dir() / "storefront.yaml"
    data = yaml.safe_load(source.read_text())
    mutate(data)
    (tmp_path / "storefront.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["result_schema"]["properties"].update(shop_name={"type": "string"}), "maxLength"),
        (lambda d: d["system"].pop("zh"), "missing locale"),
        (lambda d: d.update(user={"en": "look at $photos", "zh": "看"}), "does not render"),
        (lambda d: d.update(name="shopfront"), "must match the file name"),
        (lambda d: d["sampling"].update(max_tokens=100), "longest answer"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["result_schema"]["properties"].update(status={"type": "string", "enum": ["open"], "maxLength": "x"}),
         "not valid JSON Schema"),
        (lambda d: d["result_schema"]["properties"].update(status={"type": "integer", "minimum": 0, "maximum": 2}),
         "typed model"),
    ],
)
def test_bad_task_files_refuse_to_load_naming_the_file(tmp_path, mutate, fragment):
    directory = _write_variant(tmp_path, mutate)
    with pytest.raises(TaskConfigError) as exc:
        TaskRegistry.load(directory)
    assert "storefront.yaml" in str(exc.value) and fragment in str(exc.value)


def test_broken_yaml_and_empty_dir(tmp_path):
    with pytest.raises(TaskConfigError, match="no task files"):
        TaskRegistry.load(tmp_path)
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(TaskConfigError, match="x.yaml: cannot read YAML"):
        TaskRegistry.load(tmp_path)
